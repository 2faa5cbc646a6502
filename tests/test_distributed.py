"""Pruning split across processes gives the single-process selection, bit for bit.

Fast checks run the ranks as threads over an in-memory collective; the real thing runs
``dbp-lightning prune`` as 2 gloo processes under torchrun and under SLURM's variables, and
compares file hashes with one process on 1, 2 and 3 threads and with NumPy's SIMD off.
(``tests/test_exact.py`` moves every matrix product by up to its error bound, as another BLAS
kernel would, and checks the same.)
"""

import hashlib
import itertools
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collective_util import run_ranks
from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning import kmeans
from dbp_lightning.pruning.collective import block_range, owners
from dbp_lightning.pruning.groups import cluster_index
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.synthetic import PoolSpec, make_pool, write_pool_store


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=7), st.integers(1, 3))
def test_owners_deal_every_item_once_within_four_thirds_of_the_best(costs, world_size):
    owner = owners(np.array(costs), world_size)
    assert owner.shape == (len(costs),) and owner.min() >= 0 and owner.max() < world_size
    loads = np.bincount(owner, weights=costs, minlength=world_size)
    best = min(np.bincount(np.array(a), weights=costs, minlength=world_size).max()
               for a in itertools.product(range(world_size), repeat=len(costs)))
    assert loads.max() <= 4 / 3 * best + 1e-9
    assert np.array_equal(owner, owners(np.array(costs), world_size))


@given(st.integers(0, 500), st.integers(1, 64), st.integers(1, 4))
def test_block_ranges_cover_the_rows_once_on_block_boundaries(n, block, world_size):
    ranges = [block_range(n, block, r, world_size) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        assert lo <= hi == next_lo
        assert hi % block == 0 or hi == n


def test_cluster_index_of_some_clusters_orders_them_as_the_whole_index():
    rng = np.random.default_rng(0)
    assignment = rng.integers(0, 12, 3000)
    sim = rng.choice(np.linspace(0, 1, 7), 3000).astype(np.float32)  # many ties: row breaks them
    whole = cluster_index(assignment, sim, 12)
    mine = np.isin(np.arange(12), [1, 4, 5, 11])
    part = cluster_index(assignment, sim, 12, rows=np.flatnonzero(mine[assignment]))
    for c in range(12):
        expected = whole.members(c) if mine[c] else np.empty(0, np.int64)
        assert np.array_equal(part.members(c), expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_partition_kmeans_split_by_coarse_cell_equals_one_process(world_size, monkeypatch):
    monkeypatch.setattr(kmeans, "FLAT_MAX_K", 16)  # two levels on a small pool
    x, _, _ = make_pool(PoolSpec(n=4000, dim=16, n_concepts=40, seed=5))
    one = kmeans.partition_kmeans(x, 60, niter=5, seed=2, gpu=False)
    ranks = run_ranks(world_size, lambda comm: kmeans.partition_kmeans(x, 60, niter=5, seed=2, gpu=False,
                                                                      comm=comm))
    for got in ranks:
        assert got.centroids.shape[0] == one.centroids.shape[0] > 16
        for a, b in zip(got, one):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_semdedup_in_the_partition_pass_equals_duplicate_similarity(world_size, monkeypatch):
    """semdedup_passes finds each coarse cell's duplicates while its rows are held for the split:
    the same bytes as duplicate_similarity over the same partitions, on any number of ranks."""
    from dbp_lightning.pruning.semdedup import duplicate_similarity, semdedup_passes

    monkeypatch.setattr(kmeans, "FLAT_MAX_K", 16)
    x, _, _ = make_pool(PoolSpec(n=4000, dim=16, n_concepts=40, seed=6))
    parts = [kmeans.partition_kmeans(x, 60, niter=5, seed=2 + p, gpu=False) for p in range(2)]
    sims, partner = duplicate_similarity(x, [p.assignment for p in parts], parts[0].similarity,
                                         return_partner=True)
    for first, got_sims, got_partner in run_ranks(world_size, lambda comm: semdedup_passes(
            x, 60, passes=2, niter=5, seed=2, comm=comm)):
        assert np.array_equal(first.assignment, parts[0].assignment)
        assert np.array_equal(got_sims, sims) and np.array_equal(got_partner, partner)
    assert (partner >= 0).sum() > 3000  # cells of many rows: most rows have a partner


CONFIGS = {
    "semdedup-dbp": dict(stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=30, target_fraction=0.8, block_size=64),
                         select=SelectConfig(target_fraction=0.5, k=25, num_neighbors=5)),
    "semdedup-ssp": dict(stages=["semdedup", "ssp"], semdedup=SemDeDupConfig(k=30, eps=0.1, target_fraction=None, passes=1),
                         select=SelectConfig(target_size=900, k=25, balance_ratio=1.0)),
    "random": dict(stages=["random"], select=SelectConfig(target_fraction=0.3)),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_prune_split_over_ranks_equals_one_process(name, world_size):
    x, _, _ = make_pool(PoolSpec(n=3000, dim=24, n_concepts=30, seed=7))
    config = PruneConfig(input="in-memory", gpu="false", seed=4, **CONFIGS[name])
    one = prune(x, config)
    for got in run_ranks(world_size, lambda comm: prune(x, config, comm=comm)):
        assert got.selection.equals(one.selection)
        assert (got.clusters is None and one.clusters is None) or got.clusters.equals(one.clusters)
        assert got.report["processes"] == world_size


# --- real processes: torchrun and SLURM's variables, gloo --------------------------------------

DETERMINISTIC = ("selection.parquet", "clusters.parquet", "subset.npy")
PRUNE = ["prune", "--stages", "[semdedup, dbp]", "--semdedup.k", "1100", "--select.k", "40",
         "--select.target_fraction", "0.5"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "pool"
    write_pool_store(path, PoolSpec(n=40_000, dim=32, n_concepts=150, block=15_000), dtype="float16")
    return path


def _digests(run):
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in DETERMINISTIC}


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    return {**env, **extra}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numpy_simd_off() -> str:
    """The SIMD extensions NumPy dispatches to on this CPU: disabling them all runs NumPy's own
    loops (exp, einsum, sort, reductions) as on a CPU without them."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))


def _threads(n: int) -> dict:
    return {"OMP_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n)}


@pytest.fixture(scope="module")
def single(store, tmp_path_factory):
    """Digests of one process on 1, 2 and 3 threads (faiss's and BLAS's) and with NumPy's SIMD
    off, by setting. BLAS sums in an order that depends on its thread count, so these runs
    differ in the last bits of every matrix product; the outputs may not."""
    runs = {}
    settings = {"1 thread": _threads(1), "2 threads": _threads(2), "3 threads": _threads(3),
                "NumPy SIMD off": {**_threads(2), "NPY_DISABLE_CPU_FEATURES": _numpy_simd_off()}}
    for name, env in settings.items():
        out = tmp_path_factory.mktemp("single") / "run"
        proc = subprocess.run([sys.executable, "-m", "dbp_lightning.cli", *PRUNE, "--input", str(store),
                               "--output", str(out)], capture_output=True, text=True, timeout=600,
                              env=_env(**env))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = _digests(out)
    return runs


def test_one_process_writes_the_same_bytes_on_any_thread_count(single):
    assert all(digests == single["1 thread"] for digests in single.values()), single


def test_torchrun_two_processes_write_the_single_process_selection(store, single, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "dbp_lightning.cli", *PRUNE,
                           "--input", str(store), "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=_env(**_threads(1)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes, " in proc.stdout
    assert _digests(out) == single["1 thread"]


def test_slurm_tasks_write_the_single_process_selection(store, single, tmp_path):
    """Two tasks as srun starts them: rank, size and rendezvous from SLURM's variables."""
    out, port = tmp_path / "run", _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "dbp_lightning.cli", *PRUNE, "--input", str(store),
                               "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env=_env(**_threads(1), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                                       SLURM_NNODES="1", SLURM_PROCID=str(rank),
                                       SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_NAME="dbp",
                                       SLURM_JOB_ID="4242", SLURM_NODELIST="localhost",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "(2 processes, " in results[0][1] and results[1][1] == ""  # rank 1 writes nothing
    assert _digests(out) == single["1 thread"]


class KeepIds:
    """Keep the samples whose identity is in ``ids``, counted per shard as KeptSamples does."""

    def __init__(self, shards, ids):
        from collections import Counter

        from dbp_lightning.data.shards import iter_shard, shard_name, with_id

        self.ids, self.calls = ids, 0
        self.counts = {shard_name(s): sum(with_id(x)["__id__"] in ids for x in iter_shard(s, Counter()))
                       for s in shards}

    def __call__(self, sample):
        self.calls += 1  # samples read
        return sample["__id__"] in self.ids

    def per_shard(self):
        return self.counts


@pytest.mark.parametrize("world_size", [2, 3])
def test_reshard_split_over_ranks_writes_the_same_tars(tmp_path, world_size):
    from dbp_lightning.data.reshard import reshard
    from wds_util import uid, write_shards

    shards = write_shards(tmp_path / "wds", n_shards=5, per_shard=9)
    rng = np.random.default_rng(0)
    # 60 % kept, none from shard 2: a tar's first sample must skip a shard with nothing kept
    ids = {uid(i) for i in range(45) if rng.random() < 0.6 and i // 9 != 2}
    keep = KeepIds(shards, ids)
    one = reshard(shards, keep, tmp_path / "one", 7)
    assert keep.calls <= 45  # one pass over the 45 source samples, however many tars
    many = run_ranks(world_size, lambda comm: reshard(shards, KeepIds(shards, ids), tmp_path / "many", 7,
                                                      comm=comm))
    assert sum(s["rows"] for s in one["shards"]) == one["samples"] == len(ids)
    for manifest in many:
        assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in one["shards"]]
    for tar in sorted((tmp_path / "one").glob("*.tar")):
        assert (tmp_path / "many" / tar.name).read_bytes() == tar.read_bytes()
    assert len(list((tmp_path / "many").glob("*.tar"))) == 7 and (tmp_path / "many" / "reshard.json").is_file()


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_split_over_ranks_raises_alike_on_every_rank(world_size):
    from dbp_lightning.pruning.embeddings import Embeddings

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[10] *= 1.5  # off unit norm: normalised on read, counted by whichever rank reads it
    x[990] *= 0.5

    def opened(array):
        def open_on(comm):
            try:
                return Embeddings(array, block_size=64, comm=comm).normalize
            except ValueError as exc:
                return str(exc)
        return open_on

    with pytest.warns(UserWarning, match="2 of 1000 rows are not L2-normalised"):
        assert Embeddings(x, block_size=64).normalize
    assert all(run_ranks(world_size, opened(x)))
    # rows within the tolerance are read as they are: the norm bound is the largest rank's
    near = np.float32(1.0015) * x / np.linalg.norm(x, axis=1, keepdims=True)
    near[:900] /= np.float32(1.0015)
    bounds = run_ranks(world_size, lambda comm: Embeddings(near, block_size=64, comm=comm).norm_bound)
    assert bounds == [Embeddings(near, block_size=64).norm_bound] * world_size
    assert 1.0015 <= bounds[0] < 1.0016
    bad = x.copy()
    bad[700] = 0.0  # a later rank's share
    bad[900, 3] = np.nan
    single = opened(bad)(None)
    assert single == "embeddings: row 700 is all zeros and has no direction; drop it before pruning"
    assert run_ranks(world_size, opened(bad)) == [single] * world_size
    bad[100, 0] = np.inf  # now rank 0's share holds the first bad row
    assert run_ranks(world_size, opened(bad)) == [opened(bad)(None)] * world_size
    assert "row 100 has NaN or inf" in opened(bad)(None)
