"""Configuration of ``prune`` and of the encoders: plain dataclasses that jsonargparse reads from
YAML and flags (no torch here: ``prune`` must not pay for importing it).

:meth:`PruneConfig.validate` checks everything that can be checked without the data; the
pipeline checks the rest (k and targets against the pool size) before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

STAGES = ("semdedup", "clip_score", "dbp", "ssp", "random")
SELECTORS = ("dbp", "ssp", "random")


@dataclass
class SemDeDupConfig:
    """SemDeDup. Its clustering is only a partition that keeps near-duplicates together, so it
    trains on a sample for few iterations (the paper's public code: 100 iterations on all)."""

    k: int = 1000                            #: cells of the dedup partition (two-level above 1,024)
    niter: int = 10                          #: k-means iterations
    sample: Optional[int] = None             #: k-means training rows (None: 256 per centroid)
    passes: int = 2                          #: partitions (seeds) searched; 1 = public SemDeDup
    eps: Optional[float] = None              #: remove when duplicate similarity > 1 - eps
    target_fraction: Optional[float] = 0.8   #: or: keep this fraction (eps found exactly)
    block_size: int = 4096                   #: rows per similarity block


@dataclass
class ClipScoreConfig:
    """CLIP-score filter on a per-sample metadata column."""

    column: str = "clip_score"               #: metadata column (LAION: similarity; DataComp: clip_l14_similarity_score)
    threshold: Optional[float] = None        #: keep score >= threshold
    fraction: Optional[float] = None         #: or: keep the top fraction


@dataclass
class SelectConfig:
    """The final selector (dbp, ssp or random) and its clustering."""

    target_fraction: Optional[float] = None  #: keep this fraction of the samples entering the selector
    target_size: Optional[int] = None        #: or: keep exactly this many
    k: int = 500                             #: clusters (paper: 500 LAION, 100 DataComp medium)
    niter: int = 100                         #: maximum k-means iterations (paper: 100)
    tol: Optional[float] = 1e-4              #: stop k-means when an iteration gains < tol relative
    sample: Optional[int] = None             #: k-means training rows (None: 256 per centroid)
    num_neighbors: int = 20                  #: l nearest centroids in d_inter (paper: 20)
    temperature: float = 0.1                 #: softmax temperature tau (paper: 0.1)
    min_per_cluster: int = 1                 #: lower bound of every quota (paper: 1)
    balance_ratio: float = 0.0               #: cluster balancing ratio (DBP paper: 0; SSP: 1.0)
    solver: str = "exact"                    #: quota QP: exact or osqp


@dataclass
class PruneConfig:
    """A prune run: the input, the stages in order, and each stage's options."""

    input: str = ""                          #: the pool: a store, a .npy, a DataComp, clip-retrieval/LAION or NeMo directory
    input_format: str = "auto"               #: auto, store, npy, datacomp, clip_retrieval or nemo
    array: Optional[str] = None              #: which embeddings: DataComp l14_img (default), l14_txt, b32_img, b32_txt; clip-retrieval img, txt
    id_column: Optional[str] = None          #: metadata column identifying a sample (default: uid, else the layout's key, else the row)
    metadata: Optional[str] = None           #: for a .npy input: parquet with key[, uid, scores]
    output: str = "runs/prune"               #: run directory to write
    stages: list[str] = field(default_factory=lambda: ["semdedup", "dbp"])
    seed: int = 0
    gpu: str = "auto"                        #: faiss on GPU: auto, true or false
    semdedup: SemDeDupConfig = field(default_factory=SemDeDupConfig)
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

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

    kind: str = "open_clip"                  #: open_clip, sentence_transformers, efficientnet_lite0, timm
    model: str = "ViT-B-32"                  #: architecture, model-config JSON, or model directory
    checkpoint: Optional[str] = None         #: local weights file; open_clip and timm need one
                                             #: (efficientnet_lite0: its package's by default)
    modality: str = "image"                  #: image, text, or both (concatenated, renormalised)
    image_size: Optional[int] = None         #: input resolution (None: the model's own); small
                                             #: images (the demo's 64 px) need no upscaling
    random_init: bool = False                #: open_clip/timm with random weights and no
                                             #: checkpoint: tests and smoke runs only

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


def _stage_rank(stage: str) -> int:
    return {"semdedup": 0, "clip_score": 1}.get(stage, 2)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
