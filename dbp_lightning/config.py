"""Configuration of ``prune`` and of the encoders: plain dataclasses that jsonargparse reads from
YAML and flags (no torch here: ``prune`` must not pay for importing it).

:meth:`PruneConfig.validate` checks everything that can be checked without the data; the
pipeline checks the rest (k and targets against the pool size) before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

STAGES = ("semdedup", "clip_score", "dbp", "ssp", "random")
SELECTORS = ("dbp", "ssp", "random")


@dataclass
class SemDeDupConfig:
    """SemDeDup. Its clustering is only a partition that keeps near-duplicates together, so it
    trains on a sample for few iterations (the paper's public code: 100 iterations on all)."""

    k: int = 1000
    """cells of the dedup partition (two levels above 1,024); at most the pool's size (checked
    before any embedding starts)"""
    niter: int = 10
    """k-means iterations of the dedup partition"""
    sample: Optional[int] = None
    """k-means training rows (None: 256 per cell)"""
    passes: int = 2
    """partitions (k-means seeds) searched for duplicates; 1 = the public SemDeDup code"""
    eps: Optional[float] = None
    """remove a sample whose cosine similarity to a kept one exceeds 1 - eps (give this or
    target_fraction)"""
    target_fraction: Optional[float] = 0.8
    """keep this fraction of the pool, finding the eps that keeps it exactly (give this or eps)"""
    block_size: int = 4096
    """rows per block of pairwise similarities (memory: block_size^2 float32 per thread)"""


@dataclass
class ClipScoreConfig:
    """CLIP-score filter on a per-sample metadata column."""

    column: str = "clip_score"
    """metadata column holding the score (LAION: similarity; DataComp: clip_l14_similarity_score)"""
    threshold: Optional[float] = None
    """keep the samples with score >= threshold (give this or fraction)"""
    fraction: Optional[float] = None
    """keep this top fraction by score (give this or threshold)"""


@dataclass
class SelectConfig:
    """The final selector (dbp, ssp or random) and its clustering."""

    target_fraction: Optional[float] = None
    """keep this fraction of the samples entering the selector (give this or target_size)"""
    target_size: Optional[int] = None
    """keep exactly this many samples (give this or target_fraction)"""
    k: int = 500
    """concept clusters (paper: 500 on LAION, 100 on DataComp medium); at most the samples
    entering the selector (checked against the pool before any embedding starts)"""
    niter: int = 100
    """maximum k-means iterations (paper: 100)"""
    tol: Optional[float] = 1e-4
    """stop k-means when an iteration improves the objective by less than tol, relative (None:
    run all niter)"""
    sample: Optional[int] = None
    """k-means training rows (None: 256 per centroid)"""
    num_neighbors: int = 20
    """nearest other centroids whose mean distance is a cluster's d_inter (paper: l = 20)"""
    temperature: float = 0.1
    """softmax temperature tau turning complexity into quotas (paper: 0.1)"""
    min_per_cluster: int = 1
    """least samples every cluster keeps (paper: 1)"""
    balance_ratio: float = 0.0
    """SSP's cluster balancing ratio (DBP: 0, as in the paper; ssp: 1.0)"""
    solver: str = "exact"
    """quota program solver: exact (integer quotas that sum to the target) or osqp (the paper's)"""


@dataclass
class PruneConfig:
    """A prune run: the input, the stages in order, and each stage's options."""

    input: str = ""
    """the pool: an embedding store, a .npy, or a DataComp, clip-retrieval/LAION or NeMo
    Curator directory"""
    input_format: str = "auto"
    """layout of input: auto, store, npy, datacomp, clip_retrieval or nemo"""
    array: Optional[str] = None
    """which embeddings: DataComp l14_img (default), l14_txt, b32_img, b32_txt; clip-retrieval
    img (default), txt; NeMo the list column (default embedding); a+b joins two"""
    id_column: Optional[str] = None
    """metadata column identifying a sample (default: uid, else the layout's key, else the row)"""
    metadata: Optional[str] = None
    """for a .npy input: a parquet with key (and uid, scores) per row"""
    output: str = "runs/prune"
    """run directory to write (refused if it holds anything but a run)"""
    stages: list[str] = field(default_factory=lambda: ["semdedup", "dbp"])
    """stages in order: semdedup, then clip_score, then one of dbp, ssp, random"""
    seed: int = 0
    """seed of every k-means and of random; same seed, same selection bytes"""
    gpu: str = "auto"
    """use a GPU: auto (when one is present), true or false"""
    backend: str = "auto"
    """where k-means searches and SemDeDup's block similarities run: auto (faiss-gpu where
    installed with a GPU, else torch on CUDA, else faiss on CPU), faiss or torch; the selection
    is the same bytes on any"""
    memory_gb: float = 1.0
    """working memory of the out-of-core stages, GiB: sort buffers, the cells held at once and
    similarity blocks are sized from it; the per-sample arrays (about 170 bytes a sample) come on
    top, and the pool's own pages are the page cache's, not counted here"""
    scratch_dir: Optional[str] = None
    """where SemDeDup writes the pool's rows sorted by cell (its stored size, e.g. 5.1 GB for
    10M x 256 float16), checked for room before any stage; None: $TMPDIR. Point it at fast
    local disk; the file is freed on exit, failure or kill"""
    semdedup: SemDeDupConfig = field(default_factory=SemDeDupConfig)
    """SemDeDup (stage semdedup)"""
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    """CLIP-score filter (stage clip_score)"""
    select: SelectConfig = field(default_factory=SelectConfig)
    """the final selector (stage dbp, ssp or random)"""

    def validate(self) -> "PruneConfig":
        """Raise ValueError naming the option for anything wrong that needs no data.

        ``input`` and ``output`` are the command's (``dbp-lightning prune`` checks them);
        ``pipeline.prune`` on an array needs neither.
        """
        unknown = [s for s in self.stages if s not in STAGES]
        _check(not unknown, f"stages: unknown stage {unknown[0] if unknown else ''!r}; "
                            f"choose from {', '.join(STAGES)}")
        _check(len(set(self.stages)) == len(self.stages), "stages: a stage is listed twice")
        _check(self.stages == sorted(self.stages, key=_stage_rank),
               "stages: order must be semdedup, then clip_score, then one of dbp/ssp/random")
        _check(sum(s in SELECTORS for s in self.stages) <= 1,
               "stages: at most one of dbp, ssp, random")
        _check(self.gpu in ("auto", "true", "false", True, False), "gpu: auto, true or false")
        _check(self.backend in ("auto", "faiss", "torch"), f"backend: auto, faiss or torch, got {self.backend!r}")
        _check(math.isfinite(self.memory_gb) and self.memory_gb > 0,
               f"memory_gb must be a finite number > 0, got {self.memory_gb}")
        if "semdedup" in self.stages:
            d = self.semdedup
            _check((d.eps is None) != (d.target_fraction is None),
                   "semdedup: give exactly one of eps and target_fraction")
            _check(d.eps is None or 0 < d.eps < 2, f"semdedup.eps must be in (0, 2), got {d.eps}")
            _check(d.target_fraction is None or 0 < d.target_fraction <= 1,
                   f"semdedup.target_fraction must be in (0, 1], got {d.target_fraction}")
            _check(min(d.k, d.niter, d.block_size, d.passes) >= 1,
                   "semdedup.k, .niter, .block_size and .passes must be >= 1")
        if "clip_score" in self.stages:
            c = self.clip_score
            _check((c.threshold is None) != (c.fraction is None),
                   "clip_score: give exactly one of threshold and fraction")
            _check(c.fraction is None or 0 < c.fraction <= 1,
                   f"clip_score.fraction must be in (0, 1], got {c.fraction}")
        if any(s in SELECTORS for s in self.stages):
            s = self.select
            _check((s.target_fraction is None) != (s.target_size is None),
                   "select: give exactly one of target_fraction and target_size")
            _check(s.target_fraction is None or 0 < s.target_fraction <= 1,
                   f"select.target_fraction must be in (0, 1], got {s.target_fraction}")
            _check(s.target_size is None or s.target_size >= 1,
                   f"select.target_size must be >= 1, got {s.target_size}")
            _check(s.temperature > 0, f"select.temperature must be > 0, got {s.temperature}")
            _check(s.k >= 1 and s.niter >= 1, "select.k and select.niter must be >= 1")
            _check(s.num_neighbors >= 1, f"select.num_neighbors must be >= 1, got {s.num_neighbors}")
            _check("dbp" not in self.stages or s.k > s.num_neighbors,
                   f"select.k={s.k} must exceed select.num_neighbors={s.num_neighbors} (d_inter "
                   "averages that many other centroids)")
            _check(0 <= s.balance_ratio <= 1, f"select.balance_ratio must be in [0, 1], got {s.balance_ratio}")
            _check(s.min_per_cluster >= 0, f"select.min_per_cluster must be >= 0, got {s.min_per_cluster}")
            _check(s.solver in ("exact", "osqp"), f"select.solver must be exact or osqp, got {s.solver!r}")
            _check(s.tol is None or s.tol >= 0, f"select.tol must be >= 0, got {s.tol}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


KINDS = ("open_clip", "sentence_transformers", "efficientnet_lite0", "timm")
MODALITIES = ("image", "text", "both")
RANDOM_INIT_KINDS = ("open_clip", "timm")  # kinds whose weights come only from ``checkpoint``


@dataclass
class EncoderConfig:
    """Which model embeds the pool, and on what."""

    kind: str = "open_clip"
    """encoder family: open_clip, sentence_transformers, efficientnet_lite0 or timm"""
    model: str = "ViT-B-32"
    """architecture name, model-config JSON, or local model directory (sentence_transformers;
    minilm is the paper's all-MiniLM-L6-v2 from its package)"""
    checkpoint: Optional[str] = None
    """local weights file; open_clip and timm need one (efficientnet_lite0: its package's
    weights by default)"""
    modality: str = "image"
    """what is embedded: image, text, or both (concatenated, renormalised)"""
    image_size: Optional[int] = None
    """input resolution for efficientnet_lite0 and timm (None: the model's own); small images
    (the demo's 64 px) need no upscaling"""
    random_init: bool = False
    """open_clip or timm with random weights and no checkpoint: tests and smoke runs only"""

    def validate(self) -> "EncoderConfig":
        if self.kind not in KINDS:
            raise ValueError(f"encoder.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"encoder.modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        text_only, image_only = self.kind == "sentence_transformers", self.kind in ("efficientnet_lite0", "timm")
        if (text_only and self.modality != "text") or (image_only and self.modality != "image"):
            raise ValueError(f"encoder.modality={self.modality!r} is not available for kind {self.kind!r}")
        if self.image_size is not None and (self.kind not in ("efficientnet_lite0", "timm") or self.image_size < 32):
            raise ValueError(f"encoder.image_size: give >= 32, for kind efficientnet_lite0 or timm "
                             f"(got {self.image_size} for {self.kind!r})")
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            raise ValueError(f"encoder.checkpoint: no file {self.checkpoint}")
        if self.random_init and self.kind not in RANDOM_INIT_KINDS:
            raise ValueError(f"encoder.random_init: kind {self.kind!r} always loads its own weights; "
                             "random_init=true is for open_clip or timm")
        if self.random_init and self.checkpoint:
            raise ValueError(f"encoder.random_init: true contradicts encoder.checkpoint={self.checkpoint}; "
                             "give one or the other")
        if self.kind in RANDOM_INIT_KINDS and not self.checkpoint and not self.random_init:
            # random embeddings (and random clip scores) would prune the pool at random, silently
            raise ValueError(f"encoder.checkpoint: {self.kind} model {self.model!r} has no weights; give a "
                             "local weights file (encoder.checkpoint=...) or set encoder.random_init=true "
                             "for random weights (tests and smoke runs only)")
        return self

    def identity(self) -> dict:
        """The encoder as store keys, ``embed.json`` and store manifests record it: its fields,
        ``random_init`` only when true, so that a store embedded before that field existed (always
        with weights) keeps its cache key and still matches its manifest."""
        fields = asdict(self)
        if not self.random_init:
            del fields["random_init"]
        return fields


def pool_size_needed(config: PruneConfig) -> int:
    """The fewest samples ``config`` can run on: what :func:`check_pool_size` checks against
    (a caller counting a pool can stop there)."""
    s = config.select
    return max(config.semdedup.k if "semdedup" in config.stages else 0,
               s.k if any(x in ("dbp", "ssp") for x in config.stages) else 0,
               (s.target_size or 0) if any(x in SELECTORS for x in config.stages) else 0)


def check_pool_size(config: PruneConfig, n: int, where: str = "the pool") -> None:
    """Raise ValueError, saying what to set, for an option the pool of ``n`` samples cannot
    satisfy (cells or clusters, a target size). Cheap: callers run it before embedding, from
    the shards' sample counts, so that a hidden default does not fail after the GPU work."""
    if "semdedup" in config.stages and config.semdedup.k > n:
        raise ValueError(f"semdedup.k={config.semdedup.k} exceeds the {n:,} samples in {where}: "
                         f"set semdedup.k to at most {n:,}")
    if any(s in SELECTORS for s in config.stages):
        s = config.select
        if s.target_size is not None and s.target_size > n:
            raise ValueError(f"select.target_size={s.target_size:,} exceeds the {n:,} samples in "
                             f"{where}: set a smaller select.target_size or select.target_fraction")
        if s.k > n and "random" not in config.stages:
            raise ValueError(f"select.k={s.k} exceeds the {n:,} samples in {where}: set select.k "
                             f"to at most {n:,}")


def default_workers(cap: int = 4) -> int:
    """Data-loading workers when none are given: ``cap``, or fewer on a machine (or a CPU
    affinity mask) with fewer cores, so that workers never outnumber the cores they share."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cap, cores))


def _stage_rank(stage: str) -> int:
    return {"semdedup": 0, "clip_score": 1}.get(stage, 2)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
