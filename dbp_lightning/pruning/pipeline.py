"""``prune``: the configured stages in order on one pool, into a selection and its report.

semdedup -> clip_score -> (dbp | ssp | random); every stage is optional and sees only the
samples that survived the ones before it. Everything the data allows to be checked is
checked before the first stage runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SELECTORS, PruneConfig, check_pool_size
from ..memory import RssPeaks, peak_rss_mb
from ..store import EmbeddingStore
from .clip_score import clip_score_filter
from .collective import Local
from .complexity import cluster_complexity
from .embeddings import Embeddings, as_embeddings
from .backend import resolve_backend
from .kmeans import spherical_kmeans
from .quotas import dbp_quotas, softmax_probabilities
from .select import dbp_select, random_select, ssp_select
from .scratchfile import check_scratch
from .semdedup import scratch_need, semdedup_passes, threshold_for_fraction

log = logging.getLogger(__name__)


def id_column(column_names) -> str:
    """The column that identifies a sample, the one identity rule of the project: ``uid`` when
    the table has one (DataComp's, or the json's that ``embed`` stores), else ``key``. Keys of
    WebDataset shards repeat across shards; uids must not."""
    return "uid" if "uid" in column_names else "key"


@dataclass
class PruneResult:
    """What :func:`prune` computed.

    Attributes:
        selection: one row per input sample (columns listed in the README): key, uid (if known), the dedup
            partition, duplicate similarity and ``dup_of`` (key of the earlier-ranked member giving
            it; null for none), clip_score, the selector's cluster and
            similarity to centroid, one ``*_kept`` column per stage, and ``kept``.
        clusters: one row per selector cluster (dbp, ssp): size, d_intra, d_inter,
            complexity, p, quota, kept; ``None`` for random or no selector.
        report: counts and seconds per stage, chosen eps/threshold, k-means iterations.
    """

    selection: pa.Table
    clusters: pa.Table | None
    report: dict = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        """bool (N,) final keep mask."""
        return self.selection.column("kept").to_numpy(zero_copy_only=False)


def _check_against_data(config: PruneConfig, n: int, metadata: pa.Table) -> None:
    if "key" not in metadata.column_names:
        raise ValueError("metadata: no 'key' column")
    for name in ("key", "uid"):
        if name in metadata.column_names and metadata.column(name).null_count:
            raise ValueError(f"metadata: {metadata.column(name).null_count} rows have no {name}")
    name = id_column(metadata.column_names)
    ids = metadata.column(name)
    distinct = pc.count_distinct(ids).as_py()  # Arrow's hash table: no Python strings
    pa.default_memory_pool().release_unused()  # the table's pages, or Arrow's allocator keeps them
    if distinct != len(ids):
        counts = pc.value_counts(ids)
        top = pc.index(counts.field("counts"), pc.max(counts.field("counts")))
        dup = counts[top.as_py()]
        raise ValueError(f"metadata: {name} {dup['values'].as_py()!r} occurs {dup['counts'].as_py()} "
                         f"times; the {name} column identifies a sample and must be unique")
    check_pool_size(config, n)
    if "clip_score" in config.stages and config.clip_score.column not in metadata.column_names:
        raise ValueError(f"clip_score.column: no column {config.clip_score.column!r} in the "
                         f"metadata (columns: {', '.join(metadata.column_names)})")


def _check_selector(selector: str, s, target: int, n_left: int, before: list[str]) -> None:
    """Refuse, before the selector's k-means, what the survivors cannot satisfy."""
    after = f" left after {', '.join(before)}" if before else " in the pool"
    if n_left == 0:
        raise ValueError(f"no samples{after}: nothing for {selector} to select")
    if target > n_left:
        raise ValueError(f"select.target_size={target} exceeds the {n_left} samples{after}")
    if selector != "random" and s.k > n_left:
        raise ValueError(f"select.k={s.k} exceeds the {n_left} samples{after}")
    if selector == "dbp" and s.min_per_cluster * s.k > target:
        raise ValueError(f"select.min_per_cluster={s.min_per_cluster} x select.k={s.k} exceeds the "
                         f"target of {target} samples")


def prune(x, config: PruneConfig, metadata: pa.Table | None = None,
          progress: bool = False, comm=None) -> PruneResult:
    """Run ``config.stages`` on the pool ``x``.

    Args:
        x: (N, d) embeddings: array, memmap, :class:`Embeddings`, or an
            :class:`~dbp_lightning.store.EmbeddingStore`.
        config: what to run; validated first.
        metadata: N-row table with a ``key`` column (and ``uid``, score columns); the
            :func:`id_column` must be unique. Default: keys "0".."N-1" (a store brings its own).
        progress: progress bars.
        comm: a :mod:`~dbp_lightning.pruning.collective` collective when this process is one
            of several (every rank calls ``prune`` with the same arguments); default one process.

    Returns:
        :class:`PruneResult`, the same on every rank. Same config, seed and input give the same
        tables, bit for bit, float columns included, with any number of processes and threads
        and whatever BLAS kernel the CPU gets (:mod:`.exact`). Its report gives each stage's
        peaks of anonymous and file-backed resident memory apart (:class:`~dbp_lightning.memory.RssPeaks`).
    """
    with RssPeaks() as rss:
        return _prune(x, config, metadata, progress, comm, rss)


def _prune(x, config: PruneConfig, metadata: pa.Table | None, progress: bool, comm,
           rss: RssPeaks) -> PruneResult:
    config.validate()
    if isinstance(x, EmbeddingStore):
        metadata = x.metadata() if metadata is None else metadata
        x = x.embeddings
    emb = as_embeddings(x)
    n = emb.n
    if metadata is None:
        metadata = pa.table({"key": pa.array(np.arange(n)).cast(pa.string())})
    if metadata.num_rows != n:
        raise ValueError(f"metadata has {metadata.num_rows} rows, embeddings {n}")
    _check_against_data(config, n, metadata)
    gpu = config.gpu if config.gpu == "auto" else config.gpu in (True, "true")
    comm = comm or Local()
    backend = resolve_backend(config.backend, gpu, comm.local_rank)  # the same bytes on any
    log.debug("k-means and similarity blocks: %s", backend.describe())

    # Arrow columns, never NumPy object arrays: 10^7 keys as Python strings would take GBs
    # as read (chunked): a combined copy would be ~50 more bytes a sample of ids held throughout
    cols: dict = {"key": metadata.column("key")}
    if "uid" in metadata.column_names:
        cols["uid"] = metadata.column("uid")
    alive = np.ones(n, bool)
    stages, clusters = [], None

    def record(name: str, started: float, n_in: int, **details) -> None:
        stages.append({"stage": name, "in": n_in, "out": int(alive.sum()),
                       "seconds": round(time.perf_counter() - started, 3),
                       "peak_rss_mb": round(peak_rss_mb(), 1), **rss.peaks(), **details})
        rss.reset()  # the next stage's peaks are its own
        log.info("%s: %s -> %s samples in %.1f s", name, f"{n_in:,}", f"{int(alive.sum()):,}",
                 stages[-1]["seconds"])

    memory = int(config.memory_gb * 2**30)
    scratch = 0
    if "semdedup" in config.stages:  # the rows sorted by cell, on disk unless they fit in memory
        scratch = scratch_need(n, emb.d, emb.x.dtype, memory, config.semdedup.k, comm.world_size)
        scratch = scratch if 4 * scratch > memory else 0
        # checked even when the pool fits: a coarse cell too large for the budget still sorts
        where = check_scratch(config.scratch_dir, scratch)
        if scratch:
            log.info("semdedup sorts the pool by cell: %.2f GB in %s", scratch / 1e9, where)

    if "semdedup" in config.stages:
        d, t0 = config.semdedup, time.perf_counter()
        first, dup_sim, partner = semdedup_passes(
            emb, d.k, d.passes, niter=d.niter, seed=config.seed, sample=d.sample,
            block_size=d.block_size, progress=progress, comm=comm, backend=backend,
            memory_bytes=memory, scratch_dir=config.scratch_dir)
        threshold = 1.0 - d.eps if d.eps is not None else threshold_for_fraction(dup_sim, d.target_fraction)
        cols["dedup_cluster"] = first.assignment.astype(np.int32)
        cols["dup_sim"] = dup_sim
        # the identity, not the row, so the column still means something in a filtered selection
        ids = cols[id_column(cols)]
        cols["dup_of"] = ids.take(pa.array(np.maximum(partner, 0), mask=partner < 0))  # null: none
        cols["dedup_kept"] = dup_sim <= threshold
        alive &= cols["dedup_kept"]
        record("semdedup", t0, n, eps=round(1.0 - threshold, 6), k=d.k,
               cells=int(first.centroids.shape[0]), passes=d.passes,
               kmeans_iterations=first.n_iter, scratch_bytes=scratch)

    if "clip_score" in config.stages:
        c, t0, n_in = config.clip_score, time.perf_counter(), int(alive.sum())
        scores = metadata.column(c.column).to_numpy(zero_copy_only=False).astype(np.float32)
        cols["clip_score"] = scores
        keep = np.zeros(n, bool)
        keep[alive] = clip_score_filter(scores[alive], threshold=c.threshold, fraction=c.fraction)
        cols["clip_kept"] = keep
        alive &= keep
        record("clip_score", t0, n_in, column=c.column, threshold=c.threshold, fraction=c.fraction)

    selector = next((s for s in config.stages if s in SELECTORS), None)
    if selector is not None:
        s, t0 = config.select, time.perf_counter()
        rows = np.flatnonzero(alive)
        target = s.target_size if s.target_size is not None else max(1, round(s.target_fraction * len(rows)))
        _check_selector(selector, s, target, len(rows), config.stages[:config.stages.index(selector)])
        keep_rows, details, clustering = _select(selector, emb.subset(rows), s, target,
                                                 config.seed, backend, progress, comm)
        if clustering is not None:
            assignment, similarity, clusters = clustering
            # null, not a sentinel, for samples that never reached the selector
            cluster, sim = np.zeros(n, np.int32), np.zeros(n, np.float32)
            cluster[rows], sim[rows] = assignment, similarity
            cols["cluster"] = pa.array(cluster, mask=~alive)
            cols["sim_to_centroid"] = pa.array(sim, mask=~alive)
        cols[f"{selector}_kept"] = np.zeros(n, bool)
        cols[f"{selector}_kept"][rows[keep_rows]] = True
        alive &= cols[f"{selector}_kept"]
        record(selector, t0, len(rows), target=target, **details)

    cols["kept"] = alive
    report = {"pool": n, "kept": int(alive.sum()), "processes": comm.world_size,
              "backend": {"kind": backend.kind, "device": backend.device}, "stages": stages,
              "seconds": round(sum(st["seconds"] for st in stages), 3),
              "peak_rss_mb": round(peak_rss_mb(), 1),
              **{k: max((st[k] for st in stages if st.get(k) is not None), default=None)
                 for k in ("rss_anon_peak_mb", "rss_file_peak_mb")}}
    return PruneResult(pa.table(cols), clusters, report)


def _select(selector: str, emb: Embeddings, s, target: int, seed: int, backend, progress: bool,
            comm):
    """Run the selector on the surviving rows.

    Returns the keep mask over them, report details, and for dbp/ssp (assignment, similarity,
    clusters table); None for random.
    """
    if selector == "random":
        return random_select(emb.n, target, seed), {}, None
    km = spherical_kmeans(emb, s.k, niter=s.niter, seed=seed, sample=s.sample, tol=s.tol,
                          progress=progress, comm=comm, backend=backend)
    details = {"k": s.k, "kmeans_iterations": km.n_iter,
               "kmeans_mean_cosine": round(float(km.similarity.mean(dtype=np.float64)), 6)}
    sizes = np.bincount(km.assignment, minlength=s.k)
    if selector == "dbp":
        cc = cluster_complexity(emb, km.centroids, km.assignment, s.num_neighbors,
                                similarity=km.similarity)
        quotas = dbp_quotas(cc.complexity, cc.sizes, target, s.temperature, s.min_per_cluster,
                            s.balance_ratio, s.solver)
        keep = dbp_select(km.similarity, km.assignment, quotas)
        table = {"d_intra": cc.d_intra, "d_inter": cc.d_inter, "complexity": cc.complexity,
                 "p": softmax_probabilities(cc.complexity, cc.sizes, s.temperature),
                 "quota": quotas}
        details.update(temperature=s.temperature, num_neighbors=s.num_neighbors, solver=s.solver)
    else:
        keep = ssp_select(km.similarity, km.assignment, target, s.balance_ratio, s.k)
        table = {}
        details.update(balance_ratio=s.balance_ratio)
    kept = np.bincount(km.assignment[keep], minlength=s.k)
    clusters = pa.table({"cluster": np.arange(s.k, dtype=np.int32), "size": sizes, **table,
                         "kept": kept})
    return keep, details, (km.assignment, km.similarity, clusters)
