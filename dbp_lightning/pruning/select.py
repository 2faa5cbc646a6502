"""Which samples to keep: DBP (quotas per cluster), SSP-Pruning and random, all hardest-first."""

from __future__ import annotations

import numpy as np

from .groups import cluster_index
from .quotas import quota_bounds


def _check_target(target: int, n: int) -> int:
    target = int(target)
    if not 0 < target <= n:
        raise ValueError(f"target={target} must be in [1, {n}] (the samples in the pool)")
    return target


def dbp_select(sim_to_centroid: np.ndarray, assignment: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """Keep, in each cluster j, the ``quotas[j]`` members least similar to the centroid.

    Args:
        sim_to_centroid: float (N,) cosine similarity of each sample to its centroid.
        assignment: int (N,) cluster of each sample, in [0, k).
        quotas: int (k,) samples to keep per cluster, 0 <= quotas[j] <= cluster size.

    Returns:
        bool (N,) keep mask with ``quotas.sum()`` True values. Ties in similarity are broken by
        row order (earlier rows are kept first).
    """
    quotas = np.asarray(quotas, dtype=np.int64)
    index = cluster_index(assignment, sim_to_centroid, k=len(quotas))
    if (quotas < 0).any() or (quotas > index.sizes).any():
        j = int(np.flatnonzero((quotas < 0) | (quotas > index.sizes))[0])
        raise ValueError(f"quota {int(quotas[j])} of cluster {j} is outside [0, {int(index.sizes[j])}]")
    return index.rank() < quotas[np.asarray(assignment)]


def ssp_select(sim_to_centroid: np.ndarray, assignment: np.ndarray, target: int,
               balance_ratio: float = 1.0, num_clusters: int | None = None) -> np.ndarray:
    """SSP-Pruning (Sorscher et al. 2022) with self-supervised prototypes: keep the hardest.

    Each non-empty cluster first keeps its min(M_j, floor(balance_ratio * target / k'))
    members least similar to the centroid (the fixed cluster balancing score; the paper's SSP
    baseline uses 1.0). The remaining slots go to the least prototypical samples of the whole
    pool, whatever their cluster.

    Args:
        sim_to_centroid: float (N,) cosine similarity of each sample to its centroid.
        assignment: int (N,) cluster of each sample.
        target: samples to keep, 1 <= target <= N.
        balance_ratio: in [0, 1]; 0 keeps the globally hardest samples.
        num_clusters: k (default ``assignment.max() + 1``).

    Returns:
        bool (N,) keep mask with exactly ``target`` True values.
    """
    sim_to_centroid = np.asarray(sim_to_centroid)
    target = _check_target(target, len(sim_to_centroid))
    index = cluster_index(assignment, sim_to_centroid, k=num_clusters)
    floor_quota, _ = quota_bounds(index.sizes, target, min_per_cluster=0, balance_ratio=balance_ratio)
    keep = index.rank() < floor_quota[np.asarray(assignment)]
    rest = target - int(keep.sum())
    candidates = np.flatnonzero(~keep)
    hardest = candidates[np.argsort(sim_to_centroid[candidates], kind="stable")[:rest]]
    keep[hardest] = True
    return keep


def random_select(n: int, target: int, seed: int = 0) -> np.ndarray:
    """Keep ``target`` of ``n`` samples uniformly at random. bool (n,), deterministic in seed."""
    target = _check_target(target, n)
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, target, replace=False)] = True
    return keep
