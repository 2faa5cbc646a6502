"""Anonymous and file-backed resident memory, apart (what a memory-mapped prune holds)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from dbp_lightning.memory import RssPeaks

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")


def test_peaks_tell_allocated_memory_from_mapped_file_pages(tmp_path):
    path = tmp_path / "pool.npy"
    np.save(path, np.ones((50 << 20) // 4, np.float32))  # 50 MiB on disk
    gc.collect()
    with RssPeaks(interval=0.01) as rss:
        # each phase from a reset: the process's earlier peak (an earlier test's arrays, memory
        # an allocator returns meanwhile) must not hide what the phase adds
        rss.reset()
        before = rss.peaks()
        mapped = np.load(path, mmap_mode="r")
        assert float(mapped.sum(dtype=np.float64)) == mapped.size  # every page read: file-backed
        after_map = rss.peaks()
        rss.reset()
        before_alloc = rss.peaks()
        block = np.ones((80 << 20) // 8)  # 80 MiB allocated: anonymous
        block[::512] += 1
        after_alloc = rss.peaks()
        del block
        rss.reset()
        after_reset = rss.peaks()
    assert after_map["rss_file_peak_mb"] - before["rss_file_peak_mb"] > 40
    assert after_map["rss_anon_peak_mb"] - before["rss_anon_peak_mb"] < 20
    assert after_alloc["rss_anon_peak_mb"] - before_alloc["rss_anon_peak_mb"] > 70
    assert after_reset["rss_anon_peak_mb"] < after_alloc["rss_anon_peak_mb"] - 60  # peaks start afresh


def test_prune_report_gives_each_stage_its_peaks(rng):
    from conftest import unit_rows
    from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
    from dbp_lightning.pruning.pipeline import prune

    result = prune(unit_rows(rng, 3000, 16), PruneConfig(semdedup=SemDeDupConfig(k=10),
                                                         select=SelectConfig(target_fraction=0.5, k=20, num_neighbors=5)))
    for stage in result.report["stages"]:
        assert 0 < stage["rss_anon_peak_mb"] <= stage["peak_rss_mb"]
        assert stage["rss_file_peak_mb"] >= 0
    assert result.report["rss_anon_peak_mb"] == max(s["rss_anon_peak_mb"] for s in result.report["stages"])
