"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540) inside precomputed clusters, block by block.

Definition (that of SemDeDup's public code, which the paper's eps -> kept-fraction figures come
from): inside each cluster, rank members by similarity to the centroid, least similar
(farthest) first. A member's *duplicate similarity* is its largest cosine similarity to any
member ranked before it (-1.0 for the first member). A member is removed when its duplicate
similarity exceeds ``1 - eps``. So in a group of near-duplicates the member farthest from the
centroid survives. Because removal depends on eps only through that one number per member, the
eps that keeps a target fraction is a quantile of the duplicate similarities, found exactly
rather than by repeated dedup passes.

Several partitions: k-means boundaries cut through dense regions, and a near-duplicate pair
that straddles one is never compared. Given several partitions (k-means runs with different
seeds), a member is compared with every member ranked before it that shares a cell with it in
*any* partition; the ranking stays that of the first partition's centroid similarity, so the
least prototypical member of a group still survives. With one partition this is exactly the
definition above. Two partitions find the pairs one partition splits at twice the dedup cost
(``benchmarks/bench_prune.py``), where the public recipe instead runs 100 k-means iterations
and still misses them.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .collective import Local, owners
from .embeddings import as_embeddings
from .groups import cluster_index

#: duplicate similarity of a cluster's first-ranked member (nothing ranked before it).
NO_EARLIER = -1.0


def duplicate_similarity(x, assignment, sim_to_centroid: np.ndarray, block_size: int = 4096,
                         progress: bool = False, return_partner: bool = False, comm=None):
    """Each row's largest cosine similarity to a member of its cluster ranked before it.

    Args:
        x: (N, d) embeddings (array, memmap or Embeddings).
        assignment: int (N,) cluster of each row, or a sequence of such partitions: then the
            maximum over partitions (see the module docstring).
        sim_to_centroid: float (N,) similarity to the (first partition's) centroid: the
            ranking key, least similar first, ties by row.
        block_size: rows per similarity block; at most block_size**2 similarities exist at once,
            never a full M x M matrix for a cluster larger than the block.
        return_partner: also return each row's *partner*, the earlier-ranked member that gives
            its duplicate similarity.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: the ranks split the
            clusters (balanced by pairs, M**2) and every rank gets all N results.

    Returns:
        float32 (N,), in [-1, 1]; ``NO_EARLIER`` (-1.0) for each cluster's first member. With
        ``return_partner``, a tuple (that array, int64 (N,) partner row, -1 where no member is
        ranked before the row in any partition; ties go to the earliest-ranked member, and across
        partitions to the first partition giving the maximum).
    """
    emb = as_embeddings(x)
    if not isinstance(assignment, np.ndarray) or assignment.ndim == 2:
        per_part = [duplicate_similarity(emb, a, sim_to_centroid, block_size, progress, True, comm)
                    for a in assignment]
        sims = np.stack([s for s, _ in per_part])
        best = sims.argmax(axis=0)  # first partition on ties
        cols = np.arange(sims.shape[1])
        out = sims[best, cols]
        partner = np.stack([p for _, p in per_part])[best, cols]
        return (out, partner) if return_partner else out
    if len(assignment) != emb.n:
        raise ValueError(f"assignment has {len(assignment)} rows, embeddings have {emb.n}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if assignment.size and assignment.min() < 0:
        raise ValueError("assignment has negative cluster ids")
    comm = comm or Local()
    sizes = np.bincount(assignment)
    owner = owners(sizes.astype(np.float64) ** 2, comm.world_size)
    mine = (owner == comm.rank) & (sizes > 1)
    if comm.world_size == 1:
        index = cluster_index(assignment, sim_to_centroid, len(sizes))
    else:  # sort only this rank's clusters' rows
        index = cluster_index(assignment, sim_to_centroid, len(sizes),
                              rows=np.flatnonzero(mine[assignment]))
    # rows another rank handles hold max's identity until the reduction fills them in
    out = np.full(emb.n, -np.inf, np.float32)
    partner = np.full(emb.n, -1, np.int64)
    # -inf, not NO_EARLIER, masks the diagonal block so that an earlier member at exactly -1.0
    # still counts as a partner; the returned values are clipped to NO_EARLIER as before
    later = np.tril(np.ones((block_size, block_size), bool), k=-1)  # [j, i]: i ranked before j
    for c in tqdm(np.flatnonzero(mine), disable=not progress, desc="semdedup",
                  unit="cluster", leave=False):
        rows = index.members(c)
        xc = emb.take(rows)  # the cluster's rows: memory grows with the largest cluster
        best = np.full(len(rows), -np.inf, np.float32)
        arg = np.full(len(rows), -1, np.int64)  # position in ``rows``
        for js in range(0, len(rows), block_size):
            xj = xc[js : js + block_size]
            bj, aj = best[js : js + len(xj)], arg[js : js + len(xj)]  # views
            for is_ in range(0, js + len(xj), block_size):
                sims = xj @ xc[is_ : is_ + block_size].T
                if is_ == js:  # diagonal block: only members ranked strictly before count
                    sims = np.where(later[: len(xj), : len(xj)], sims, -np.inf)
                col = sims.argmax(axis=1)  # earliest-ranked on ties
                top = sims[np.arange(len(xj)), col]
                better = top > bj  # strict: an earlier block keeps its tie
                bj[better], aj[better] = top[better], is_ + col[better]
        out[rows] = best
        partner[rows] = np.where(arg >= 0, rows[np.maximum(arg, 0)], -1)
    out = np.maximum(comm.reduce_max(out), NO_EARLIER)  # also a singleton's NO_EARLIER
    partner = comm.reduce_max(partner)
    return (out, partner) if return_partner else out


def threshold_for_fraction(dup_sim: np.ndarray, target_fraction: float) -> float:
    """The similarity threshold that keeps ``round(target_fraction * N)`` rows.

    Rows with ``dup_sim <= threshold`` are kept; ``eps = 1 - threshold``. The kept count is
    exact unless rows tie at the threshold.
    """
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    n_keep = max(1, int(round(target_fraction * len(dup_sim))))
    if n_keep >= len(dup_sim):
        return float("inf")  # float32 similarities of exact duplicates can exceed 1.0
    return float(np.partition(dup_sim, n_keep - 1)[n_keep - 1])


def semdedup(x, assignment: np.ndarray, sim_to_centroid: np.ndarray, eps: float | None = None,
             target_fraction: float | None = None, block_size: int = 4096,
             progress: bool = False) -> np.ndarray:
    """SemDeDup keep mask inside the given clusters.

    Args:
        x: (N, d) embeddings (array, memmap or Embeddings).
        assignment: int (N,) cluster of each row (from :func:`spherical_kmeans`), or a
            sequence of partitions (k-means with different seeds) searched together.
        sim_to_centroid: float (N,) cosine similarity of each row to its (first partition's)
            centroid; the farthest member of a near-duplicate group survives.
        eps: remove rows whose duplicate similarity exceeds ``1 - eps``; in (0, 2).
        target_fraction: instead of eps, keep this fraction of rows (within rounding, exact
            unless duplicate similarities tie). Give exactly one of eps and target_fraction.

    Returns:
        bool (N,) keep mask.
    """
    if (eps is None) == (target_fraction is None):
        raise ValueError("give exactly one of eps and target_fraction")
    if eps is not None and not 0.0 < eps < 2.0:
        raise ValueError(f"eps must be in (0, 2), got {eps}")
    dup_sim = duplicate_similarity(x, assignment, sim_to_centroid, block_size, progress)
    threshold = 1.0 - eps if eps is not None else threshold_for_fraction(dup_sim, target_fraction)
    return dup_sim <= threshold
