"""CLIP-score filtering: keep image-text pairs whose CLIP similarity is high enough."""

from __future__ import annotations

import numpy as np


def clip_score_filter(scores: np.ndarray, threshold: float | None = None,
                      fraction: float | None = None) -> np.ndarray:
    """Keep mask from CLIP image-caption similarities.

    Args:
        scores: float (N,) cosine similarity of each sample's image and caption embeddings,
            from a CLIP model or a metadata column (LAION ``similarity``, DataComp
            ``clip_l14_similarity_score``).
        threshold: keep ``scores >= threshold`` (LAION-400M used 0.3 with OpenAI B/32).
        fraction: keep the ``round(fraction * N)`` highest scores (DataComp keeps 0.3-0.5);
            ties at the cut are broken by row order, so the count is exact.
            Give exactly one of threshold and fraction.

    Returns:
        bool (N,) keep mask.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if (threshold is None) == (fraction is None):
        raise ValueError("give exactly one of threshold and fraction")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} CLIP scores are missing, NaN or inf (first at row "
                         f"{int(np.argmax(bad))}); score or drop those samples first")
    if threshold is not None:
        return scores >= threshold
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n_keep = max(1, int(round(fraction * len(scores)))) if len(scores) else 0
    keep = np.zeros(len(scores), bool)
    # stable sort of -scores: highest first, earlier rows first among equals.
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return keep
