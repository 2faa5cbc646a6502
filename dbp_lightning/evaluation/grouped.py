"""DataComp's WILDS and fairness metrics, from logits, labels and per-sample metadata.

These tasks carry a ``.npy`` metadata vector per sample next to ``.cls``; DataComp groups by
one of its columns (WILDS' groupers) and reports the worst group. NumPy in, NumPy out.
"""

from __future__ import annotations

import numpy as np


def _topk_correct(logits: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == target[:, None]).any(axis=1)


def worst_group(correct: np.ndarray, groups: np.ndarray) -> float:
    """The lowest per-group mean of ``correct`` over the groups present (WILDS skips empty ones)."""
    return float(min(correct[groups == g].mean() for g in np.unique(groups)))


def macro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """F1 averaged over the classes present in ``target`` (WILDS' F1 with average="macro")."""
    from sklearn.metrics import f1_score

    return float(f1_score(target, pred, average="macro", labels=np.unique(target)))


def grouped_metrics(key: str, logits: np.ndarray, target: np.ndarray, metadata: np.ndarray) -> dict:
    """Metrics of one WILDS / fairness task: always ``acc1``, plus the task's main metric.

    Args:
        key: the DataComp key (wilds/iwildcam, wilds/camelyon17, wilds/fmow,
            fairness/dollar_street, fairness/geode).
        logits: float (N, C); target: int (N,); metadata: int (N, F), column 0 the grouping field
            (iWildCam location, FMoW region, Dollar Street income group, GeoDE region).
    """
    logits, target, metadata = np.asarray(logits), np.asarray(target), np.asarray(metadata)
    pred = logits.argmax(axis=1)
    correct = pred == target
    out = {"acc1": float(correct.mean())}
    if key == "wilds/iwildcam":
        out["F1-macro_all"] = macro_f1(pred, target)
    elif key == "wilds/fmow":
        # DataComp means to skip the "Other" region, but its grouper names groups "region:5",
        # so the check never matches and its published numbers include Other: so do we
        out["acc_worst_region"] = worst_group(correct, metadata[:, 0])
    elif key == "fairness/dollar_street":
        out["acc_top5_wg"] = worst_group(_topk_correct(logits, target, 5), metadata[:, 0])
    elif key == "fairness/geode":
        out["acc_wg"] = worst_group(correct, metadata[:, 0])
    elif key != "wilds/camelyon17":
        raise ValueError(f"no grouped metric for task {key!r}")
    return out
