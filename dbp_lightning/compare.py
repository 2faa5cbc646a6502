"""``dbp-lightning compare``: the paper's experiment as a command.

One model per subset of a pool (full, SemDeDup only, CLIP score, random, SSP, DBP, each at the
configured fractions of the pool) and per seed, trained with one recipe at an equal budget,
evaluated zero-shot on held-out tasks; then a table (markdown, CSV, JSON) of mean +- std over
seeds and the paper's accuracy-against-cost plot.

The recipe is :class:`~dbp_lightning.projection.ProjectionCLIP`: frozen image and text towers
(the same image encoder that prunes) embed the pool once; each run trains only the heads, so a
CPU runs the whole grid. Random, SSP and DBP all select after the same ``filters`` (SemDeDup by
default, the paper's setting), so they differ in the selection alone.

Runs are independent and resumable: each writes ``<out>/runs/<subset>/seed<s>/result.json``
last, and a finished run with the same settings is never run again. On a cluster, launch one
process per run with ``--only dbp-0.5 --seeds [1]`` (after one process has filled the cache),
then ``--collect`` to build the table from whatever has finished.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .config import EncoderConfig, PruneConfig, SELECTORS

log = logging.getLogger(__name__)

METHODS = ("full", "semdedup", "clip_score") + SELECTORS
BUDGETS = ("samples_seen", "epochs")


class SubsetSpec(NamedTuple):
    """One subset of the pool, named ``full`` or ``<method>-<fraction of the pool>``."""

    method: str
    fraction: float = 1.0

    @property
    def name(self) -> str:
        return "full" if self.method == "full" else f"{self.method}-{self.fraction:g}"

    @classmethod
    def parse(cls, name: str) -> "SubsetSpec":
        method, _, fraction = name.partition("-")
        try:
            spec = cls(method, 1.0 if method == "full" else float(fraction))
        except ValueError:
            spec = None
        if spec is None or method not in METHODS or (method == "full") != (not fraction) \
                or not 0 < spec.fraction <= 1:
            raise ValueError(f"subsets: {name!r} is not 'full' nor '<method>-<fraction>' with method one "
                             f"of {', '.join(METHODS[1:])} and fraction in (0, 1], e.g. dbp-0.5")
        return spec


@dataclass
class RecipeConfig:
    """How each model trains (``ProjectionCLIP``) and for how long."""

    embed_dim: int = 256
    """width of the shared space"""
    batch_size: int = 256
    """contrastive batch"""
    lr: float = 1e-3
    """AdamW peak learning rate (cosine decay after the warmup)"""
    weight_decay: float = 0.1
    """AdamW weight decay"""
    warmup_steps: int = 50
    """linear warmup steps"""
    budget: str = "samples_seen"
    """samples_seen (every model sees as many pairs) or epochs"""
    samples_seen: Optional[int] = None
    """budget samples_seen: pairs per model (None: 10 passes over the pool)"""
    epochs: float = 10.0
    """budget epochs: passes over each model's own subset"""


@dataclass
class CompareConfig:
    """The experiment; every field is a ``dbp-lightning compare`` option (YAML or flag)."""

    pool: str = ""
    """training shards: brace pattern, glob or directory"""
    eval_root: str = ""
    """held-out tasks in clip_benchmark's WebDataset layout"""
    tasks: list[str] = field(default_factory=lambda: ["demo"])
    """keys, or imagenet / datacomp38 / demo"""
    out: str = "runs/compare"
    """results directory: runs/<subset>/seed<s>/, compare_results.{md,csv,json}, compare.png"""
    cache_dir: Optional[str] = None
    """embedding/prune cache (None: <out>/cache)"""
    image_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(
        kind="efficientnet_lite0", model="efficientnet-lite0"))
    """the frozen image tower, whose embeddings are also pruned"""
    text_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(
        kind="sentence_transformers", model="minilm", modality="text"))
    """the frozen text tower"""
    filters: list[str] = field(default_factory=lambda: ["semdedup"])
    """filter stages run before random/ssp/dbp (semdedup, clip_score)"""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """stage options; stages set per subset"""
    subsets: list[str] = field(default_factory=lambda: ["full", "random-0.5", "ssp-0.5", "dbp-0.5"])
    """one model per subset: full, semdedup, clip_score, or <random|ssp|dbp>-<fraction kept>"""
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """how each model trains, and for how long"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """one run per subset and seed (pruning and training seeded alike)"""
    num_workers: int = 2
    """data-loading workers when embedding"""

    def validate(self) -> "CompareConfig":
        from .evaluation.features import FEATURE_KINDS
        from .evaluation.tasks import select_tasks

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(bool(self.pool), "pool: give the training shards")
        check(bool(self.eval_root), "eval_root: give the folder of held-out tasks")
        tasks = select_tasks(self.tasks)  # raises naming an unknown key
        check(bool(tasks), "tasks: give at least one")
        other = [t.key for t in tasks if t.kind not in FEATURE_KINDS]
        check(not other, f"tasks: {', '.join(other)} need the full evaluation (dbp-lightning eval); "
                         f"compare scores {' and '.join(FEATURE_KINDS)} tasks on cached features")
        self.image_encoder.validate()
        self.text_encoder.validate()
        check(self.text_encoder.modality == "text", "text_encoder.modality must be text")
        check(self.image_encoder.modality == "image", "image_encoder.modality must be image")
        check(all(f in ("semdedup", "clip_score") for f in self.filters),
              f"filters: only semdedup and clip_score, got {self.filters}")
        check(bool(self.subsets), "subsets: give at least one")
        names = [s.name for s in self.subset_specs]
        check(len(set(names)) == len(names), f"subsets: {self.subsets} lists a subset twice")
        for s in self.subset_specs:
            subset_prune_config(self, s, seed=0, pool_size=None).validate()
        r = self.recipe
        check(r.budget in BUDGETS, f"recipe.budget must be one of {', '.join(BUDGETS)}, got {r.budget!r}")
        check(min(r.embed_dim, r.batch_size) >= 1 and r.lr > 0 and r.epochs > 0,
              "recipe: embed_dim and batch_size >= 1, lr and epochs > 0")
        check(r.samples_seen is None or r.samples_seen >= r.batch_size,
              "recipe.samples_seen must be at least one batch")
        check(bool(self.seeds), "seeds: give at least one")
        return self

    @property
    def subset_specs(self) -> list[SubsetSpec]:
        return [SubsetSpec.parse(s) for s in self.subsets]

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


def subset_prune_config(cfg: CompareConfig, subset: SubsetSpec, seed: int,
                        pool_size: Optional[int]) -> PruneConfig:
    """The prune run that makes ``subset`` (``pool_size`` None: for validation only)."""
    p = cfg.prune
    if subset.method == "full":
        return dataclasses.replace(p, input="-", stages=[], seed=seed)
    if subset.method == "semdedup":
        return dataclasses.replace(p, input="-", stages=["semdedup"], seed=seed,
                                   semdedup=dataclasses.replace(p.semdedup, eps=None, target_fraction=subset.fraction))
    if subset.method == "clip_score":
        return dataclasses.replace(p, input="-", stages=["clip_score"], seed=seed,
                                   clip_score=dataclasses.replace(p.clip_score, threshold=None, fraction=subset.fraction))
    target = max(1, round(subset.fraction * (pool_size or 1)))
    return dataclasses.replace(p, input="-", stages=list(cfg.filters) + [subset.method], seed=seed,
                               select=dataclasses.replace(p.select, target_fraction=None, target_size=target))


def _steps(recipe: RecipeConfig, pool_size: int, subset_size: int) -> int:
    if recipe.budget == "epochs":
        return max(1, round(recipe.epochs * subset_size / recipe.batch_size))
    return max(1, (recipe.samples_seen or 10 * pool_size) // recipe.batch_size)


class Experiment:
    """The shared inputs of every run: the two stores and the held-out task features."""

    def __init__(self, cfg: CompareConfig):
        from . import cache
        from .data.shards import expand_shards
        from .evaluation.features import task_features
        from .evaluation.tasks import select_tasks
        from .projection import paired_features
        from .store import EmbeddingStore

        self.cfg = cfg.validate()
        shards = expand_shards(cfg.pool)
        self.image_store = cache.ensure_store(cfg.cache, shards, cfg.image_encoder, num_workers=cfg.num_workers)
        self.text_store = cache.ensure_store(cfg.cache, shards, cfg.text_encoder, num_workers=cfg.num_workers)
        self.pool_size = len(EmbeddingStore(self.image_store))
        # every run trains on a subset of these pairs: read both stores once, not once per run
        self.keys, self.image, self.text = paired_features(self.image_store, self.text_store)
        self.tasks = select_tasks(cfg.tasks)
        self.features = task_features(cfg.cache, cfg.eval_root, self.tasks, cfg.image_encoder, cfg.text_encoder)

    def prune_dir(self, subset: SubsetSpec, seed: int) -> Path:
        from . import cache

        config = subset_prune_config(self.cfg, subset, seed, self.pool_size)
        return cache.ensure_pruned(self.cfg.cache, self.image_store, config, progress=False)

    def run(self, subset: SubsetSpec, seed: int) -> dict:
        """Train and evaluate one model (or return the finished result of the same settings)."""
        import lightning as L
        import pyarrow.parquet as pq
        import torch
        from lightning.pytorch.loggers import CSVLogger
        from torch.utils.data import DataLoader, TensorDataset

        from .atomic import write_json
        from .cache import digest
        from .evaluation.features import evaluate_features
        from .projection import ProjectionCLIP
        from .pruning.pipeline import id_column

        out = Path(self.cfg.out) / "runs" / subset.name / f"seed{seed}"
        prune_dir = self.prune_dir(subset, seed)
        settings = digest({"prune": prune_dir.name, "text": self.text_store.name, "recipe": asdict(self.cfg.recipe),
                           "tasks": {k: f.source for k, f in self.features.items()}, "seed": seed})
        done = out / "result.json"
        finished = json.loads(done.read_text()) if done.is_file() else {}
        if finished.get("settings") == settings:
            return finished
        idcol = id_column(pq.read_schema(prune_dir / "selection.parquet").names)
        selection = pq.read_table(prune_dir / "selection.parquet", columns=[idcol, "kept"])
        kept = selection.column(idcol).to_numpy(zero_copy_only=False)[
            selection.column("kept").to_numpy(zero_copy_only=False)]
        # a set, not np.isin: keys are Python strings, which np.isin compares pairwise (2 min
        # per model at 89k pairs)
        kept = set(kept.tolist())
        pairs = np.fromiter((k in kept for k in self.keys), bool, len(self.keys))
        image, text = self.image[pairs], self.text[pairs]
        r = self.cfg.recipe
        if len(image) < r.batch_size:
            raise ValueError(f"subsets: {subset.name} keeps {len(image)} pairs, fewer than "
                             f"recipe.batch_size={r.batch_size}")
        steps = _steps(r, self.pool_size, len(image))
        L.seed_everything(seed, workers=True, verbose=False)
        model = ProjectionCLIP(image.shape[1], text.shape[1], r.embed_dim, r.lr, r.weight_decay,
                               min(r.warmup_steps, steps), seed)
        loader = DataLoader(TensorDataset(torch.from_numpy(image), torch.from_numpy(text)),
                            batch_size=r.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=CSVLogger(out, name="", version=""),
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False, deterministic=True, log_every_n_steps=10)
        trainer.fit(model, loader)
        rows, summary = evaluate_features(model.cpu(), self.features, self.tasks)
        result = {"subset": subset.name, "method": subset.method, "fraction": subset.fraction,
                  "seed": seed, "settings": settings, "train_pairs": len(image), "steps": steps,
                  "samples_seen": steps * r.batch_size, "final_loss": float(trainer.callback_metrics["train/loss"]),
                  "metrics": {row["dataset"]: row["metrics"].get("main_metric") for row in rows},
                  "chance": {row["dataset"]: row["chance"] for row in rows if "chance" in row},
                  "average": summary["Average"], "available": summary["available"],
                  "prune_dir": str(prune_dir), "prune_report": json.loads((prune_dir / "report.json").read_text())}
        write_json(done, result)
        return result


def selected_runs(cfg: CompareConfig, only: Optional[list[str]] = None) -> list[tuple[SubsetSpec, int]]:
    """(subset, seed) pairs of ``cfg`` (its subsets named in ``only``, when given)."""
    specs = cfg.subset_specs
    unknown = sorted(set(only or []) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"--only: no subset {unknown[0]!r}; the config has {', '.join(cfg.subsets)}")
    return [(s, seed) for s in specs if not only or s.name in only for seed in cfg.seeds]


def run_compare(cfg: CompareConfig, only: Optional[list[str]] = None, progress: bool = True) -> list[dict]:
    """Run the selected (subset, seed) pairs that have not finished; returns their results."""
    from tqdm.auto import tqdm

    runs = selected_runs(cfg, only)
    experiment = Experiment(cfg)
    results = []
    with tqdm(runs, desc="compare", unit="model", disable=not progress) as bar:
        for subset, seed in bar:
            bar.set_postfix_str(f"{subset.name} seed {seed}")
            results.append(experiment.run(subset, seed))
    return results


def collect(cfg: CompareConfig) -> tuple[list[dict], list[dict]]:
    """(every finished run's result, one summary row per subset with mean/std over seeds)."""
    results = []
    for subset, seed in selected_runs(cfg):
        path = Path(cfg.out) / "runs" / subset.name / f"seed{seed}" / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    summary = []
    for subset in cfg.subset_specs:
        runs = [r for r in results if r["subset"] == subset.name]
        if not runs:
            continue
        row = {"subset": subset.name, "method": subset.method, "seeds": len(runs),
               "train_pairs": float(np.mean([r["train_pairs"] for r in runs])),
               "samples_seen": float(np.mean([r["samples_seen"] for r in runs]))}
        for metric in list(runs[0]["metrics"]) + ["average"]:
            values = [r["average"] if metric == "average" else r["metrics"][metric] for r in runs]
            values = [v for v in values if v is not None]
            row[metric] = (float(np.mean(values)), float(np.std(values))) if values else None
        summary.append(row)
    return results, summary


#: the fields of a summary row (``collect``) that are not metrics
SUMMARY_FIELDS = ("subset", "method", "seeds", "train_pairs", "samples_seen")


def metric_names(summary: list[dict]) -> list[str]:
    """The metrics of ``collect``'s summary rows: each task's, then ``average``."""
    return [k for k in summary[0] if k not in SUMMARY_FIELDS]


def format_table(summary: list[dict]) -> str:
    """Markdown: per subset, each metric as mean +- std over seeds (the value, for one seed)."""
    if not summary:
        return "(no finished runs)"
    metrics = metric_names(summary)
    lines = ["| subset | training pairs | samples seen | seeds | " + " | ".join(metrics) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(metrics)]
    for row in summary:
        # a spread is shown only where there is one: one seed has no std to report
        cells = ["-" if row[m] is None else f"{row[m][0]:.3f}" + (f" ± {row[m][1]:.3f}" if row["seeds"] > 1 else "")
                 for m in metrics]
        lines.append(f"| {row['subset']} | {row['train_pairs']:,.0f} | {row['samples_seen']:,.0f} | "
                     f"{row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(cfg: CompareConfig, results: list[dict], summary: list[dict]) -> Path:
    """compare_results.{md,csv,json} and compare.png under ``cfg.out``; returns the markdown path."""
    from .atomic import atomic_path, write_json
    from .plots import accuracy_vs_cost

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_results.json", {"config": asdict(cfg), "summary": summary, "runs": results})
    metrics = list(results[0]["metrics"]) if results else []
    with atomic_path(out / "compare_results.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["subset", "method", "fraction", "seed", "train_pairs", "samples_seen"]
                            + metrics + ["average"])
            for r in results:
                writer.writerow([r["subset"], r["method"], r["fraction"], r["seed"], r["train_pairs"],
                                 r["samples_seen"]] + [r["metrics"][m] for m in metrics] + [r["average"]])
    with atomic_path(out / "compare_results.md") as tmp:
        tmp.write_text(format_table(summary) + "\n")
    if summary:
        metrics = metric_names(summary)
        chance = results[0].get("chance", {}) if results else {}
        if chance and len(chance) == len(metrics) - 1:  # the average's chance: the tasks' mean
            chance = {**chance, "average": sum(chance.values()) / len(chance)}
        accuracy_vs_cost(summary, metrics[-1:] + metrics[:-1], cfg.recipe.budget, out / "compare.png",
                         chance=chance)
    return out / "compare_results.md"
