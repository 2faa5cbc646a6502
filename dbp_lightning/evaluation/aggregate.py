"""DataComp's aggregate scores: ImageNet, group means, and the average over the 38 tasks."""

from __future__ import annotations

import json
import os

import numpy as np

from .tasks import BY_NAME, GROUPS, OTHER, TASKS


def aggregate(results: dict[str, float], requested: list | None = None) -> dict:
    """Group averages of main metrics keyed by task name (DataComp's ``dataset`` names).

    Returns ``{"ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average"}`` with the
    mean over the tasks present (None where a group has none), plus ``"available"``
    ("31/38") and ``"missing"`` relative to the ``requested`` tasks (default: DataComp's 38;
    other tasks, such as the demo's, count in the average only): a mean over fewer tasks than
    DataComp's is not comparable with its tables, and the count says so.
    """
    requested = list(requested) if requested is not None else list(TASKS)
    unknown = sorted(set(results) - {t.name for t in requested})
    if unknown:
        raise ValueError(f"results name unknown tasks: {', '.join(unknown)}")
    out: dict = {}
    for group in GROUPS:
        if group == OTHER:
            continue
        values = [results[t.name] for t in requested if t.group == group and t.name in results]
        out[group] = float(np.mean(values)) if values else None
    out["Average"] = float(np.mean(list(results.values()))) if results else None
    out["available"] = f"{sum(t.name in results for t in requested)}/{len(requested)}"
    out["missing"] = [t.name for t in requested if t.name not in results]
    return out


def read_results(path: str | os.PathLike) -> dict[str, float]:
    """Main metrics by task name from an ``eval_results.jsonl`` (DataComp's format: one JSON per
    line with ``dataset`` and ``metrics.main_metric``; null main metrics are skipped)."""
    results = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            value = row.get("metrics", {}).get("main_metric")
            if value is not None and row.get("dataset") in BY_NAME:
                results[row["dataset"]] = float(value)
    return results
