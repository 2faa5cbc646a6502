"""The pruning on one worker and on several (pruning/threads.py) gives the same bytes; the
workers are the cores (or a job's BLAS thread limit), each calling a one-thread BLAS."""

import contextlib
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning import kmeans, threads
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.synthetic import PoolSpec, make_pool


@contextlib.contextmanager
def cores(n, monkeypatch, env=None):
    """A process that may run on ``n`` cores (and the BLAS thread variable ``env``, if any),
    the workers read again."""
    with monkeypatch.context() as patch:
        patch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            patch.delenv(name, raising=False)
        if env:
            patch.setenv(*env)
        threads.workers.cache_clear()
        try:
            yield
        finally:
            threads.workers.cache_clear()


def blas_now() -> int:
    """Threads of NumPy's BLAS, the one the pruning's products run on (faiss and torch may
    bring their own, OpenMP-threaded, whose thread count is per thread)."""
    libs = [info for info in threadpool_info() if info["user_api"] == "blas"]
    mine = [info for info in libs if "numpy" in info["filepath"]] or libs
    return max(info["num_threads"] for info in mine)


def test_workers_are_the_cores_and_call_a_one_thread_blas(monkeypatch):
    with cores(4, monkeypatch, ("OMP_NUM_THREADS", "1")), threads.on_all_cores() as pmap:
        assert threads.workers() == 1 and pmap is map  # a job's BLAS limit holds
    with cores(4, monkeypatch, ("OPENBLAS_NUM_THREADS", "3")):
        assert threads.workers() == 3
    with cores(3, monkeypatch):
        assert threads.workers() == 3
        before = blas_now()
        with threads.on_all_cores() as pmap:
            seen = list(pmap(lambda i: (i, threading.current_thread().name, blas_now()), range(9)))
            nested = list(pmap(lambda i: threads.on_all_cores().__enter__() is map, range(3)))
        assert blas_now() == before  # restored
    assert [i for i, _, _ in seen] == list(range(9))  # in the order of the items
    assert all(name.startswith("dbp-cpu") and n == 1 for _, name, n in seen), seen
    assert all(nested)  # inside a worker: the built-in map, no wait on the same pool


@pytest.mark.parametrize("spans", [(10, 3, None), (10, 1, 4), (2, 5, None), (0, 2, None)])
def test_spans_cover_the_range_in_order(spans):
    n, pieces, most = spans
    got = threads.spans(n, pieces, most)
    ends = [b for _, b in got]
    assert [a for a, _ in got] == ([0] + ends[:-1] if got else []) and ends[-1:] in ([n], [])
    assert all(b > a and (most is None or b - a <= most) for a, b in got)
    assert len(got) == min(n, max(pieces, -(-n // most) if most else 1))


@pytest.fixture(scope="module")
def copies_pool():
    x, _, _ = make_pool(PoolSpec(n=3000, dim=24, n_concepts=30, seed=4))
    rng = np.random.default_rng(2)
    x[rng.integers(0, 3000, 300)] = x[rng.integers(0, 3000, 300)]  # bit-identical copies
    return x


@pytest.mark.parametrize("two_levels", [False, True])
@pytest.mark.parametrize("memory_gb", [2**-12, 2**-14])  # 2**-14: some cells too large for a
def test_prune_is_the_same_bytes_on_one_and_three_workers(copies_pool, two_levels, memory_gb,
                                                          monkeypatch, tmp_path):
    """... worker's share (one at a time), some too large to hold (read block by block)."""
    import importlib

    semdedup = importlib.import_module("dbp_lightning.pruning.semdedup")
    if two_levels:
        monkeypatch.setattr(kmeans, "FLAT_MAX_K", 8)  # k=40: coarse cells split into fine ones
    cells_on, real = [], semdedup._cell_duplicates
    monkeypatch.setattr(semdedup, "_cell_duplicates", lambda *a: (
        cells_on.append(threading.current_thread().name), real(*a))[1])
    config = PruneConfig(input="in-memory", gpu="false", seed=5, stages=["semdedup", "dbp"],
                         memory_gb=memory_gb, scratch_dir=str(tmp_path),  # runs of cells on disk
                         semdedup=SemDeDupConfig(k=40, target_fraction=0.8),
                         select=SelectConfig(target_fraction=0.5, k=20, num_neighbors=5))
    with cores(1, monkeypatch):
        one = prune(copies_pool, config)
    assert cells_on and not any(name.startswith("dbp-cpu") for name in cells_on)
    cells_on.clear()
    with cores(3, monkeypatch):
        three = prune(copies_pool, config)
    on_workers = sum(name.startswith("dbp-cpu") for name in cells_on)
    assert on_workers > len(cells_on) / 2 if memory_gb == 2**-12 else on_workers < len(cells_on)
    assert three.selection.equals(one.selection)
    assert three.clusters.equals(one.clusters)
    assert 0 < int((~one.selection.column("dedup_kept").to_numpy()).sum()) < 3000
