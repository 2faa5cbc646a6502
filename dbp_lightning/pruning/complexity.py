"""Cluster complexity of DBP (paper Sec. 3): C_j = d_inter,j * d_intra,j."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .embeddings import as_embeddings
from .exact import pair_sims, row_sims, row_sums_in_order


#: centroids per block of the centroid-centroid similarities (memory: _BLOCK x k float64)
_BLOCK = 1024


class ClusterComplexity(NamedTuple):
    """Per-cluster distances, float64 (k,), cosine distances (1 - cos) in [0, 2].

    Attributes:
        d_intra: mean distance of the members to their centroid; 0.0 for an empty cluster,
            which :func:`dbp_quotas` excludes through its size of 0.
        d_inter: mean distance of the centroid to its ``num_neighbors`` nearest other centroids.
        sizes: int64 members per cluster.
    """

    d_intra: np.ndarray
    d_inter: np.ndarray
    sizes: np.ndarray

    @property
    def complexity(self) -> np.ndarray:
        """float64 (k,): C_j = d_inter,j * d_intra,j."""
        return self.d_inter * self.d_intra


def cluster_complexity(x, centroids: np.ndarray, assignment: np.ndarray,
                       num_neighbors: int = 20, similarity: np.ndarray | None = None
                       ) -> ClusterComplexity:
    """d_intra and d_inter exactly as the paper defines them.

    Args:
        x: (N, d) embeddings (array, memmap or Embeddings).
        centroids: float (k, d) unit-norm centroids.
        assignment: int (N,) cluster of each row, in [0, k).
        num_neighbors: l, the nearest other centroids averaged in d_inter (paper: 20); needs
            k > l.
        similarity: optional float (N,) cosine similarity of each row to its centroid, as
            :func:`spherical_kmeans` returns it; saves one pass over ``x``.

    Returns:
        :class:`ClusterComplexity`.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k = len(centroids)
    assignment = np.asarray(assignment, dtype=np.int64)
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
    if k <= num_neighbors:
        raise ValueError(f"num_neighbors={num_neighbors} nearest other centroids need k > "
                         f"{num_neighbors} clusters, got k={k}")
    if assignment.size and (assignment.min() < 0 or assignment.max() >= k):
        raise ValueError(f"assignment must lie in [0, k={k})")
    if similarity is None:
        emb = as_embeddings(x)
        if emb.d != centroids.shape[1]:
            raise ValueError(f"embeddings have d={emb.d}, centroids d={centroids.shape[1]}")
        similarity = np.empty(emb.n, np.float64)
        for start, block in emb.blocks():
            c = centroids[assignment[start : start + len(block)]]
            similarity[start : start + len(block)] = row_sims(block, c)
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.shape != assignment.shape:
        raise ValueError(f"similarity has shape {similarity.shape}, assignment {assignment.shape}")

    sizes = np.bincount(assignment, minlength=k).astype(np.int64)
    dist_sum = np.bincount(assignment, weights=1.0 - similarity, minlength=k)
    d_intra = np.divide(dist_sum, sizes, out=np.zeros(k), where=sizes > 0)

    d_inter = np.empty(k)
    for lo in range(0, k, _BLOCK):
        sims = pair_sims(centroids[lo : lo + _BLOCK], centroids)  # exactly rounded: any kernel
        sims[np.arange(len(sims)), np.arange(lo, lo + len(sims))] = -np.inf  # not itself
        nearest = -np.partition(-sims, num_neighbors - 1, axis=1)[:, :num_neighbors]
        distances = 1.0 - np.sort(nearest.astype(np.float64))
        d_inter[lo : lo + len(sims)] = row_sums_in_order(distances) / num_neighbors
    return ClusterComplexity(d_intra, d_inter, sizes)


