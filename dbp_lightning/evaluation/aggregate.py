"""DataComp's aggregate scores: ImageNet, group means, and the average over the 38 tasks."""

from __future__ import annotations

import json
import os

import numpy as np

from .tasks import BY_NAME, GROUPS, OTHER, TASKS

DATACOMP_NAMES = frozenset(t.name for t in TASKS)


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
        out.setdefault("group_counts", {})[group] = [len(values), sum(t.group == group for t in TASKS)]
    out["Average"] = float(np.mean(list(results.values()))) if results else None
    out["available"] = f"{sum(t.name in results for t in requested)}/{len(requested)}"
    out["missing"] = [t.name for t in requested if t.name not in results]
    out["tasks"] = len(results)
    out["datacomp_tasks"] = sum(name in DATACOMP_NAMES for name in results)
    return out


def label(group: str, summary: dict) -> str:
    """How many tasks a mean of :func:`aggregate` covers, in its name: "Average" only over all
    of DataComp's 38, else "Average over 12 of 38 tasks" (or "over 3 tasks" outside DataComp's);
    a group likewise ("VTAB, 3 of 14 tasks")."""
    if group != "Average":
        have, of = summary.get("group_counts", {}).get(group, (0, 0))
        return group if have == of else f"{group}, {have} of {of} tasks"
    n, n38 = summary.get("tasks", 0), summary.get("datacomp_tasks", 0)
    if n == n38:
        return "Average" if n38 == len(TASKS) else f"Average over {n38} of {len(TASKS)} tasks"
    return f"Average over {n} tasks" + (f" ({n38} of DataComp's {len(TASKS)})" if n38 else "")


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
