"""``dbp-lightning demo``: the whole mission on real offline data, on a laptop-class CPU.

Builds (or reuses) the demo data, embeds the images with EfficientNet-Lite0 at their own 64 px
and the captions with MiniLM, prunes with SemDeDup -> DBP, trains a CLIP (frozen towers,
trained heads: :class:`~dbp_lightning.projection.ProjectionCLIP`) on the pruned pool and on the
full pool for the same number of samples seen, evaluates both zero-shot on the held-out sets,
writes ``report.html`` for the DBP run and prints a table. It is ``compare`` with two subsets
and one seed; ``configs/compare/demo.yaml`` is the full grid with three seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .compare import CompareConfig, RecipeConfig, SubsetSpec
from .config import EncoderConfig, PruneConfig, SelectConfig, SemDeDupConfig


@dataclass
class DemoConfig:
    """What the demo runs; every field is a ``dbp-lightning demo`` flag."""

    out: str = "runs/demo"
    """directory of the demo's data, caches, models, table and report.html"""
    max_per_source: Optional[int] = None
    """cap the pool per source (quick looks, tests)"""
    keep: float = 0.5
    """DBP keeps this fraction of the pool"""
    dedup_target_fraction: float = 0.85
    """SemDeDup keeps this fraction of the pool"""
    k: int = 50
    """DBP clusters"""
    passes: float = 10.0
    """samples seen per model, in passes over the full pool"""
    batch_size: int = 256
    """contrastive batch of each model"""
    num_workers: int = 2
    """render and data-loading processes"""
    seed: int = 0
    """seed of the pruning and of the training"""


def compare_config(cfg: DemoConfig, pool_size: int) -> CompareConfig:
    """The demo as a ``compare`` experiment: full vs DBP, one seed."""
    data = Path(cfg.out) / "data"
    prune = PruneConfig(semdedup=SemDeDupConfig(k=max(2, int(pool_size ** 0.5)), target_fraction=cfg.dedup_target_fraction),
                        select=SelectConfig(k=cfg.k, num_neighbors=min(20, cfg.k - 1)))
    samples_seen = max(cfg.batch_size, int(cfg.passes * pool_size))
    return CompareConfig(
        pool=str(data / "train"), eval_root=str(data / "eval"), tasks=["demo"], out=cfg.out,
        cache_dir=str(Path(cfg.out) / "cache"),
        image_encoder=EncoderConfig(kind="efficientnet_lite0", model="efficientnet-lite0", image_size=64),
        text_encoder=EncoderConfig(kind="sentence_transformers", model="minilm", modality="text"),
        filters=["semdedup"], prune=prune,
        subsets=["full", SubsetSpec("dbp", cfg.keep).name],
        recipe=RecipeConfig(batch_size=cfg.batch_size, samples_seen=samples_seen),
        seeds=[cfg.seed], num_workers=cfg.num_workers)


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns the data counts, the compare summary and the report's path."""
    from .compare import collect, run_compare, write_outputs
    from .data.demo import DemoSpec, build_demo
    from .report import write_report

    if not 0 < cfg.keep <= 1 or not 0 < cfg.dedup_target_fraction <= 1 or cfg.keep > cfg.dedup_target_fraction:
        raise ValueError("keep and dedup_target_fraction must be in (0, 1], keep <= dedup_target_fraction")
    data = Path(cfg.out) / "data"
    built = build_demo(data, DemoSpec(max_per_source=cfg.max_per_source), workers=cfg.num_workers,
                       progress=True)
    _forget_other_data(Path(cfg.out), built["fingerprint"])
    compare = compare_config(cfg, built["train_samples"])
    runs = run_compare(compare)
    results, summary = collect(compare)
    table = write_outputs(compare, results, summary)
    report = write_report(runs[1]["prune_dir"], compare.pool, out=Path(cfg.out) / "report.html")
    return {"config": asdict(cfg), "data": built, "summary": summary, "table": table, "report": str(report)}


def _forget_other_data(out: Path, fingerprint: str) -> None:
    """Set the demo's embeddings and models aside when they were made from other data.

    The cache knows shards by name and size (a pool of 10^8 samples cannot be hashed on every
    run), and a rebuilt demo shard with other pictures (other fonts, another spec) can keep its
    size to the tar block: its old embeddings and models would be taken for the new ones. The
    demo knows its data's fingerprint, so it can tell. Nothing is deleted: ``cache`` and
    ``runs`` move to ``stale-<old fingerprint>/``, said in one line, for the user to remove.
    Only a directory that held a demo's results (its stamp, or ``compare_results.json``) is
    touched: ``--out`` may name a directory whose ``cache`` serves other runs.
    """
    import logging

    from .atomic import atomic_path

    stamp = out / "data_fingerprint.txt"
    made_from = stamp.read_text().strip() if stamp.is_file() else None
    if made_from == fingerprint:
        return
    stale = [d for d in (out / "cache", out / "runs") if d.exists()]
    if stale and (made_from is not None or (out / "compare_results.json").is_file()):
        aside = out / f"stale-{made_from or 'unrecorded'}"
        aside.mkdir(parents=True, exist_ok=True)
        for d in stale:
            d.rename(aside / f"{d.name}-{len(list(aside.iterdir()))}" if (aside / d.name).exists()
                     else aside / d.name)
        logging.getLogger(__name__).warning(
            "demo: the data changed (fingerprint %s, results made from %s): embedding and training "
            "again; the old embeddings and models are in %s (remove it when done)",
            fingerprint, made_from or "unrecorded data", aside)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(stamp) as tmp:
        tmp.write_text(fingerprint + "\n")
