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

import contextlib
import functools
import itertools

import numpy as np
from tqdm.auto import tqdm

from .backend import Backend, resolve_backend, torch_earlier_top2
from .collective import Local, owners
from .embeddings import as_embeddings
from . import exact, kmeans
from .exact import SLACK, dot_bound, exact_argmax, row_sims, top2_update
from .groups import cluster_index
from .scratch import (DEFAULT_MEMORY_BYTES, held_rows, run_bounds, run_rows, scratch_bytes,
                      sort_rows, sorted_runs)
from .threads import on_all_cores, workers

#: duplicate similarity of a cluster's first-ranked member (nothing ranked before it).
NO_EARLIER = -1.0


def duplicate_similarity(x, assignment, sim_to_centroid: np.ndarray, block_size: int = 4096,
                         progress: bool = False, return_partner: bool = False, comm=None,
                         backend: str | Backend = "auto",
                         memory_bytes: int = DEFAULT_MEMORY_BYTES,
                         scratch_dir: str | None = None):
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
        memory_bytes: working memory. A cell whose float32 rows (and stored rows) fit in a
            quarter of it is held whole: such cells are read in runs of whole cells, each
            run's stored rows a quarter of the budget at most (:func:`~.scratch.sorted_runs`:
            one scatter to ``scratch_dir``, but for the first run, unless they all fit in
            memory). Held cells within a quarter of a worker's share of it (the budget over
            :func:`~.threads.workers`) go to every core at once, the others one at a time.
            Larger cells are sorted into rank order on disk (:func:`~.scratch.sort_rows`) and
            read block by block. Similarity blocks are at most ``block_size`` rows and fit in
            an eighth of it (of a worker's share, on every core).
        scratch_dir: where the sorted rows go (None: ``$TMPDIR``); needs the rows' stored bytes.

    Returns:
        float32 (N,), in [-1, 1]: the exact dot product, rounded (:mod:`.exact`), so the same on
        every CPU and thread count; ``NO_EARLIER`` (-1.0) for each cluster's first member. With
        ``return_partner``, a tuple (that array, int64 (N,) partner row, -1 where no member is
        ranked before the row in any partition; ties go to the earliest-ranked member, and across
        partitions to the first partition giving the maximum).
    """
    emb = as_embeddings(x)
    if not isinstance(assignment, np.ndarray) or assignment.ndim == 2:
        out = partner = None
        for a in assignment:
            out, partner = _keep_max(out, partner, *duplicate_similarity(
                emb, a, sim_to_centroid, block_size, progress, True, comm, backend, memory_bytes,
                scratch_dir))
        return (out, partner) if return_partner else out
    if len(assignment) != emb.n:
        raise ValueError(f"assignment has {len(assignment)} rows, embeddings have {emb.n}")
    if block_size < 1 or memory_bytes < 1:
        raise ValueError(f"block_size and memory_bytes must be >= 1, got {block_size} and "
                         f"{memory_bytes}")
    if assignment.size and assignment.min() < 0:
        raise ValueError("assignment has negative cluster ids")
    comm = comm or Local()
    backend = resolve_backend(backend, "auto", comm.local_rank)
    sizes = np.bincount(assignment)
    owner = owners(sizes.astype(np.float64) ** 2, comm.world_size)
    mine = (owner == comm.rank) & (sizes > 1)
    threads = _workers(backend)
    whole_budget = _blocks(block_size, memory_bytes, emb.d)
    # rows another rank handles hold max's identity until the reduction fills them in
    out = np.full(emb.n, -np.inf, np.float32)
    partner = np.full(emb.n, -1, np.int64)
    run = run_rows(emb.d, emb.x.dtype, memory_bytes)
    held = mine & (sizes <= min(whole_budget[2], run))
    with tqdm(total=int(mine.sum()), disable=not progress, desc="semdedup", unit="cluster",
              leave=False) as bar:
        # cells held whole: sorted in runs of cells, each run read once and visited in memory
        index = cluster_index(assignment, sim_to_centroid, len(sizes),
                              rows=np.flatnonzero(held[assignment]))
        cells = np.flatnonzero(held)
        firsts = index.starts[cells]
        runs = sorted_runs(emb, index.order, run_bounds(index.starts, run), memory_bytes,
                           scratch_dir, progress)
        with contextlib.closing(runs), on_all_cores(threads) as pmap:
            for lo, hi, raw, rank in runs:

                def visit(c, blocks, lo=lo, raw=raw, rank=rank):
                    a, b = int(index.starts[c]), int(index.starts[c + 1])
                    rows = index.order[a:b]
                    xc = emb._finish(raw[rank[a - lo : b - lo]])  # gathered: a new array
                    return rows, _cell_duplicates(xc, rows, *blocks[:2], backend, emb.norm_bound)

                run_cells = cells[np.searchsorted(firsts, lo) : np.searchsorted(firsts, hi)]
                for rows, (sims, partners) in _visit_cells(
                        pmap, visit, run_cells, sizes[run_cells], block_size, memory_bytes,
                        emb.d, threads):
                    out[rows], partner[rows] = sims, partners
                    bar.update()
        # cells too large to hold: sorted into rank order on disk, read block by block
        block_size, not_before, _ = whole_budget
        large = mine & ~held
        index = cluster_index(assignment, sim_to_centroid, len(sizes),
                              rows=np.flatnonzero(large[assignment]))
        with (sort_rows(emb, index.order, memory_bytes, scratch_dir, progress) if large.any()
              else contextlib.nullcontext()) as ranked:
            for c in np.flatnonzero(large):
                lo, hi = int(index.starts[c]), int(index.starts[c + 1])
                rows = index.order[lo:hi]
                out[rows], partner[rows] = _cell_duplicates(ranked.range(lo, hi), rows,
                                                            block_size, not_before, backend,
                                                            emb.norm_bound)
                bar.update()
    out = np.maximum(comm.reduce_max(out), NO_EARLIER)  # also a singleton's NO_EARLIER
    partner = comm.reduce_max(partner)
    return (out, partner) if return_partner else out


def semdedup_passes(x, k: int, passes: int = 2, niter: int = 10, seed: int = 0,
                    sample: int | None = None, block_size: int = 4096, progress: bool = False,
                    comm=None, backend: str | Backend = "auto",
                    memory_bytes: int = DEFAULT_MEMORY_BYTES, scratch_dir: str | None = None):
    """SemDeDup's partitions and its duplicate similarities over all of them, in one pass each.

    Partition ``p`` is :func:`~.kmeans.partition_kmeans` with ``seed + p``. In two levels (above
    ``FLAT_MAX_K`` cells) every fine cell lies inside one coarse cell, so each coarse cell's
    duplicates are found while its rows are held for its split (:func:`group_duplicates`): the
    pool is sorted once per partition, not twice. A flat partition goes through
    :func:`duplicate_similarity`. The result is that of ``duplicate_similarity`` on the same
    partitions, bit for bit.

    Args:
        x: (N, d) embeddings (array, memmap or Embeddings).
        k, niter, sample: the dedup partition's cells, iterations and training rows.
        passes: partitions searched together (the module docstring).
        seed, block_size, progress, comm, backend, memory_bytes, scratch_dir: as
            :func:`duplicate_similarity` and :func:`~.kmeans.partition_kmeans`.

    Returns:
        (the first partition's :class:`~.kmeans.KMeansResult`, float32 (N,) duplicate
        similarity, int64 (N,) partner row), as :func:`duplicate_similarity` with
        ``return_partner``.
    """
    if passes < 1 or block_size < 1 or memory_bytes < 1:
        raise ValueError(f"passes, block_size and memory_bytes must be >= 1, got {passes}, "
                         f"{block_size} and {memory_bytes}")
    emb = as_embeddings(x)
    comm = comm or Local()
    backend = resolve_backend(backend, "auto", comm.local_rank)
    first = best = partner = None
    for p in range(passes):
        found = np.full(emb.n, -np.inf, np.float32)  # max's identity for other ranks' rows
        found_partner = np.full(emb.n, -1, np.int64)

        def visit(members, rows, cells, similarity):
            key = similarity if first is None else first.similarity[members]
            found[members], found_partner[members] = group_duplicates(
                emb, members, rows, cells, key, block_size, backend, memory_bytes, scratch_dir)

        part = kmeans.partition_kmeans(emb, k, niter=niter, seed=seed + p, sample=sample,
                                       progress=progress, comm=comm, backend=backend,
                                       memory_bytes=memory_bytes, scratch_dir=scratch_dir,
                                       visit=visit)
        if first is None:
            first = part
        if k > kmeans.FLAT_MAX_K:
            found = np.maximum(comm.reduce_max(found), NO_EARLIER)
            found_partner = comm.reduce_max(found_partner)
        else:
            found, found_partner = duplicate_similarity(
                emb, part.assignment, first.similarity, block_size, progress, True, comm,
                backend, memory_bytes, scratch_dir)
        best, partner = _keep_max(best, partner, found, found_partner)
    return first, best, partner


def _keep_max(best, partner, found: np.ndarray, found_partner: np.ndarray):
    """Fold one partition's similarities and partners into the running maximum (in place);
    the first partition giving the maximum keeps it."""
    if best is None:
        return found, found_partner
    better = found > best
    best[better], partner[better] = found[better], found_partner[better]
    return best, partner


def group_duplicates(emb, members: np.ndarray, rows, cells: np.ndarray, key: np.ndarray,
                     block_size: int = 4096, backend: Backend = Backend("faiss", "cpu"),
                     memory_bytes: int = DEFAULT_MEMORY_BYTES, scratch_dir: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Duplicate similarities inside every cell of a group of cells whose rows are at hand.

    Args:
        emb: the pool's :class:`~.embeddings.Embeddings` (for reading ``rows`` in blocks).
        members: int64 (M,) the group's rows, increasing.
        rows: their float32 (M, d) rows: an array, or a :class:`~.scratch.RowRange` too large
            to hold (then the group is sorted once more, into cell and rank order, so that each
            cell is one contiguous read).
        cells: int (M,) each member's cell; key: float (M,) its ranking key (least first).
        block_size, backend, memory_bytes, scratch_dir: as :func:`duplicate_similarity`.

    Returns:
        float32 (M,) similarity to the partner (-inf for a cell's first member) and int64 (M,)
        partner row (-1), as :func:`duplicate_similarity` gives them for these rows.
    """
    block_size, not_before, whole = _blocks(block_size, memory_bytes, emb.d)
    local = np.lexsort((key, cells))  # cell, then key, then row (members increase)
    cuts = np.flatnonzero(np.diff(cells[local])) + 1
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(local)]])
    several = stops - starts > 1
    sims = np.full(len(members), -np.inf, np.float32)
    partner = np.full(len(members), -1, np.int64)
    if isinstance(rows, np.ndarray):

        def visit(span, blocks):
            pos = local[span[0] : span[1]]
            return pos, _cell_duplicates(rows[pos], members[pos], *blocks[:2], backend,
                                         emb.norm_bound)

        spans = np.stack([starts[several], stops[several]], axis=1)
        threads = _workers(backend)
        with on_all_cores(threads) as pmap:
            for pos, (found, partners) in _visit_cells(
                    pmap, visit, spans, spans[:, 1] - spans[:, 0], block_size, memory_bytes,
                    emb.d, threads):
                sims[pos], partner[pos] = found, partners
        return sims, partner
    # too large to hold: one more sort, of this group's rows into cell and rank order
    ranked_pos = np.concatenate([local[lo:hi] for lo, hi in zip(starts[several], stops[several])]
                                or [np.zeros(0, np.int64)])
    with sort_rows(emb.over(rows), ranked_pos, memory_bytes, scratch_dir) as ranked:
        at = 0
        for lo, hi in zip(starts[several], stops[several]):
            pos, cell = local[lo:hi], ranked.range(at, at + hi - lo)
            at += hi - lo
            xc = cell.load() if hi - lo <= whole else cell  # else read block by block
            sims[pos], partner[pos] = _cell_duplicates(xc, members[pos], block_size,
                                                       not_before, backend, emb.norm_bound)
    return sims, partner


def scratch_need(n: int, d: int, dtype, memory_bytes: int, k: int, world_size: int = 1) -> int:
    """Most bytes of scratch disk :func:`semdedup_passes` holds at once over ``n`` rows of
    ``d`` values of ``dtype`` with ``k`` cells (each file is freed before the next is made).

    Two levels: the pool grouped by coarse cell (sorted, across ranks), or a group sorted into
    cell order. Flat: :func:`duplicate_similarity`'s runs of held cells, at most
    ``2 N / run + 1`` of them (two runs in a row hold more than one run may), or its sort of
    the larger cells. Each is :func:`~.scratch.scratch_bytes`; the largest is returned.
    """
    if k > kmeans.FLAT_MAX_K:
        keys = (kmeans.coarse_cells(k) if world_size == 1 else None, None)
    else:
        run = min(held_rows(d, memory_bytes), run_rows(d, dtype, memory_bytes))
        keys = (2 * -(-int(n) // run) + 1,)
    return max(scratch_bytes(n, d, dtype, memory_bytes, c) for c in keys)


def _workers(backend: Backend) -> int:
    """Threads the cells are split over: one a core for NumPy's estimates (:mod:`.threads`);
    one for torch's, which threads (or runs on a GPU) by itself."""
    return 1 if backend.kind == "torch" else workers()


def _visit_cells(pmap, visit, items, sizes: np.ndarray, block_size: int, memory_bytes: int,
                 d: int, threads: int):
    """``visit(item, blocks)`` of every held cell: those of at most a quarter of a worker's
    share of the budget (``sizes``: rows) through ``pmap`` on every core, each with that
    share's similarity blocks; the others one at a time in this thread, with the whole
    budget's. Yields the results, the cells on every core first."""
    shared = _blocks(block_size, memory_bytes // threads, d)
    small = sizes <= shared[2]
    return itertools.chain(pmap(functools.partial(visit, blocks=shared), items[small]),
                           (visit(item, _blocks(block_size, memory_bytes, d))
                            for item in items[~small]))


def _blocks(block_size: int, memory_bytes: int, d: int) -> tuple[int, np.ndarray, int]:
    """Similarity block rows (at most ``block_size``, sized from the budget), the diagonal
    block's mask ([j, i]: i not ranked before j), and the most rows of a cell held whole."""
    block_size = min(block_size, similarity_block_rows(memory_bytes))
    return block_size, _not_before(block_size), held_rows(d, memory_bytes)


@functools.lru_cache(maxsize=4)
def _not_before(block_size: int) -> np.ndarray:
    """bool (block_size, block_size), read-only, made once: [j, i] where i >= j."""
    mask = np.triu(np.ones((block_size, block_size), bool))
    mask.flags.writeable = False
    return mask


def _cell_duplicates(xc, rows: np.ndarray, block_size: int, not_before: np.ndarray,
                     backend: Backend, norm: float) -> tuple[np.ndarray, np.ndarray]:
    """One cell, rows ``xc`` (array or RowRange) in rank order and their row ids ``rows``:
    float32 similarity to the partner (-inf for the first) and int64 partner row (-1).
    ``norm``: an upper bound of the rows' L2 norms (the pool's, ``Embeddings.norm_bound``)."""
    arg = _earlier_nearest(xc, block_size, not_before, backend, norm)
    return (_partner_sims(xc, arg, block_size, norm),
            np.where(arg >= 0, rows[np.maximum(arg, 0)], -1))


def similarity_block_rows(memory_bytes: int) -> int:
    """Rows of a similarity block whose float32 (rows x rows) estimates, and the masks and
    temporaries beside them (about four times as much), fit in an eighth of ``memory_bytes``."""
    return max(64, int(np.sqrt(memory_bytes / 8 / 16)))


def _partner_sims(xc, arg: np.ndarray, block_size: int, norm: float) -> np.ndarray:
    """float32 (M,): each member's exact similarity to its partner ``xc[arg]`` (-inf where it
    has none), read block by block; ``norm`` bounds the rows' norms."""
    out = np.full(len(arg), -np.inf, np.float32)
    for s in range(0, len(arg), block_size):
        a = arg[s : s + block_size]
        has = np.flatnonzero(a >= 0)
        if has.size:
            out[s + has] = row_sims(xc[s : s + block_size][has], xc[a[has]], norm, norm)
    return out


def _earlier_nearest(xc: np.ndarray, block_size: int, not_before: np.ndarray,
                     backend: Backend, norm: float) -> np.ndarray:
    """int64 (M,): for each member of a cluster (rows ``xc``, float32 (M, d), in rank order; an
    array or a :class:`~.scratch.RowRange` read block by block),
    the position of the earlier member with the largest exact dot product, the earliest on ties;
    -1 for the first member. ``norm``: an upper bound of the rows' L2 norms.

    float32 blocks (the fast, threaded matmul) give each row its best and second-best estimate;
    where they are more than twice the float32 error bound apart the best is certain whatever
    kernel summed them. The other rows (near-ties and identical vectors: 0.31 % of the rows of
    ``benchmarks/bench_exact.py``'s pool) are decided by :func:`~.exact.exact_argmax`.
    """
    if backend.kind == "torch":
        best, second, arg = torch_earlier_top2(xc, block_size, backend.device)
    else:
        best, second, arg = _earlier_top2(xc, block_size, not_before)
    margin = 2 * dot_bound(xc.shape[1], norm, norm, np.float32) + SLACK
    unsure = np.flatnonzero((best > -np.inf) & (second >= best.astype(np.float64) - margin))
    if unsure.size:
        arg[unsure] = exact_argmax(xc[unsure], xc, before=unsure, block_size=block_size,
                                   norm_q=norm, norm_keys=norm)
    return arg


#: rows per band of a cell held in memory: a band is compared with the members ranked before it
#: only, so a cell of M rows costs about (M**2 + M * BAND_ROWS) / 2 products instead of M**2
#: (0.63 M**2 at SemDeDup's ~1,000-row cells), and only the bands' diagonal blocks are masked
BAND_ROWS = 256


def _earlier_top2(xc: np.ndarray, block_size: int, not_before: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 best, second best and int64 position of the best earlier member of each row
    of ``xc``, from NumPy's threaded float32 matmul, band by band over the lower triangle."""
    m = len(xc)
    best = np.full(m, -np.inf, np.float32)
    second = np.full(m, -np.inf, np.float32)
    arg = np.full(m, -1, np.int64)
    # a cell read from disk keeps bands of block_size rows: narrower ones would read it again
    band = min(block_size, BAND_ROWS) if isinstance(xc, np.ndarray) else block_size
    block_size -= block_size % band  # so that every band's diagonal lies in one column block
    for js in range(0, m, band):
        xj = xc[js : js + band]
        n_j = len(xj)
        bj, sj, aj = best[js : js + n_j], second[js : js + n_j], arg[js : js + n_j]  # views
        for is_ in range(0, js + n_j, block_size):
            last = is_ + block_size > js
            keys = xj if last and is_ == js else xc[is_ : min(is_ + block_size, js + n_j)]
            sims = exact.gemm32(xj, keys)
            if last:  # the diagonal: only members ranked strictly before count (-inf, not
                # NO_EARLIER, so that an earlier member at exactly -1.0 is still a partner)
                np.copyto(sims[:, js - is_ :], -np.inf, where=not_before[:n_j, :n_j])
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
