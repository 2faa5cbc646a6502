"""Cluster-sorted index: every cluster's members, ranked, from one sort of the whole table.

Per-cluster stages (SemDeDup, DBP and SSP selection) iterate clusters through this index instead
of scanning the assignment array once per cluster, which would cost O(N * k).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ClusterIndex(NamedTuple):
    """Members of each cluster, least similar to the centroid first.

    Attributes:
        order: int64 (N,): row indices sorted by (cluster, similarity to centroid ascending,
            row index); the row index breaks ties so the order is deterministic.
        starts: int64 (k + 1,): cluster ``c`` occupies ``order[starts[c]:starts[c + 1]]``.
    """

    order: np.ndarray
    starts: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """int64 (k,): members per cluster."""
        return np.diff(self.starts)

    def members(self, cluster: int) -> np.ndarray:
        """int64 (M_c,): rows of ``cluster``, least similar to its centroid first."""
        return self.order[self.starts[cluster] : self.starts[cluster + 1]]

    def rank(self) -> np.ndarray:
        """int64 (N,): each row's 0-based rank inside its cluster (0 = least prototypical)."""
        rank = np.empty(len(self.order), np.int64)
        cluster_of_position = np.repeat(np.arange(len(self.starts) - 1), self.sizes)
        rank[self.order] = np.arange(len(self.order)) - self.starts[cluster_of_position]
        return rank


def cluster_index(assignment: np.ndarray, similarity: np.ndarray | None, k: int | None = None,
                  rows: np.ndarray | None = None) -> ClusterIndex:
    """Build the :class:`ClusterIndex` of ``assignment`` ranked by ``similarity``.

    Args:
        assignment: int (N,) cluster of each row, in [0, k).
        similarity: float (N,) cosine similarity of each row to its cluster's centroid; None
            ranks members by row alone (a grouping, as the two-level partition needs).
        k: number of clusters (default ``assignment.max() + 1``); clusters with no member
            get an empty range.
        rows: optional int64 (M,) increasing row indices: index only these rows (a rank's
            share of the clusters); ``order`` then holds global row indices, and each cluster's
            members come in the same order as in the index of all N rows.
    """
    assignment = np.asarray(assignment)
    ranked = similarity is not None
    if ranked:
        similarity = np.asarray(similarity)
    if assignment.ndim != 1 or (ranked and similarity.shape != assignment.shape):
        raise ValueError(f"assignment and similarity must be 1-D of equal length, got "
                         f"{assignment.shape} and {getattr(similarity, 'shape', None)}")
    if assignment.size and assignment.min() < 0:
        raise ValueError("assignment has negative cluster ids")
    k = int(assignment.max()) + 1 if k is None and assignment.size else int(k or 0)
    if assignment.size and assignment.max() >= k:
        raise ValueError(f"assignment has cluster id {int(assignment.max())} >= k={k}")
    if rows is not None:
        assignment = assignment[rows]
        similarity = similarity[rows] if ranked else None
    # stable sorts: cluster, then similarity, then row (increasing ``rows`` keep that tie-break);
    # lexsort sorts by the last key first
    order = (np.lexsort((similarity, assignment)) if ranked
             else np.argsort(assignment, kind="stable")).astype(np.int64, copy=False)
    if rows is not None:
        order = np.asarray(rows, dtype=np.int64)[order]
    starts = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(assignment, minlength=k), out=starts[1:])
    return ClusterIndex(order, starts)
