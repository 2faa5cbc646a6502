"""Write a prune run directory (layout in the README); every file atomically, manifest last."""

from __future__ import annotations

import os
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from . import __version__, plots
from .atomic import write_json, write_npy, write_parquet
from .pruning.pipeline import PruneResult


#: what a run writes besides manifest.json; cleared first so no file of an older run survives
ARTIFACTS = ("selection.parquet", "clusters.parquet", "subset.npy", "report.json",
             "plots/complexity_scatter.png", "plots/quotas.png", "report.html", "dedup_pairs.csv")


def datacomp_subset(uids) -> np.ndarray | None:
    """DataComp's subset format: sorted structured array dtype ``u8,u8`` of 128-bit hex uids;
    None when some uid is not 32 hex digits (not a DataComp pool)."""
    out = np.empty(len(uids), np.dtype("u8,u8"))
    for i, uid in enumerate(uids):
        try:
            if len(uid) != 32:
                return None
            out[i] = (int(uid[:16], 16), int(uid[16:], 16))
        except (ValueError, TypeError):
            return None
    return np.sort(out)


def versions() -> dict:
    out = {"python": platform.python_version(), "dbp_lightning": __version__}
    for dist in ("numpy", "faiss-cpu", "faiss-gpu", "pyarrow", "qpsolvers", "osqp"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def write_run(result: PruneResult, out_dir: str | os.PathLike, config: dict,
              input_id: str) -> Path:
    """Write selection.parquet, clusters.parquet, subset.npy, plots, report.json, manifest.json.

    ``manifest.json`` is written last: a run directory with a manifest is complete.
    """
    out = Path(out_dir)
    report = dict(result.report)
    subset = None
    if "uid" in result.selection.column_names:
        subset = datacomp_subset(result.selection.filter(result.selection.column("kept"))
                                 .column("uid").to_pylist())
    if subset is None:
        report["subset_npy"] = "not written: the uids are not DataComp's 32 hex digits"
    (out / "manifest.json").unlink(missing_ok=True)  # the old run is no longer complete
    for name in ARTIFACTS:
        (out / name).unlink(missing_ok=True)
    for tmp in [*out.glob(".*.tmp"), *out.glob("plots/.*.tmp")]:  # left by a killed run
        tmp.unlink(missing_ok=True)
    write_parquet(out / "selection.parquet", result.selection)
    files = ["selection.parquet"]
    if subset is not None:
        write_npy(out / "subset.npy", subset)
        files.append("subset.npy")
    if result.clusters is not None:
        write_parquet(out / "clusters.parquet", result.clusters)
        files.append("clusters.parquet")
        if "quota" in result.clusters.column_names:
            (out / "plots").mkdir(exist_ok=True)
            plots.complexity_scatter(result.clusters, out / "plots" / "complexity_scatter.png")
            target = int(np.asarray(result.clusters.column("quota")).sum())
            plots.quota_profile(result.clusters, target, out / "plots" / "quotas.png")
            files += ["plots/complexity_scatter.png", "plots/quotas.png"]
    write_json(out / "report.json", report)
    write_json(out / "manifest.json", {"config": config, "input": input_id,
                                       "versions": versions(), "files": files + ["report.json"]})
    return out
