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

from .backend import Backend, resolve_backend, torch_earlier_top2
from .collective import Local, owners
from .embeddings import as_embeddings
from . import exact
from .exact import SLACK, dot_bound, exact_argmax, first_twin, max_norm, row_sims, top2_update
from .groups import cluster_index

#: duplicate similarity of a cluster's first-ranked member (nothing ranked before it).
NO_EARLIER = -1.0


def duplicate_similarity(x, assignment, sim_to_centroid: np.ndarray, block_size: int = 4096,
                         progress: bool = False, return_partner: bool = False, comm=None,
                         backend: str | Backend = "auto"):
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
        backend: "auto", "faiss" or "torch": where the block similarities run
            (:mod:`.backend`: faiss means NumPy's BLAS here); the result is the same bytes.

    Returns:
        float32 (N,), in [-1, 1]: the exact dot product, rounded (:mod:`.exact`), so the same on
        every CPU and thread count; ``NO_EARLIER`` (-1.0) for each cluster's first member. With
        ``return_partner``, a tuple (that array, int64 (N,) partner row, -1 where no member is
        ranked before the row in any partition; ties go to the earliest-ranked member, and across
        partitions to the first partition giving the maximum).
    """
    emb = as_embeddings(x)
    if not isinstance(assignment, np.ndarray) or assignment.ndim == 2:
        per_part = [duplicate_similarity(emb, a, sim_to_centroid, block_size, progress, True, comm,
                                         backend) for a in assignment]
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
    backend = resolve_backend(backend, "auto", comm.local_rank)
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
    not_before = np.triu(np.ones((block_size, block_size), bool))  # [j, i]: i not ranked before j
    for c in tqdm(np.flatnonzero(mine), disable=not progress, desc="semdedup",
                  unit="cluster", leave=False):
        rows = index.members(c)
        xc = emb.take(rows)  # the cluster's rows: memory grows with the largest cluster
        arg = _earlier_nearest(xc, block_size, not_before, backend)
        has = arg >= 0
        out[rows[has]] = row_sims(xc[has], xc[arg[has]])
        partner[rows] = np.where(has, rows[np.maximum(arg, 0)], -1)
    out = np.maximum(comm.reduce_max(out), NO_EARLIER)  # also a singleton's NO_EARLIER
    partner = comm.reduce_max(partner)
    return (out, partner) if return_partner else out


def _earlier_nearest(xc: np.ndarray, block_size: int, not_before: np.ndarray,
                     backend: Backend = Backend("faiss", "cpu")) -> np.ndarray:
    """int64 (M,): for each member of a cluster (rows ``xc``, float32 (M, d), in rank order),
    the position of the earlier member with the largest exact dot product, the earliest on ties;
    -1 for the first member.

    float32 blocks (the fast, threaded matmul) give each row its best and second-best estimate;
    where they are more than twice the float32 error bound apart the best is certain whatever
    kernel summed them. The other rows (near-ties and identical vectors: 0.31 % of the rows of
    ``benchmarks/bench_exact.py``'s pool) are decided by :func:`~.exact.exact_argmax`.
    """
    if backend.kind == "torch":
        best, second, arg = torch_earlier_top2(xc, block_size, backend.device)
    else:
        best, second, arg = _earlier_top2(xc, block_size, not_before)
    norm = max_norm(xc)
    margin = 2 * dot_bound(xc.shape[1], norm, norm, np.float32) + SLACK
    unsure = np.flatnonzero((best > -np.inf) & (second >= best.astype(np.float64) - margin))
    if unsure.size:
        arg[unsure] = exact_argmax(xc[unsure], xc, before=unsure, twin=first_twin(xc),
                                   block_size=block_size)
    return arg


def _earlier_top2(xc: np.ndarray, block_size: int, not_before: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 best, second best and int64 position of the best earlier member of each row
    of ``xc``, from NumPy's threaded float32 matmul, block by block."""
    m = len(xc)
    best = np.full(m, -np.inf, np.float32)
    second = np.full(m, -np.inf, np.float32)
    arg = np.full(m, -1, np.int64)
    for js in range(0, m, block_size):
        xj = xc[js : js + block_size]
        n_j = len(xj)
        bj, sj, aj = best[js : js + n_j], second[js : js + n_j], arg[js : js + n_j]  # views
        for is_ in range(0, js + n_j, block_size):
            sims = exact.gemm32(xj, xc[is_ : is_ + block_size])
            if is_ == js:  # diagonal block: only members ranked strictly before count (-inf, not
                # NO_EARLIER, so that an earlier member at exactly -1.0 is still a partner)
                sims[not_before[:n_j, :n_j]] = -np.inf
            top2_update(bj, sj, aj, sims, is_)
    return best, second, arg


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
             progress: bool = False, backend: str | Backend = "auto") -> np.ndarray:
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
        backend: "auto", "faiss" or "torch" (:func:`duplicate_similarity`).

    Returns:
        bool (N,) keep mask.
    """
    if (eps is None) == (target_fraction is None):
        raise ValueError("give exactly one of eps and target_fraction")
    if eps is not None and not 0.0 < eps < 2.0:
        raise ValueError(f"eps must be in (0, 2), got {eps}")
    dup_sim = duplicate_similarity(x, assignment, sim_to_centroid, block_size, progress,
                                   backend=backend)
    threshold = 1.0 - eps if eps is not None else threshold_for_fraction(dup_sim, target_fraction)
    return dup_sim <= threshold
