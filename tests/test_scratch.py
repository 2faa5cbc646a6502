"""Out-of-core SemDeDup: the pool sorted by cell on scratch disk, cells larger than the memory
budget read in blocks, and scratch that never outlives its run (success, failure, SIGKILL)."""

import importlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import unit_rows
from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig

from dbp_lightning.pruning.embeddings import Embeddings
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.pruning.semdedup import duplicate_similarity
from dbp_lightning.synthetic import PoolSpec, write_pool_store
from test_select_semdedup import brute_duplicate_similarity

# the modules (the package exports functions of the same names)
kmeans, scratch, scratchfile, semdedup = (importlib.import_module(f"dbp_lightning.pruning.{m}")
                                          for m in ("kmeans", "scratch", "scratchfile", "semdedup"))


def scratch_fds(directory) -> list[str]:
    """This process's open files in ``directory`` (unlinked ones read '... (deleted)')."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


def pool_with_copies(rng, n=3000, d=16, float16=True):
    """Clustered unit rows, 10 % near-duplicates and 5 % bit-identical copies, off unit norm by
    a few per cent (so reads normalise), as a float16 memmap like a store's shard."""
    centres = unit_rows(rng, 12, d)
    x = centres[rng.integers(0, 12, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    near = rng.choice(n, n // 10, replace=False)
    x[near] = x[rng.integers(0, n, len(near))] + 0.01 * rng.standard_normal((len(near), d))
    same = rng.choice(n, n // 20, replace=False)
    x[same] = x[rng.integers(0, n, len(same))]
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.97, 1.03, (n, 1))
    return x.astype(np.float16 if float16 else np.float32)


@pytest.mark.parametrize("memory_rows", [9, 64, 10**6])
def test_rows_grouped_in_the_assignment_pass_read_back_as_a_gather_would(rng, tmp_path,
                                                                         memory_rows):
    """group_rows: cells found block by block, rows written in per-cell pieces (9 rows over 7
    cells: one-row pieces; 64: several pieces a cell), read back in cluster_index order,
    ranges across piece boundaries included; an empty cell is an empty range."""
    from dbp_lightning.pruning.groups import cluster_index

    x = pool_with_copies(rng, n=500)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        emb = Embeddings(x, block_size=37)
    centres = unit_rows(rng, 7, x.shape[1])
    seen = []

    def cells_of(rows):
        seen.append(rows.copy())
        ids = (rows @ centres.T).argmax(axis=1)
        return np.where(ids == 6, 5, ids)  # cell 6 stays empty

    memory = 4 * memory_rows * x.shape[1] * x.itemsize
    cells, rows = scratch.group_rows(emb, cells_of, 7, memory, tmp_path)
    with rows:
        np.testing.assert_array_equal(np.concatenate(seen), emb.rows(0, 500))  # float32, normalised
        assert rows.on_disk == (memory_rows < 500) and os.listdir(tmp_path) == []
        index = cluster_index(cells, None, 7)
        assert index.sizes[6] == 0
        expected = emb.take(index.order)
        np.testing.assert_array_equal(rows.range(0, 500).load(), expected)
        for lo, hi in [(0, 1), (3, 250), (index.starts[2], index.starts[4]), (499, 500)]:
            np.testing.assert_array_equal(rows.range(lo, hi).load(), expected[lo:hi])
        np.testing.assert_array_equal(rows.range(5, 400)[np.array([394, 0, 7])], expected[[399, 5, 12]])
        assert rows.range(index.starts[6], index.starts[7]).load().shape == (0, x.shape[1])
    assert scratch_fds(tmp_path) == []

    def fails(rows):
        if len(seen) > 3:
            raise RuntimeError("injected")
        seen.append(rows)
        return np.zeros(len(rows), np.int64)

    seen.clear()
    with pytest.raises(RuntimeError, match="injected"):
        scratch.group_rows(emb, fails, 7, 4 * 9 * x.shape[1] * x.itemsize, tmp_path)
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []  # the failed pass's file


@pytest.mark.parametrize("memory_rows", [5, 64, 10**6])
def test_sorted_rows_read_back_as_a_gather_would(rng, tmp_path, memory_rows, monkeypatch):
    x = pool_with_copies(rng, n=500)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        emb = Embeddings(x, block_size=37)
    order = rng.permutation(500)[:321]  # part of the pool, in any order
    memory = 4 * memory_rows * x.shape[1] * x.itemsize
    with scratch.sort_rows(emb, order, memory, tmp_path) as rows:
        assert rows.on_disk == (memory_rows < 321)
        assert os.listdir(tmp_path) == []  # unlinked from the start
        expected = emb.take(order)
        np.testing.assert_array_equal(rows.range(0, 321).load(), expected)
        part = rows.range(17, 200)
        np.testing.assert_array_equal(part[5:90], expected[22:107])
        np.testing.assert_array_equal(part[np.array([3, 0, 182, 3])], expected[[20, 17, 199, 20]])
        np.testing.assert_array_equal(part[4], expected[21])
        spans = [(17, 200), (0, 321), (300, 310), (5, 6), (0, 200)]  # held: at most 200 rows
        for (lo, hi), got in zip(spans, rows.ranges(spans, 200)):  # read ahead, buffers reused
            assert isinstance(got, np.ndarray) == (hi - lo <= 200)
            time.sleep(0.02)  # the next span's read lands meanwhile, in another buffer
            np.testing.assert_array_equal(got[:], expected[lo:hi])
        for gap, span in ((16, 1024), (0, 1), (3, 7)):  # reads coalesced by runs, or row by row
            monkeypatch.setattr(scratch, "_GAP", gap)
            monkeypatch.setattr(scratch, "_SPAN", span)
            some = rng.integers(-183, 183, 400)  # repeats, any order, near and far apart
            np.testing.assert_array_equal(part[some], expected[17:200][some])
        np.testing.assert_array_equal(part[-1], expected[199])  # as NumPy reads it
        assert part[5:2].shape == (0, x.shape[1]) and rows.range(3, 3).load().shape == (0, x.shape[1])
        for bad in (183, -184):
            with pytest.raises(IndexError, match="out of range for 183 rows"):
                part[np.array([0, bad])]
        with pytest.raises(IndexError, match="1-D integer array"):
            part[np.ones(183, bool)]
    assert scratch_fds(tmp_path) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=30), st.integers(1, 12))
def test_runs_are_the_greedy_cut_of_whole_cells(sizes, limit):
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if max(sizes, default=0) > limit:
        with pytest.raises(ValueError, match=f"a cell holds {max(sizes)} rows, more than a run's {limit}"):
            scratch.run_bounds(starts, limit)
        return
    bounds = scratch.run_bounds(starts, limit)
    # brute force: from each bound, the last cell bound within limit rows
    expected, at = [0], 0
    while at < starts[-1]:
        at = max(int(b) for b in starts if at < b <= at + limit)
        expected.append(at)
    assert bounds.tolist() == expected
    assert set(bounds.tolist()) <= set(starts.tolist()) and np.all(np.diff(bounds) <= limit)


@pytest.mark.parametrize("memory_rows", [7, 40, 10**6])
def test_runs_of_sorted_rows_are_the_gathered_rows(rng, tmp_path, memory_rows):
    """sorted_runs: each run's rows, put in order by its rank, are the rows a gather gives, on
    disk (7 rows: runs of one or two cells; 40: several cells a run) or in memory; the file is
    gone when the runs are done and when they are left early."""
    x = pool_with_copies(rng, n=500)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        emb = Embeddings(x, block_size=37)
    sizes = rng.integers(0, 8, 80)  # cells of at most 7 rows, empty ones too
    starts = np.concatenate([[0], np.cumsum(sizes)])
    order = rng.permutation(500)[: starts[-1]]  # part of the pool, in any order
    limit = min(memory_rows, 40)
    bounds = scratch.run_bounds(starts, limit)
    memory = 4 * memory_rows * x.shape[1] * x.itemsize
    seen, on_disk = [], memory_rows < len(order)  # else one run of them all
    for lo, hi, raw, rank in scratch.sorted_runs(emb, order, bounds, memory, tmp_path):
        assert os.listdir(tmp_path) == [] and len(scratch_fds(tmp_path)) == on_disk
        np.testing.assert_array_equal(raw[: hi - lo][rank], x[order[lo:hi]])
        seen.append((lo, hi))
        reserved = [os.fstat(int(fd)).st_size for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path))]
        # within what the pipeline states for SemDeDup up front (its bound on the runs)
        assert len(reserved) == on_disk and max(reserved, default=0) <= semdedup.scratch_need(
            len(order), x.shape[1], x.dtype, memory, semdedup.kmeans.FLAT_MAX_K)
    assert seen == (list(zip(bounds[:-1].tolist(), bounds[1:].tolist())) if on_disk
                    else [(0, len(order))])
    assert scratch_fds(tmp_path) == []
    runs = scratch.sorted_runs(emb, order, bounds, memory, tmp_path)
    next(runs)
    runs.close()  # left after the first run
    assert scratch_fds(tmp_path) == []
    with pytest.raises(ValueError, match="more than a quarter of memory_bytes"):
        next(scratch.sorted_runs(emb, order, np.array([0, len(order)]), 4 * 8 * x.shape[1] * 2))


def test_rows_read_are_the_callers_to_write_to(rng):
    x = unit_rows(rng, 50, 4)  # float32, unit norm: reads need no conversion, views are possible
    with scratch.sort_rows(Embeddings(x), np.arange(50)[::-1].copy(), 1 << 30) as rows:
        assert not rows.on_disk
        rows.range(0, 10).load()[:] = 7.0
        rows.range(0, 10)[np.array([2])][:] = 7.0
        loaded = next(rows.ranges([(5, 20)], 20))  # a kept buffer, not the rows held
        assert not np.shares_memory(loaded, x)
        np.testing.assert_array_equal(loaded, x[::-1][5:20])
        loaded[:] = 7.0
        np.testing.assert_array_equal(rows.range(0, 50).load(), x[::-1])


def test_out_of_core_duplicate_similarity_is_the_same_bytes(rng, tmp_path):
    x = pool_with_copies(rng, n=1500, d=8, float16=False)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    parts = [rng.integers(0, 3, 1500), rng.integers(0, 5, 1500)]  # cells of 300-500 rows
    key = rng.uniform(0, 1, 1500).astype(np.float32)
    held = duplicate_similarity(x, parts, key, block_size=64, return_partner=True)
    np.testing.assert_allclose(duplicate_similarity(x, parts[0], key, memory_bytes=4 * 4 * 8 * 40,
                                                    scratch_dir=tmp_path),
                               brute_duplicate_similarity(x, parts[0], key), atol=1e-5)
    # a budget far below one cell: whole cells are never held, similarity blocks of 64 rows
    tiny = 4 * 4 * 8 * 40
    assert tiny // (4 * 4 * 8) < 300
    small = duplicate_similarity(x, parts, key, block_size=64, return_partner=True,
                                 memory_bytes=tiny, scratch_dir=tmp_path)
    np.testing.assert_array_equal(small[0], held[0])
    np.testing.assert_array_equal(small[1], held[1])
    pytest.importorskip("torch")
    on_torch = duplicate_similarity(x, parts, key, block_size=64, return_partner=True,
                                    memory_bytes=tiny, scratch_dir=tmp_path, backend="torch")
    np.testing.assert_array_equal(on_torch[0], held[0])
    np.testing.assert_array_equal(on_torch[1], held[1])
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []


def test_cells_held_in_runs_and_cells_read_in_blocks_give_the_same_bytes(rng, tmp_path,
                                                                        monkeypatch):
    """A budget between the cells' sizes: the small cells go through runs of whole cells on
    disk, the large ones through the sorted file block by block; the result is the one held
    in memory, and the brute-force definition."""
    x = pool_with_copies(rng, n=1500, d=8, float16=False)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    weights = 0.8 ** np.arange(40)
    assignment = rng.choice(40, 1500, p=weights / weights.sum())  # cells of 1 to ~300 rows
    key = rng.uniform(0, 1, 1500).astype(np.float32)
    memory = 4 * 4 * 8 * 60  # 60 float32 rows held whole
    sizes = np.bincount(assignment)
    assert (sizes > 60).sum() >= 3 and ((sizes > 1) & (sizes <= 60)).sum() >= 10
    assert sizes[sizes <= 60].sum() > 60  # the held cells' runs are on disk
    calls = []
    for name in ("sort_rows", "sorted_runs"):
        real = getattr(semdedup, name)
        monkeypatch.setattr(semdedup, name, lambda *a, _real=real, _name=name, **k:
                            (calls.append(_name), _real(*a, **k))[1])
    small = duplicate_similarity(x, assignment, key, block_size=64, return_partner=True,
                                 memory_bytes=memory, scratch_dir=tmp_path)
    assert sorted(calls) == ["sort_rows", "sorted_runs"]
    held = duplicate_similarity(x, assignment, key, block_size=64, return_partner=True)
    np.testing.assert_array_equal(small[0], held[0])
    np.testing.assert_array_equal(small[1], held[1])
    np.testing.assert_allclose(small[0], brute_duplicate_similarity(x, assignment, key), atol=1e-5)
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []


def test_exact_argmax_over_rows_too_large_to_hold_matches_the_definition(rng, tmp_path):
    """Keys read from scratch by block and by index (a cell too large to hold), with copies of
    the best key: its lowest index, as over the same rows in memory and by exact arithmetic."""
    from fractions import Fraction

    from dbp_lightning.pruning.exact import exact_argmax

    x = pool_with_copies(rng, n=400, d=6, float16=False)
    with pytest.warns(UserWarning, match="not L2-normalised"):
        emb = Embeddings(np.abs(x) + 0.1)
    with scratch.sort_rows(emb, np.arange(400), 4 * 8 * 4 * 6, tmp_path) as rows:
        lazy = rows.range(0, 400)
        held = lazy.load()
        q = held[rng.integers(0, 400, 40)]
        before = rng.integers(0, 401, 40)
        exact = [[sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(qi, key))
                  for key in held] for qi in q]
        truth = [max(range(b), key=lambda j, e=e: (e[j], -j)) if b else -1
                 for e, b in zip(exact, before)]
        assert exact_argmax(q, lazy, before=before, block_size=64).tolist() == truth
        assert exact_argmax(q, held, before=before, block_size=64).tolist() == truth


@pytest.fixture(scope="module")
def stored_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "store"
    write_pool_store(path, PoolSpec(n=6000, dim=32, n_concepts=60, block=2500, seed=5),
                     dtype="float16")
    return path


def two_level_config(**kw):
    return PruneConfig(stages=["semdedup", "dbp"], seed=3,
                       semdedup=SemDeDupConfig(k=40, eps=0.05, target_fraction=None),
                       select=SelectConfig(target_fraction=0.5, k=20, num_neighbors=5), **kw)


def test_prune_out_of_core_gives_the_selection_bytes_held_in_memory(stored_pool, tmp_path,
                                                                    monkeypatch):
    from dbp_lightning.store import EmbeddingStore

    monkeypatch.setattr(kmeans, "FLAT_MAX_K", 8)  # k=40: the two-level partition, 7 coarse cells
    sorts, groupings, reserved = [], [], []
    real_sort, real_group = scratch.sort_rows, scratch.group_rows

    def spy_sort(*args, **kwargs):
        rows = real_sort(*args, **kwargs)
        sorts.append((rows.n, rows.on_disk, len(scratch_fds(tmp_path))))
        reserved.append(os.fstat(rows._file.fd).st_size if rows.on_disk else 0)
        return rows

    def spy_group(*args, **kwargs):
        cells, rows = real_group(*args, **kwargs)
        groupings.append((rows.n, rows.on_disk, len(scratch_fds(tmp_path))))
        reserved.append(os.fstat(rows._file.fd).st_size if rows.on_disk else 0)
        return cells, rows

    monkeypatch.setattr(semdedup, "sort_rows", spy_sort)  # imported by name
    monkeypatch.setattr(scratch, "sort_rows", spy_sort)  # partition_kmeans imports them when it runs
    monkeypatch.setattr(scratch, "group_rows", spy_group)
    held = prune(EmbeddingStore(stored_pool), two_level_config())
    # the coarse assignment groups the pool by coarse cell once per partition, held in memory;
    # cells are read from it, nothing else is sorted
    assert groupings == [(6000, False, 0)] * 2 and sorts == []
    groupings.clear()
    # 16 KiB: coarse cells (~850 rows) and dedup cells (~150) are far above the 32 rows held
    # whole: the pool grouped on disk (in pieces of 32 / 7 coarse cells = 4 rows), then each
    # coarse cell's rows sorted on into cell and rank order, and every dedup cell read from
    # there in tiles
    small = prune(EmbeddingStore(stored_pool),
                  two_level_config(memory_gb=2**-16, scratch_dir=str(tmp_path)))
    assert groupings == [(6000, True, 1)] * 2
    assert len(sorts) == 14 and all(n < 6000 for n, _, _ in sorts)  # 7 coarse cells a partition
    assert all(on_disk and fds == 2 for _, on_disk, fds in sorts)
    assert held.selection.equals(small.selection)
    assert held.clusters.equals(small.clusters)
    stage = small.report["stages"][0]
    # the figure stated up front bounds every file reserved, one at a time: the float16 rows,
    # and the padding of their pieces to whole blocks for direct I/O
    assert stage["scratch_bytes"] == semdedup.scratch_need(6000, 32, np.float16, 2**14, 40)
    assert stage["scratch_bytes"] >= max(reserved) >= 6000 * 32 * 2
    assert held.report["stages"][0]["scratch_bytes"] == 0
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []


def test_scratch_is_freed_when_a_stage_fails(stored_pool, tmp_path, monkeypatch):
    from dbp_lightning.store import EmbeddingStore

    seen = []

    def fail(*args, **kwargs):
        seen.append(len(scratch_fds(tmp_path)))
        raise RuntimeError("injected failure")

    monkeypatch.setattr(semdedup, "_earlier_nearest", fail)
    with pytest.raises(RuntimeError, match="injected"):
        prune(EmbeddingStore(stored_pool), two_level_config(memory_gb=2**-16,
                                                            scratch_dir=str(tmp_path)))
    assert seen and seen[0] >= 1  # sorted rows were open on disk when the stage failed ...
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []  # ... and are gone


def test_a_disk_without_room_is_refused_before_any_stage(stored_pool, tmp_path, monkeypatch):
    from collections import namedtuple

    import dbp_lightning.pruning.pipeline as P
    from dbp_lightning.store import EmbeddingStore

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(scratchfile.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(P, "semdedup_passes", lambda *a, **k: pytest.fail("a stage ran"))
    # 0.38 MB of float16 rows, and pieces of at least a 4 KiB block each, padded to whole blocks
    need = semdedup.scratch_need(6000, 32, np.float16, 2**14, 40)
    assert 6000 * 32 * 2 < need < 8 * 6000 * 32 * 2
    with pytest.raises(ValueError, match=f"scratch_dir {tmp_path}: the sorted rows need "
                                         f"{need / 1e6:.1f} MB and 0.0 MB are free; set scratch_dir"):
        prune(EmbeddingStore(stored_pool), two_level_config(memory_gb=2**-16,
                                                            scratch_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="scratch_dir .*nope: not a directory"):
        prune(EmbeddingStore(stored_pool), two_level_config(memory_gb=2**-16,
                                                            scratch_dir=str(tmp_path / "nope")))
    for bad in (0, float("inf")):
        with pytest.raises(ValueError, match="memory_gb must be a finite number > 0"):
            two_level_config(memory_gb=bad).validate()


@pytest.mark.parametrize("failing_write", [0, 1, 5])  # 0: the probe of direct I/O at open
def test_a_disk_filling_up_mid_write_names_scratch_dir(stored_pool, tmp_path, monkeypatch,
                                                       failing_write):
    """A file system that reserved nothing runs out of room in a write the writer thread makes:
    the one-line error names scratch_dir, and no scratch is left open."""
    import errno

    from dbp_lightning.store import EmbeddingStore

    real, calls = scratchfile._write_all, []

    def filling(fd, view, offset):
        calls.append(offset)
        if len(calls) > failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, view, offset)

    monkeypatch.setattr(scratchfile, "_reserve", lambda fd, nbytes, directory: None)
    monkeypatch.setattr(scratchfile, "_write_all", filling)
    with pytest.raises(ValueError, match=f"scratch_dir {tmp_path}: (ran out of room writing .* "
                                         "of|no room for the) sorted rows; set scratch_dir to a "
                                         "disk with room"):
        prune(EmbeddingStore(stored_pool), two_level_config(memory_gb=2**-16,
                                                            scratch_dir=str(tmp_path)))
    assert len(calls) > failing_write
    assert scratch_fds(tmp_path) == [] and os.listdir(tmp_path) == []


def test_sigkill_during_the_sort_leaves_no_scratch_and_a_rerun_gives_the_same_bytes(
        stored_pool, tmp_path):
    scratch_dir, out = tmp_path / "scratch", tmp_path / "run"
    scratch_dir.mkdir()
    cmd = [sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(stored_pool),
           "--output", str(out), "--stages", "[semdedup, dbp]", "--semdedup.k", "40",
           "--select.k", "20", "--select.num_neighbors", "5", "--select.target_fraction", "0.5",
           "--memory_gb", str(2**-16), "--scratch_dir", str(scratch_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, open_scratch = time.monotonic() + 120, False
    while time.monotonic() < deadline and proc.poll() is None and not open_scratch:
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                open_scratch |= os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(str(scratch_dir))
            except OSError:
                pass
        time.sleep(0.01)
    assert open_scratch, "the run finished or failed before it wrote any scratch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.listdir(scratch_dir) == []  # nothing on disk to clean up, ever
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    reference = subprocess.run(cmd[:-4] + ["--output", str(tmp_path / "held")],
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert pq.read_table(out / "selection.parquet").equals(
        pq.read_table(tmp_path / "held" / "selection.parquet"))
    assert os.listdir(scratch_dir) == []


def test_float16_widening_is_numpy_s_bit_for_bit(tmp_path):
    """Large float16 blocks are widened by torch (faster); every value is NumPy's bit for bit
    (infinities, zeros and subnormals included; NaNs stay NaN, their payloads may differ, and
    validation refuses them anyway), and a read-only memmap is read without a warning."""
    import warnings

    from dbp_lightning.pruning import embeddings as module

    bits = np.arange(1 << 16, dtype=np.uint16)          # every float16, twice over, as (n, d)
    block = np.concatenate([bits, bits[::-1]]).view(np.float16).reshape(-1, 64)
    assert block.size >= module._TORCH_WIDEN_MIN // 8
    path = tmp_path / "x.npy"
    np.save(path, np.tile(block, (8, 1)))
    mapped = np.load(path, mmap_mode="r")
    assert mapped.size >= module._TORCH_WIDEN_MIN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = module.as_float32(mapped)
    assert wide.dtype == np.float32 and wide.flags.c_contiguous
    expected = np.asarray(mapped, np.float32)
    nan = np.isnan(expected)
    assert nan.any() and np.array_equal(np.isnan(wide), nan)
    np.testing.assert_array_equal(wide[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    small = module.as_float32(block[:4])                 # below the threshold: NumPy's own
    np.testing.assert_array_equal(small.view(np.uint32), block[:4].astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("direct", [True, False])
def test_scratch_file_reads_back_what_was_written_direct_or_buffered(rng, tmp_path, direct,
                                                                     monkeypatch):
    monkeypatch.setattr(scratchfile, "STAGE_BYTES", 3 * scratchfile.ALIGN)  # I/O crosses stages
    if not direct:  # a system without O_DIRECT (macOS): an ordinary buffered file, same bytes
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    directory = tmp_path
    data = rng.integers(0, 256, 40_000, dtype=np.uint8)
    pieces = [(0, 5000), (5000, 5001), (5001, 23_456), (23_456, 40_000)]  # odd lengths
    with scratchfile.ScratchFile(directory, 60_000) as f:
        if not direct:
            assert not f.direct
        with pytest.raises(ValueError, match="multiples of 4096"):
            f.write(data[:10], 100)
        at, offsets = 0, []
        for a, b in pieces:
            offsets.append(at)
            # one array, or a list of them (an empty one too) across the staging buffer's end
            parts = data[a:b] if b - a < 10_000 else [data[a : a + 9000], data[a:a], data[a + 9000 : b]]
            used = f.write(parts, at)
            assert used % scratchfile.ALIGN == 0 and b - a <= used < b - a + scratchfile.ALIGN
            at += used
        for (a, b), offset in zip(pieces, offsets):
            for lo, hi in ((a, b), (a + 1, b - 3), (b - 1, b), (a + 4095, min(b, a + 12_300))):
                out = np.empty(max(hi - lo, 0), np.uint8)
                f.read(out, offset + lo - a)
                np.testing.assert_array_equal(out, data[lo:hi])
    assert scratch_fds(directory) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spans_read_ahead_land_in_another_buffer(rng, tmp_path, dtype):
    """Rows read as they are stored (unit float32: the buffer itself is handed over; float16:
    widened into a kept buffer): the next span's read, made while the caller works, never
    writes into the span it holds."""
    x = unit_rows(rng, 600, 8).astype(dtype)
    emb = Embeddings(x)
    order = rng.permutation(600)
    spans = [(0, 90), (90, 100), (100, 250), (250, 260), (260, 600), (0, 50)]
    with scratch.sort_rows(emb, order, 4 * 100 * 8 * x.itemsize, tmp_path) as rows:
        assert rows.on_disk
        for (lo, hi), got in zip(spans, rows.ranges(spans, 150)):
            time.sleep(0.02)  # the next held span's read lands meanwhile
            np.testing.assert_array_equal(got[:], emb.take(order[lo:hi]))
