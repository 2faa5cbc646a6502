"""Zero-shot evaluation through clip_benchmark's own evaluators, on local data only.

Each task's data is read from ``<data_root>/<task.folder>`` in clip_benchmark's WebDataset
layout; ImageNet-1k can instead come from an ImageFolder, named with open_clip's ImageNet class
names and OpenAI templates; WinoGAViL comes from a Hugging Face ``datasets`` copy (see
``winogavil.py``). WILDS and fairness tasks add DataComp's worst-group metrics from their
``.npy`` metadata (``grouped.py``). A task whose data is absent is reported as missing: never
as zero, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .aggregate import aggregate, label
from .grouped import grouped_metrics
from .hf_copy import ImageCaptions, load_test_split
from .winogavil import evaluate_winogavil
from .tasks import Task

def _device(device: Optional[str]) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def imagenet_folder_loader(folder: str, transform: Callable, batch_size: int, num_workers: int):
    """An ImageFolder (``val/<wnid>/*.JPEG``, 1,000 sorted class folders) with open_clip's names."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(folder, transform=transform)
    if len(ds.classes) != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"imagenet_folder: {folder} has {len(ds.classes)} class folders, not 1000")
    ds.classes = list(IMAGENET_CLASSNAMES)
    templates = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers), ds.classes, templates


def evaluate_task(model, transform: Callable, tokenizer: Callable, task: Task, data_root: Optional[str],
                  batch_size: int = 64, num_workers: int = 0, device: Optional[str] = None,
                  imagenet_folder: Optional[str] = None) -> dict:
    """One task as a DataComp-style result row.

    Args:
        model: an open_clip model (``encode_image``, ``encode_text``), in eval mode.
        transform: PIL -> tensor (the model's ``preprocess_val``); tokenizer: list[str] -> ids.

    Returns:
        ``{"key", "dataset", "status", "metrics"}``; status "ok" with ``metrics["main_metric"]``,
        or "missing" with a ``reason`` and no metric.
    """
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    row = {"key": task.key, "dataset": task.name, "metrics": {}}
    device = _device(device)
    folder = Path(data_root or "") / task.folder
    use_folder = task.key == "imagenet1k" and imagenet_folder and not folder.is_dir()
    amp = device == "cuda"
    # DataComp's retrieval/* and misc/* tasks live in Hugging Face copies named after the key
    hf_name = task.key.split("/", 1)[1] if "/" in task.key and task.kind in ("winogavil", "retrieval") else None
    hf = load_test_split(data_root, hf_name) if hf_name else None  # DataComp's own source first
    if task.kind == "winogavil":
        if hf is None:
            return {**row, "status": "missing",
                    "reason": f"no {Path(data_root or '') / hf_name} nor hf_cache with nlphuji/{hf_name}"}
        metrics = evaluate_winogavil(model, transform, tokenizer, hf, device)
        return {**row, "status": "ok", "metrics": {**metrics, "main_metric": metrics[task.main_metric]}}
    if hf is None and not use_folder and not (folder / "test" / "nshards.txt").is_file():
        return {**row, "status": "missing", "reason": f"no data at {folder}"}
    if hf is not None:
        loader = DataLoader(ImageCaptions(hf, transform), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=image_captions_collate_fn)
    elif use_folder:
        loader, classnames, templates = imagenet_folder_loader(imagenet_folder, transform, batch_size, num_workers)
    else:
        ds = build_dataset(f"wds/{task.key}", root=str(folder), transform=transform, split="test",
                           download=False,
                           task="zeroshot_retrieval" if task.kind == "retrieval" else "zeroshot_classification")
        if task.kind == "retrieval":
            loader = DataLoader(ds.batched(batch_size, collation_fn=image_captions_collate_fn),
                                batch_size=None, num_workers=num_workers)
        else:
            loader = DataLoader(ds.batched(batch_size), batch_size=None, num_workers=num_workers)
        classnames, templates = ds.classes, ds.templates
    model.eval()
    if task.kind == "retrieval":
        n_images = len(hf) if hf is not None else _count_images(folder)
        ks = [k for k in (1, 5, 10) if k <= n_images]  # recall@k needs k images
        metrics = zeroshot_retrieval.evaluate(model, loader, tokenizer, device, amp=amp, recall_k_list=ks)
        metrics["mean_recall@1"] = 0.5 * (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"])
    elif task.kind in ("wilds", "fairness"):
        classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates,
                                                                  device, amp=amp)
        logits, target = zeroshot_classification.run_classification(model, classifier, loader, device, amp=amp)
        labels, metadata = _metadata(folder, batch_size, num_workers)
        if not torch.equal(labels, target):  # scores and groups must describe the same samples
            raise RuntimeError(f"{folder}: metadata order does not match the predictions")
        metrics = grouped_metrics(task.key, logits.numpy(), target.numpy(), metadata.numpy())
    else:
        metrics = zeroshot_classification.evaluate(model, loader, tokenizer, classnames, templates, device, amp=amp)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["main_metric"] = metrics[task.main_metric]
    return {**row, "status": "ok", "metrics": metrics}


def _metadata(folder: Path, batch_size: int, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (N,) and ``.npy`` metadata (N, F) of a task's test shards, read through a loader
    split over workers exactly as the prediction loader is, so rows come in the same order."""
    import webdataset as wds

    n = int((folder / "test" / "nshards.txt").read_text())
    shards = [str(folder / "test" / f"{i}.tar") for i in range(n)]
    ds = (wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=_all_shards)
          .decode().to_tuple("cls", "npy").batched(batch_size))
    labels, metadata = [], []
    for cls, npy in DataLoader(ds, batch_size=None, num_workers=num_workers):
        labels.append(torch.as_tensor(cls))
        metadata.append(torch.as_tensor(np.asarray(npy)))
    return torch.cat(labels), torch.cat(metadata)


def _count_images(folder: Path) -> int:
    """Images in a task's test shards, from the tar headers alone."""
    import tarfile

    n = int((folder / "test" / "nshards.txt").read_text())
    exts = (".webp", ".png", ".jpg", ".jpeg")
    total = 0
    for i in range(n):
        with tarfile.open(folder / "test" / f"{i}.tar") as tar:
            total += sum(m.name.lower().endswith(exts) for m in tar.getmembers())
    return total


def _all_shards(src):
    return src


def evaluate_tasks(model, transform, tokenizer, tasks: list[Task], data_root: Optional[str],
                   out_dir: Optional[str] = None, **kwargs) -> tuple[list[dict], dict]:
    """All ``tasks``: result rows and DataComp's aggregate (with the available count).

    With ``out_dir``, writes ``eval_results.jsonl`` (one row per task, DataComp's format plus
    ``status``) and ``eval_summary.json`` there.
    """
    rows = [evaluate_task(model, transform, tokenizer, t, data_root, **kwargs) for t in tasks]
    results = {r["dataset"]: r["metrics"]["main_metric"] for r in rows if r["status"] == "ok"}
    summary = aggregate(results, requested=tasks)
    if out_dir:
        from ..atomic import atomic_path, write_json

        os.makedirs(out_dir, exist_ok=True)
        with atomic_path(Path(out_dir) / "eval_results.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_json(Path(out_dir) / "eval_summary.json", summary)
    return rows, summary


def format_table(rows: list[dict], summary: dict) -> str:
    """A markdown table: each task's main metric (or why it has none), then the averages."""
    lines = ["| task | main metric | value |", "|---|---|---:|"]
    for r in rows:
        value = f"{r['metrics']['main_metric']:.4f}" if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['dataset']} | {_main_metric_name(r)} | {value} |")
    for group in ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average"):
        value = summary.get(group)
        if value is not None:  # a group with no task evaluated has no row
            lines.append(f"| **{label(group, summary)}** | mean | {value:.4f} |")
    lines.append(f"| tasks evaluated | | {summary['available']} |")
    return "\n".join(lines)


def _main_metric_name(row: dict) -> str:
    from .tasks import BY_KEY

    return BY_KEY[row["key"]].main_metric
