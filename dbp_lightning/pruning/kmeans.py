"""Spherical k-means with faiss: train on a sample, assign every row in streamed blocks."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .collective import Local, block_range, owners
from .embeddings import as_embeddings

log = logging.getLogger(__name__)

#: iterations between convergence checks when ``tol`` is set.
_CHECK_EVERY = 5


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("faiss is missing: install dbp-lightning[cpu] (faiss-cpu) or "
                          "dbp-lightning[gpu] (faiss-gpu), never both") from exc
    return faiss


def use_gpu(gpu: str | bool) -> bool:
    """Resolve ``gpu`` ("auto", True or False) against the GPUs faiss can see."""
    if gpu not in ("auto", True, False):
        raise ValueError(f"gpu must be 'auto', True or False, got {gpu!r}")
    faiss = _faiss()
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu is True and n_gpus == 0:
        raise ValueError("gpu=True but faiss sees no GPU: install dbp-lightning[gpu] on a CUDA "
                         "machine, or use gpu='auto'")
    return bool(n_gpus) if gpu == "auto" else bool(gpu)


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


def assign(x, centroids: np.ndarray, gpu: str | bool = "auto", progress: bool = False,
           block_size: int | None = None, comm=None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine similarity, streamed in blocks.

    Args:
        x: (N, d) embeddings (see :class:`~dbp_lightning.pruning.embeddings.Embeddings`).
        centroids: float32 (k, d), unit norm.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: each rank assigns its run
            of blocks (on GPU ``local_rank`` modulo the GPUs it sees), and every rank gets all
            N rows (default: one process, on all the GPUs faiss sees).

    Returns:
        assignment int64 (N,) and similarity float32 (N,).
    """
    faiss = _faiss()
    emb = as_embeddings(x)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    comm = comm or Local()
    index = faiss.IndexFlatIP(emb.d)
    index.add(centroids)
    resources, gpu_on = None, use_gpu(gpu)
    if gpu_on and comm.world_size == 1:
        index = faiss.index_cpu_to_all_gpus(index)
    elif gpu_on:  # processes sharing a node: each on its own GPU, not a replica on all
        resources = faiss.StandardGpuResources()  # lives as long as the index is searched
        index = faiss.index_cpu_to_gpu(resources, comm.local_rank % faiss.get_num_gpus(), index)
    # rows another rank assigns hold max's identity until the reduction fills them in
    assignment = np.full(emb.n, -1, np.int64)
    similarity = np.full(emb.n, -np.inf, np.float32)
    step = block_size or emb.block_size
    lo, hi = block_range(emb.n, step, comm.rank, comm.world_size)
    for start in tqdm(range(lo, hi, step), disable=not progress, desc="assign", unit="block",
                      leave=False):
        block = emb.rows(start, min(start + step, hi))
        sims, ids = index.search(block, 1)
        assignment[start : start + len(block)] = ids[:, 0]
        similarity[start : start + len(block)] = sims[:, 0]
    return comm.reduce_max(assignment), comm.reduce_max(similarity)


def spherical_kmeans(x, k: int, niter: int = 100, seed: int = 0, sample: int | None = None,
                     gpu: str | bool = "auto", tol: float | None = None,
                     progress: bool = False, comm=None) -> KMeansResult:
    """Spherical k-means (cosine similarity, unit-norm centroids) with faiss.

    Trains on ``sample`` rows drawn without replacement with ``seed`` (only those rows are held
    in memory, as float32), then assigns all N rows in streamed blocks.

    Args:
        x: (N, d) embeddings: array, memmap or :class:`Embeddings`; float16/32/64.
        k: number of clusters, 1 <= k <= N.
        niter: maximum Lloyd iterations (the paper uses 100).
        seed: seeds the training sample and faiss's initialisation.
        sample: training rows. ``None`` follows faiss's own default of at most 256 rows per
            centroid, ``min(N, 256 * k)``; larger values are clipped to N.
        gpu: "auto" (a GPU when faiss sees one), True or False.
        tol: stop when an iteration improves the objective (sum of cosine similarities) by
            less than ``tol`` relative; checked every 5 iterations. ``None`` runs ``niter``.
        progress: show a progress bar.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: rank 0 trains (on all
            the GPUs faiss sees) and broadcasts the centroids; the ranks split the assignment.

    Returns:
        :class:`KMeansResult` (centroids, assignment, similarity, n_iter), the same on every rank.
    """
    emb = as_embeddings(x)
    if not 1 <= k <= emb.n:
        raise ValueError(f"k={k} clusters needs 1 <= k <= N, and N={emb.n} samples")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if tol is not None and tol < 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol}")
    n_train = min(emb.n, 256 * k if sample is None else int(sample))
    if n_train < k:
        raise ValueError(f"sample={sample} is smaller than k={k}: every centroid needs a point")
    gpu_on = use_gpu(gpu)
    comm = comm or Local()
    centroids, done = None, None
    if comm.rank == 0:
        centroids, done = _train(emb, k, niter, seed, n_train, gpu_on, tol, progress)
    centroids = comm.broadcast(centroids)
    done = int(comm.broadcast(None if done is None else np.array([done]))[0])
    assignment, similarity = assign(emb, centroids, gpu=gpu_on, progress=progress, comm=comm)
    log.info("spherical k-means: k=%d, %d train rows, %d iterations, mean cosine %.4f",
             k, n_train, done, float(similarity.mean(dtype=np.float64)))
    return KMeansResult(centroids, assignment, similarity, done)


def _train(emb, k: int, niter: int, seed: int, n_train: int, gpu_on: bool, tol: float | None,
           progress: bool) -> tuple[np.ndarray, int]:
    """Unit-norm centroids float32 (k, d) trained on ``n_train`` rows drawn with ``seed``, and
    the iterations run."""
    faiss = _faiss()
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(emb.n, n_train, replace=False)) if n_train < emb.n else None
    xt = emb.rows(0, emb.n) if train_rows is None else emb.take(train_rows)

    def run(iters: int, init: np.ndarray | None, train: np.ndarray):
        # max_points_per_centroid above the sample keeps faiss from subsampling again.
        km = faiss.Kmeans(emb.d, k, niter=iters, seed=seed, spherical=True, gpu=gpu_on,
                          max_points_per_centroid=n_train // k + 1, min_points_per_centroid=1,
                          verbose=False)
        km.train(train, init_centroids=init)
        return km.centroids, km.obj

    if tol is None:
        centroids, _ = run(niter, None, xt)
        done = niter
    else:
        centroids, done, bar = None, 0, tqdm(total=niter, disable=not progress, desc="k-means",
                                             unit="iter", leave=False)
        while done < niter:
            step = min(_CHECK_EVERY, niter - done)
            centroids, obj = run(step, centroids, xt)
            done += step
            bar.update(step)
            # no objective history: faiss did not iterate (k == number of training points)
            if len(obj) < 2 or (obj[-1] - obj[-2]) <= tol * abs(obj[-1]):
                break
        bar.close()
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids, done


#: above this many cells, :func:`partition_kmeans` builds the partition in two levels
FLAT_MAX_K = 1024


def partition_kmeans(x, k: int, niter: int = 10, seed: int = 0, sample: int | None = None,
                     gpu: str | bool = "auto", progress: bool = False, comm=None) -> KMeansResult:
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
        x, niter, seed, gpu, progress: as :func:`spherical_kmeans`.
        k: cells wanted; the two-level total is within rounding of it.
        sample: training rows of the (first level) k-means; the second level uses its default.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: the first level as in
            :func:`spherical_kmeans`, then the ranks split the coarse cells.

    Returns:
        :class:`KMeansResult`: fine centroids (k_total, d), global cell ids, similarity to the
        assigned centroid, and the first level's iterations; the same on every rank.
    """
    emb = as_embeddings(x)
    if k <= FLAT_MAX_K:
        return spherical_kmeans(emb, k, niter=niter, seed=seed, sample=sample, gpu=gpu,
                                progress=progress, comm=comm)
    from .groups import cluster_index

    comm = comm or Local()
    k1 = int(np.ceil(np.sqrt(k)))
    coarse = spherical_kmeans(emb, k1, niter=niter, seed=seed, sample=sample, gpu=gpu,
                              progress=progress, comm=comm)
    index = cluster_index(coarse.assignment, None, k1)  # each cell's rows, in row order
    sizes = index.sizes
    cells = np.minimum(sizes, np.maximum(1, np.rint(k * sizes / emb.n))).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(cells)])
    # what another rank computes holds max's identity until the reductions fill it in
    assignment = np.full(emb.n, -1, np.int64)
    similarity = np.full(emb.n, -np.inf, np.float32)
    centroids = np.full((int(offsets[-1]), emb.d), -np.inf, np.float32)
    owner = owners(sizes.astype(np.float64) * cells, comm.world_size)  # Lloyd cost ~ M_c k_c
    mine = np.flatnonzero((owner == comm.rank) & (sizes > 0))
    for c in tqdm(mine, disable=not progress, desc="cells", unit="coarse cell", leave=False):
        rows = index.members(c)
        fine = spherical_kmeans(emb.subset(rows), int(cells[c]), niter=niter,
                                seed=seed * 1_000_003 + int(c), gpu=gpu)
        assignment[rows] = fine.assignment + offsets[c]
        similarity[rows] = fine.similarity
        centroids[offsets[c] : offsets[c + 1]] = fine.centroids
    return KMeansResult(comm.reduce_max(centroids), comm.reduce_max(assignment),
                        comm.reduce_max(similarity), coarse.n_iter)
