"""Spherical k-means: train on a sample, assign every row in streamed blocks; faiss or torch
searches (:mod:`.backend`), and :mod:`.exact` makes every assignment and similarity independent
of how it summed, and so of the backend."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .backend import Backend, BlasTop2, TorchTop2, resolve_backend
from .collective import Local, block_range, owners
from .embeddings import as_embeddings
from .exact import (SLACK, dot_bound, exact_argmax, max_norm, row_sims,
                    row_sums_in_order)
from .threads import on_all_cores, spans, workers

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("faiss is missing: install dbp-lightning[cpu] (faiss-cpu) or "
                          "dbp-lightning[gpu] (faiss-gpu), never both") from exc
    return faiss


class KMeansResult(NamedTuple):
    """Output of :func:`spherical_kmeans`.

    Attributes:
        centroids: float32 (k, d), unit norm.
        assignment: int64 (N,), index of the most similar centroid.
        similarity: float32 (N,), cosine similarity to that centroid.
        n_iter: Lloyd iterations run (< ``niter`` when ``tol`` stopped training early).
    """

    centroids: np.ndarray
    assignment: np.ndarray
    similarity: np.ndarray
    n_iter: int


#: rows whose similarities :class:`_Nearest` computes at once: a gather of their centroids as
#: large as the block (100 MB for a 10M pool's coarse cell) would take fresh pages each time
_SIM_ROWS = 4096


class _Nearest:
    """Each row's nearest centroid, exactly (see :mod:`.exact`), the backend's top two giving
    the estimate (faiss-gpu, :class:`~.backend.BlasTop2` on CPU, or torch).

    The top two float32 similarities decide a row where they are more than twice their error
    bound apart; the rest are decided exactly. The similarity to the chosen centroid is the
    exactly rounded one. So the result is the same whatever BLAS kernel, thread count or GPU
    the estimate ran on.
    """

    def __init__(self, centroids: np.ndarray, backend: Backend, comm=None):
        comm = comm or Local()
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.k, self.d = self.centroids.shape
        self.norm = max_norm(self.centroids)
        self._resources = None  # lives as long as the index is searched
        if backend.kind == "torch":
            self.index = TorchTop2(self.centroids, backend.device)
            return
        if backend.device == "cpu":  # faster than faiss's own flat search (BlasTop2)
            self.index = BlasTop2(self.centroids)
            return
        faiss = _faiss()
        index = faiss.IndexFlatIP(self.d)
        index.add(self.centroids)
        if backend.device != "cpu" and comm.world_size == 1:
            index = faiss.index_cpu_to_all_gpus(index)
        elif backend.device != "cpu":  # processes sharing a node: each on its own GPU
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, int(backend.device.split(":")[1]), index)
        self.index = index

    def __call__(self, block: np.ndarray, norm: float) -> tuple[np.ndarray, np.ndarray]:
        """Assignment int64 (B,) and similarity float32 (B,) of float32 rows (B, d); ``norm``
        as :meth:`nearest`."""
        ids = self.nearest(block, norm)
        sims = np.empty(len(block), np.float32)

        def exact_sims(span):  # centroids gathered a few MiB at a time
            s, e = span
            sims[s:e] = row_sims(block[s:e], self.centroids[ids[s:e]], norm, self.norm)

        with on_all_cores() as pmap:
            for _ in pmap(exact_sims, spans(len(block), workers(), _SIM_ROWS)):
                pass
        return ids, sims

    def nearest(self, block: np.ndarray, norm: float) -> np.ndarray:
        """Assignment int64 (B,) of float32 rows (B, d); ``norm``: an upper bound of their
        norms (the pool's ``Embeddings.norm_bound``)."""
        if self.k == 1:
            ids = np.zeros(len(block), np.int64)
        else:
            sims, found = search_top2(self.index, block)
            margin = 2 * dot_bound(self.d, norm, self.norm, np.float32) + SLACK
            ids = found[:, 0].astype(np.int64)
            unsure = np.flatnonzero(sims[:, 0].astype(np.float64) - sims[:, 1] <= margin)
            if unsure.size:
                ids[unsure] = exact_argmax(block[unsure], self.centroids, norm_q=norm,
                                            norm_keys=self.norm)
        return ids


def search_top2(index, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The index's estimate of the two most similar centroids (faiss on GPU, :class:`BlasTop2`
    or :class:`TorchTop2`): similarities float32 (B, 2), ids int64 (B, 2)."""
    return index.search(block, 2)


def assign(x, centroids: np.ndarray, gpu: str | bool = "auto", progress: bool = False,
           block_size: int | None = None, comm=None, backend: str | Backend = "auto"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine similarity, streamed in blocks.

    Args:
        x: (N, d) embeddings (see :class:`~dbp_lightning.pruning.embeddings.Embeddings`).
        centroids: float32 (k, d), unit norm.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: each rank assigns its run
            of blocks (on GPU ``local_rank`` modulo the GPUs it sees), and every rank gets all
            N rows (default: one process, on all the GPUs faiss sees).
        backend: where the estimates run: "auto", "faiss" or "torch" (see :mod:`.backend`); the
            result is the same bytes on any of them.

    Returns:
        assignment int64 (N,): the centroid with the largest exact dot product, the lowest index
        on ties; similarity float32 (N,): that dot product, exactly rounded (:mod:`.exact`).
    """
    emb = as_embeddings(x)
    comm = comm or Local()
    nearest = _Nearest(centroids, resolve_backend(backend, gpu, comm.local_rank), comm)
    # rows another rank assigns hold max's identity until the reduction fills them in
    assignment = np.full(emb.n, -1, np.int64)
    similarity = np.full(emb.n, -np.inf, np.float32)
    step = block_size or emb.block_size
    lo, hi = block_range(emb.n, step, comm.rank, comm.world_size)
    for start in tqdm(range(lo, hi, step), disable=not progress, desc="assign", unit="block",
                      leave=False):
        block = emb.rows(start, min(start + step, hi))
        rows = slice(start, start + len(block))
        assignment[rows], similarity[rows] = nearest(block, emb.norm_bound)
    return comm.reduce_max(assignment), comm.reduce_max(similarity)


def spherical_kmeans(x, k: int, niter: int = 100, seed: int = 0, sample: int | None = None,
                     gpu: str | bool = "auto", tol: float | None = None,
                     progress: bool = False, comm=None, backend: str | Backend = "auto"
                     ) -> KMeansResult:
    """Spherical k-means (cosine similarity, unit-norm centroids), faiss searching.

    Trains on ``sample`` rows drawn without replacement with ``seed`` (only those rows are held
    in memory, as float32), then assigns all N rows in streamed blocks. Lloyd's iterations
    start from ``k`` training rows drawn with ``seed``; each assigns every training row to its
    nearest centroid (exactly: :class:`_Nearest`) and moves each centroid to the normalised
    float64 sum of its members, summed in row order. An empty cluster takes the training row
    least similar to its centroid (the next one for the next empty cluster). Nothing depends
    on summation order, so the result is the same on every CPU, thread count and process count.

    Args:
        x: (N, d) embeddings: array, memmap or :class:`Embeddings`; float16/32/64.
        k: number of clusters, 1 <= k <= N.
        niter: maximum Lloyd iterations (the paper uses 100).
        seed: seeds the training sample and the initial centroids.
        sample: training rows. ``None`` follows faiss's own default of at most 256 rows per
            centroid, ``min(N, 256 * k)``; larger values are clipped to N.
        gpu: "auto" (a GPU when faiss sees one), True or False: where faiss searches.
        tol: stop when an iteration improves the objective (sum of cosine similarities of the
            training rows to their centroids) by at most ``tol`` relative. ``None`` runs
            ``niter``.
        progress: show a progress bar.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: rank 0 trains and
            broadcasts the centroids; the ranks split the assignment.
        backend: "auto", "faiss" or "torch": where the searches run (:mod:`.backend`).

    Returns:
        :class:`KMeansResult` (centroids, assignment, similarity, n_iter), the same on every rank.
    """
    emb = as_embeddings(x)
    comm = comm or Local()
    backend = resolve_backend(backend, gpu, comm.local_rank)
    centroids, done = _fit(emb, k, niter, seed, sample, backend, tol, progress, comm)
    assignment, similarity = assign(emb, centroids, progress=progress, comm=comm, backend=backend)
    log.debug("spherical k-means: k=%d, %d iterations, mean cosine %.4f",
              k, done, float(similarity.mean(dtype=np.float64)))
    return KMeansResult(centroids, assignment, similarity, done)


def _fit(emb, k: int, niter: int, seed: int, sample: int | None, backend: Backend,
         tol: float | None, progress: bool, comm) -> tuple[np.ndarray, int]:
    """:func:`spherical_kmeans`'s arguments checked, then its centroids trained on rank 0 and
    broadcast: float32 (k, d) and the iterations run, the same on every rank."""
    if not 1 <= k <= emb.n:
        raise ValueError(f"k={k} clusters needs 1 <= k <= N, and N={emb.n} samples")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if tol is not None and tol < 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol}")
    n_train = min(emb.n, 256 * k if sample is None else int(sample))
    if n_train < k:
        raise ValueError(f"sample={sample} is smaller than k={k}: every centroid needs a point")
    centroids, done = None, None
    if comm.rank == 0:
        centroids, done = _train(emb, k, niter, seed, n_train, backend, tol, progress)
    centroids = comm.broadcast(centroids)
    return centroids, int(comm.broadcast(None if done is None else np.array([done]))[0])


def _train(emb, k: int, niter: int, seed: int, n_train: int, backend: Backend,
           tol: float | None, progress: bool) -> tuple[np.ndarray, int]:
    """Unit-norm centroids float32 (k, d) trained on ``n_train`` rows drawn with ``seed``, and
    the iterations run."""
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(emb.n, n_train, replace=False)) if n_train < emb.n else None
    xt = emb.rows(0, emb.n) if train_rows is None else emb.take(train_rows)
    centroids = _normalised(xt[rng.choice(n_train, k, replace=False)].astype(np.float64))
    previous, done = None, 0
    starts = range(0, n_train, emb.block_size)
    for done in tqdm(range(1, niter + 1), disable=not progress, desc="k-means", unit="iter",
                     leave=False):
        nearest = _Nearest(centroids, backend)
        ids = np.concatenate([nearest.nearest(xt[s : s + emb.block_size], emb.norm_bound)
                              for s in starts])
        sums = _member_sums(xt, ids, k)
        # sum of the members' similarities: each centroid . its members' sum, in a fixed order
        objective = math.fsum(row_sums_in_order(sums * centroids))
        _reseed_empty(sums, xt, ids, centroids)
        centroids = _normalised(sums)
        if tol is not None and previous is not None and objective - previous <= tol * abs(objective):
            break
        previous = objective
    return centroids, done


def _member_sums(xt: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """float64 (k, d): each cluster's members summed in row order."""
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=k)
    starts = np.cumsum(counts) - counts
    sums = np.zeros((k, xt.shape[1]), np.float64)
    filled = np.flatnonzero(counts)

    def add(span):
        for j in filled[span[0] : span[1]]:
            # axis 0: every column is summed row after row, whatever the SIMD width
            np.add.reduce(xt[order[starts[j] : starts[j] + counts[j]]], axis=0,
                          dtype=np.float64, out=sums[j])

    threads = workers()  # clusters split over the cores, several spans each (sizes vary)
    with on_all_cores(threads) as pmap:
        for _ in pmap(add, spans(len(filled), 4 * threads)):
            pass
    return sums


def _reseed_empty(sums: np.ndarray, xt: np.ndarray, ids: np.ndarray, centroids: np.ndarray) -> None:
    """Give each cluster without a direction (no member, or members that cancel out) a
    training row, the least similar to its centroid first (ties by row)."""
    empty = np.flatnonzero(~sums.any(axis=1))
    if empty.size:
        sims = row_sims(xt, centroids[ids])
        sums[empty] = xt[np.argsort(sims, kind="stable")[: empty.size]]


def _normalised(v: np.ndarray) -> np.ndarray:
    """float32 rows of float64 ``v`` (k, d) over their norms (squares summed in a fixed order)."""
    return (v / np.sqrt(row_sums_in_order(v * v))[:, None]).astype(np.float32)


#: above this many cells, :func:`partition_kmeans` builds the partition in two levels
FLAT_MAX_K = 1024


def coarse_cells(k: int) -> int | None:
    """The first level's cells of :func:`partition_kmeans` with ``k`` cells, ``ceil(sqrt(k))``;
    None when it is flat (``k <= FLAT_MAX_K``)."""
    return int(np.ceil(np.sqrt(k))) if k > FLAT_MAX_K else None


def partition_kmeans(x, k: int, niter: int = 10, seed: int = 0, sample: int | None = None,
                     gpu: str | bool = "auto", progress: bool = False, comm=None,
                     backend: str | Backend = "auto", memory_bytes: int | None = None,
                     scratch_dir: str | None = None, visit=None) -> KMeansResult:
    """About ``k`` cells of similar rows (SemDeDup's partition), at a cost that grows with N.

    SemDeDup compares pairs inside cells, so its cells must stay small as the pool grows: k
    grows with N. Flat k-means then costs N k d to assign and (256 k) k d per iteration to
    train, quadratic in N. Above ``FLAT_MAX_K`` cells the partition is built in two levels:
    ``k1 = ceil(sqrt(k))`` coarse cells by spherical k-means, then each coarse cell of M_c rows
    split by its own spherical k-means into ``max(1, round(k M_c / N))`` cells (seeded by
    ``seed`` and the cell). Assigning then costs N (k1 + k / k1) d ~ 2 N sqrt(k) d, and every
    fine cell's members are its own coarse cell's rows, each assigned to its nearest fine
    centroid there (not necessarily the nearest of all k: near-duplicates share a coarse cell,
    which is what SemDeDup needs). At most ``FLAT_MAX_K`` cells it is :func:`spherical_kmeans`.

    Args:
        x, niter, seed, gpu, progress, backend: as :func:`spherical_kmeans`.
        k: cells wanted; the two-level total is within rounding of it.
        sample: training rows of the (first level) k-means; the second level uses its default.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: the first level as in
            :func:`spherical_kmeans`, then the ranks split the coarse cells.
        memory_bytes, scratch_dir: the second level reads each coarse cell's rows from the
            pool grouped by coarse cell, in memory when it fits a quarter of ``memory_bytes``,
            else in ``scratch_dir``: in one process by the coarse assignment pass itself
            (:func:`~.scratch.group_rows`), across ranks by a sort of each rank's cells
            (:func:`~.scratch.sort_rows`). A coarse cell whose float32 rows fit in a quarter
            is held whole, a larger one read block by block.
        visit: optional ``visit(members, rows, cells, similarity)``, called in two levels with
            each coarse cell of this rank once it is split, while its rows are at hand: int64
            (M,) increasing row ids, their float32 rows (an array, or a
            :class:`~.scratch.RowRange` when too large to hold), int64 (M,) global fine cell
            and float32 (M,) similarity to it. So SemDeDup reads each row once per partition.

    Returns:
        :class:`KMeansResult`: fine centroids (k_total, d), global cell ids, similarity to the
        assigned centroid, and the first level's iterations; the same on every rank.
    """
    emb = as_embeddings(x)
    if k <= FLAT_MAX_K:
        return spherical_kmeans(emb, k, niter=niter, seed=seed, sample=sample, gpu=gpu,
                                progress=progress, comm=comm, backend=backend)
    from .groups import cluster_index
    from .scratch import DEFAULT_MEMORY_BYTES, group_rows, held_rows, sort_rows

    comm = comm or Local()
    memory_bytes = memory_bytes or DEFAULT_MEMORY_BYTES
    k1 = coarse_cells(k)
    backend = resolve_backend(backend, gpu, comm.local_rank)
    grouped = None
    if comm.world_size == 1:  # one pass over the pool assigns the coarse cells and groups by them
        centroids, coarse_iterations = _fit(emb, k1, niter, seed, sample, backend, None,
                                            progress, comm)
        near = _Nearest(centroids, backend)
        coarse_of, grouped = group_rows(emb, lambda rows: near.nearest(rows, emb.norm_bound),
                                        k1, memory_bytes, scratch_dir, progress)
    else:  # each rank assigns a share of the pool, then sorts the rows of its coarse cells
        coarse = spherical_kmeans(emb, k1, niter=niter, seed=seed, sample=sample,
                                  progress=progress, comm=comm, backend=backend)
        coarse_of, coarse_iterations = coarse.assignment, coarse.n_iter
        del coarse  # the per-sample arrays are the memory that grows with N: hold only what is used
    with contextlib.ExitStack() as stack:  # the grouped rows' scratch is freed however this ends
        if grouped is not None:
            stack.enter_context(grouped)
        sizes = np.bincount(coarse_of, minlength=k1)
        cells = np.minimum(sizes, np.maximum(1, np.rint(k * sizes / emb.n))).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(cells)])
        # what another rank computes holds max's identity until the reductions fill it in
        assignment = np.full(emb.n, -1, np.int64)
        similarity = np.full(emb.n, -np.inf, np.float32)
        centroids = np.full((int(offsets[-1]), emb.d), -np.inf, np.float32)
        owner = owners(sizes.astype(np.float64) * cells, comm.world_size)  # Lloyd cost ~ M_c k_c
        mine = (owner == comm.rank) & (sizes > 0)
        # this rank's coarse cells' rows, each cell's in row order (group_rows' order)
        index = cluster_index(coarse_of, None, k1, rows=None if (mine | (sizes == 0)).all()
                              else np.flatnonzero(mine[coarse_of]))
        del coarse_of
        if grouped is None:
            grouped = stack.enter_context(sort_rows(emb, index.order, memory_bytes, scratch_dir,
                                                    progress))
        # coarse cells of up to a quarter of the budget are held, each read ahead into kept
        # buffers while the one before is split (SortedRows.ranges: two held at once; fresh
        # pages cost a fault each); larger ones are read block by block
        whole = held_rows(emb.d, memory_bytes)
        mine_cells = np.flatnonzero(mine)
        bounds = [(int(index.starts[c]), int(index.starts[c + 1])) for c in mine_cells]
        # closed before the rows' file is (the read in flight is waited for)
        ranges = stack.enter_context(contextlib.closing(grouped.ranges(bounds, whole)))
        for c, (lo, hi), held in tqdm(zip(mine_cells, bounds, ranges), total=len(bounds),
                                      disable=not progress, desc="cells", unit="coarse cell",
                                      leave=False):
            fine = spherical_kmeans(emb.over(held),
                                    int(cells[c]), niter=niter, seed=seed * 1_000_003 + int(c),
                                    backend=backend)
            members = index.order[lo:hi]
            assignment[members] = fine.assignment + offsets[c]
            similarity[members] = fine.similarity
            centroids[offsets[c] : offsets[c + 1]] = fine.centroids
            if visit is not None:
                visit(members, held, assignment[members], fine.similarity)
    return KMeansResult(comm.reduce_max(centroids), comm.reduce_max(assignment),
                        comm.reduce_max(similarity), coarse_iterations)
