"""Write a prune run directory (layout in DESIGN.md); every file atomically, manifest last."""

from __future__ import annotations

import os
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import __version__, plots
from .atomic import write_json, write_npy, write_parquet
from .pruning.pipeline import PruneResult


def datacomp_subset(uids) -> np.ndarray:
    """DataComp's subset format: sorted structured array dtype ``u8,u8`` of 128-bit hex uids.

    Raises ValueError naming the first uid that is not 32 hex digits.
    """
    out = np.empty(len(uids), np.dtype("u8,u8"))
    for i, uid in enumerate(uids):
        if len(uid) != 32:
            raise ValueError(f"uid {uid!r} is not 32 hex digits (DataComp format)")
        try:
            out[i] = (int(uid[:16], 16), int(uid[16:], 16))
        except ValueError as exc:
            raise ValueError(f"uid {uid!r} is not 32 hex digits (DataComp format)") from exc
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
    (out / "manifest.json").unlink(missing_ok=True)  # the old run is no longer complete
    write_parquet(out / "selection.parquet", result.selection)
    report = dict(result.report)
    files = ["selection.parquet"]
    if "uid" in result.selection.column_names:
        kept_uids = result.selection.filter(result.selection.column("kept")).column("uid").to_pylist()
        write_npy(out / "subset.npy", datacomp_subset(kept_uids))
        files.append("subset.npy")
    else:
        report["subset_npy"] = "not written: the input has no uid column"
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
