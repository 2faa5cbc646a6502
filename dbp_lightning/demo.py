"""``dbp-lightning demo``: the whole mission on real offline data, on a laptop-class CPU.

Builds (or reuses) the demo data, embeds the images with EfficientNet-Lite0, prunes with
SemDeDup -> DBP, trains a small CLIP on the pruned pool and on the full pool for the same number
of samples seen, evaluates both zero-shot on the held-out sets, and prints a table.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .config import PruneConfig, SelectConfig, SemDeDupConfig
from .evaluation.tasks import Task

DEMO_TASKS = (
    Task("demo-fashion_mnist", "Fashion-MNIST", "classification", "acc1", "Demo"),
    Task("demo-clipart_categories", "Clip-art categories", "classification", "mean_per_class_recall", "Demo"),
    Task("demo-retrieval", "Caption retrieval", "retrieval", "mean_recall@1", "Demo"),
)


@dataclass
class DemoConfig:
    """What the demo runs; every field is a ``dbp-lightning demo`` flag."""

    out: str = "runs/demo"
    max_per_source: Optional[int] = None     #: cap the pool per source (quick looks, tests)
    model: str = "tiny-clip"                 #: the CLIP trained on both pools
    samples_seen: Optional[int] = None       #: per model; default 3 passes over the full pool
    batch_size: int = 64
    lr: float = 1e-3
    dedup_target_fraction: float = 0.85      #: SemDeDup keeps this fraction of the pool
    keep: float = 0.5                        #: DBP keeps this fraction of the dedup survivors
    k: int = 50                              #: DBP clusters
    num_workers: int = 2
    seed: int = 0


def prune_config(cfg: DemoConfig, k_dedup: int) -> PruneConfig:
    return PruneConfig(stages=["semdedup", "dbp"], seed=cfg.seed,
                       semdedup=SemDeDupConfig(k=k_dedup, eps=None, target_fraction=cfg.dedup_target_fraction),
                       select=SelectConfig(target_fraction=cfg.keep, k=cfg.k, num_neighbors=min(20, cfg.k - 1)))


def train_and_evaluate(cfg: DemoConfig, name: str, prune: PruneConfig, data: Path, steps: int) -> dict:
    """One model on one pool: fit for ``steps`` batches, then the held-out tasks."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from .clip_module import CLIPModule
    from .datamodule import DBPDataModule
    from .encoders import EncoderConfig
    from .evaluation import evaluate_tasks

    out = Path(cfg.out) / name
    dm = DBPDataModule(str(data / "train"), cache_dir=str(Path(cfg.out) / "cache"),
                       encoder=EncoderConfig(kind="efficientnet_lite0", model="efficientnet-lite0"),
                       prune=prune, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                       embed_batch_size=128)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = CLIPModule(cfg.model, lr=cfg.lr, warmup_steps=max(1, steps // 20), seed=cfg.seed)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=CSVLogger(out), enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=out)
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - started
    rows, summary = evaluate_tasks(model.model, model.preprocess_val, model.tokenizer, list(DEMO_TASKS),
                                   str(data / "eval"), out_dir=str(out), batch_size=256)
    return {"pool": name, "train_samples": int(dm.report["kept"]), "steps": steps,
            "samples_seen": steps * cfg.batch_size, "fit_seconds": round(seconds, 1),
            "metrics": {r["dataset"]: r["metrics"].get("main_metric") for r in rows},
            "average": summary["Average"], "available": summary["available"],
            "prune_report": dm.report}


def run_demo(cfg: DemoConfig) -> dict:
    from .data.demo import DemoSpec, build_demo

    data = Path(cfg.out) / "data"
    built = build_demo(data, DemoSpec(max_per_source=cfg.max_per_source), workers=cfg.num_workers,
                       progress=True)
    n = built["train_samples"]
    samples = cfg.samples_seen or 3 * n
    steps = max(1, samples // cfg.batch_size)
    k_dedup = max(2, int(math.sqrt(n)))  # a partition for dedup; cost balanced at ~sqrt(N)
    results = [train_and_evaluate(cfg, "full", PruneConfig(stages=[]), data, steps),
               train_and_evaluate(cfg, "dbp", prune_config(cfg, k_dedup), data, steps)]
    summary = {"config": asdict(cfg), "data": built, "results": results}
    out = Path(cfg.out)
    from .atomic import atomic_path, write_json

    write_json(out / "demo_results.json", summary)
    table = format_demo_table(results)
    with atomic_path(out / "demo_results.md") as tmp:
        tmp.write_text(table + "\n")
    return summary


def format_demo_table(results: list[dict]) -> str:
    names = [t.name for t in DEMO_TASKS]
    lines = ["| pool | training samples | samples seen | " + " | ".join(names) + " | average |",
             "|---|---:|---:|" + "---:|" * (len(names) + 1)]
    for r in results:
        cells = [f"{r['metrics'][n]:.3f}" if r["metrics"].get(n) is not None else "missing" for n in names]
        avg = "-" if r["average"] is None else f"{r['average']:.3f}"
        lines.append(f"| {r['pool']} | {r['train_samples']:,} | {r['samples_seen']:,} | " + " | ".join(cells)
                     + f" | {avg} |")
    return "\n".join(lines)
