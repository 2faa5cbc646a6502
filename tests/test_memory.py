"""Anonymous and file-backed resident memory, apart (what a memory-mapped prune holds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")


# Run in a fresh interpreter: in the test process, memory that an earlier test's threads or
# allocators return while a phase allocates can cancel the phase's rise (CI saw a flat peak).
_PHASES = """
import json, sys
import numpy as np
from dbp_lightning.memory import RssPeaks

path = sys.argv[1]
np.save(path, np.ones((50 << 20) // 4, np.float32))  # 50 MiB on disk
out = {}
with RssPeaks(interval=0.01) as rss:
    rss.reset()
    out["before"] = rss.peaks()
    mapped = np.load(path, mmap_mode="r")
    assert float(mapped.sum(dtype=np.float64)) == mapped.size  # every page read: file-backed
    out["after_map"] = rss.peaks()
    rss.reset()
    out["before_alloc"] = rss.peaks()
    block = np.ones((80 << 20) // 8)  # 80 MiB allocated: anonymous
    block[::512] += 1
    out["after_alloc"] = rss.peaks()
    del block
    rss.reset()
    out["after_reset"] = rss.peaks()
print(json.dumps(out))
"""


def test_peaks_tell_allocated_memory_from_mapped_file_pages(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _PHASES, str(tmp_path / "pool.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout.splitlines()[-1])
    assert p["after_map"]["rss_file_peak_mb"] - p["before"]["rss_file_peak_mb"] > 40
    assert p["after_map"]["rss_anon_peak_mb"] - p["before"]["rss_anon_peak_mb"] < 20
    assert p["after_alloc"]["rss_anon_peak_mb"] - p["before_alloc"]["rss_anon_peak_mb"] > 70
    assert p["after_reset"]["rss_anon_peak_mb"] < p["after_alloc"]["rss_anon_peak_mb"] - 60  # peaks start afresh


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
