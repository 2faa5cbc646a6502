"""Zero-shot evaluation in the feature space of frozen towers (for :class:`ProjectionCLIP`).

A held-out task is read through clip_benchmark's own dataset builder (the same images, labels,
class names and templates as ``run.py``), embedded once by the frozen image and text encoders,
and cached as ``.npz``. A trained model is then evaluated by its heads alone, which costs
milliseconds. The metrics follow clip_benchmark's definitions: a class embedding is the
normalised mean of its normalised prompt embeddings; ``mean_per_class_recall`` is balanced
accuracy; retrieval ``image_retrieval_recall@k`` asks, per caption, whether its image is among
the k most similar images, ``text_retrieval_recall@k``, per image, whether any of its captions
is among the k most similar captions. ``tests/test_projection.py`` checks them against
clip_benchmark's evaluators on the same features.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import digest, encoder_key
from ..encoders import Encoder, EncoderConfig, build_encoder
from .aggregate import aggregate
from .tasks import Task

#: the task kinds scored here; the others (wilds, fairness, winogavil) need evaluation/run.py
FEATURE_KINDS = ("classification", "retrieval")


@dataclass
class TaskFeatures:
    """One held-out task embedded by the frozen towers.

    Classification: ``image`` float32 (N, d_image), ``labels`` int64 (N,), ``class_text``
    float32 (C, T, d_text) (C classes x T templates). Retrieval: ``image`` (N, d_image),
    ``text`` float32 (M, d_text) and ``text_image`` int64 (M,), the image of each caption.
    """

    kind: str
    image: np.ndarray
    labels: np.ndarray | None = None
    class_text: np.ndarray | None = None
    text: np.ndarray | None = None
    text_image: np.ndarray | None = None
    source: str = ""  #: the cache file it was read from (its name identifies data and encoders)

    def save(self, path: Path) -> None:
        from ..atomic import atomic_path

        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, kind=np.array(self.kind), **arrays)

    @classmethod
    def load(cls, path: Path) -> "TaskFeatures":
        with np.load(path) as z:
            return cls(kind=str(z["kind"]), **{k: z[k] for k in z.files if k != "kind"})


@torch.no_grad()
def embed_task(task: Task, data_root: str, image_encoder: Encoder, text_encoder: Encoder,
               batch_size: int = 256) -> TaskFeatures:
    """``task``'s test split (present under ``data_root``) embedded by the two encoders."""
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data.shards import count_pool

    folder = Path(data_root) / task.folder
    retrieval = task.kind == "retrieval"
    with warnings.catch_warnings():  # clip_benchmark leaves webdataset's shardshuffle unset
        warnings.filterwarnings("ignore", message=".*shardshuffle")
        ds = build_dataset(f"wds/{task.key}", root=str(folder), transform=image_encoder.image_transform,
                           split="test", download=False,
                           task="zeroshot_retrieval" if retrieval else "zeroshot_classification")

    def text(captions: list[str]) -> np.ndarray:
        out = [text_encoder.embed_texts(text_encoder.tokenize(captions[i : i + batch_size]))
               for i in range(0, len(captions), batch_size)]
        return torch.cat(out).numpy()

    images, labels, captions, owner, seen = [], [], [], [], 0
    batched = ds.batched(batch_size, collation_fn=image_captions_collate_fn) if retrieval else ds.batched(batch_size)
    n, _ = count_pool([str(t) for t in sorted((folder / "test").glob("*.tar"))], scan=64)
    for x, y in tqdm(DataLoader(batched, batch_size=None, num_workers=0), desc=f"embed {task.name}",
                     unit="batch", total=-(-n // batch_size) or None, leave=False):
        images.append(image_encoder.embed_images(x).numpy())
        if retrieval:
            for j, caps in enumerate(y):
                captions += caps
                owner += [seen + j] * len(caps)  # the row of the image these captions describe
        else:
            labels.append(np.asarray(y, np.int64))
        seen += len(x)
    image = np.concatenate(images)
    if retrieval:
        return TaskFeatures("retrieval", image, text=text(captions), text_image=np.asarray(owner, np.int64))
    prompts = [[t.format(c=c) if isinstance(t, str) else t(c) for t in ds.templates] for c in ds.classes]
    class_text = text([p for ps in prompts for p in ps]).reshape(len(prompts), len(prompts[0]), -1)
    return TaskFeatures("classification", image, labels=np.concatenate(labels), class_text=class_text)


def task_features(cache_dir: str | os.PathLike, data_root: str, tasks: list[Task],
                  image_encoder: EncoderConfig, text_encoder: EncoderConfig,
                  batch_size: int = 256) -> dict[str, TaskFeatures]:
    """Every present task's features, from the cache or embedded now; key: ``task.key``."""
    out, encoders = {}, None
    for task in tasks:
        folder = Path(data_root) / task.folder
        if not (folder / "test" / "nshards.txt").is_file():
            continue
        # every file the task is read from: the split's shards and the class names and
        # templates beside it
        stamp = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in folder.rglob("*") if p.is_file())
        key = digest({"task": task.key, "files": stamp, "image": encoder_key(image_encoder),
                      "text": encoder_key(text_encoder)})
        path = Path(cache_dir) / f"task-{task.key.replace('/', '_')}-{key}.npz"
        if not path.is_file():
            encoders = encoders or (build_encoder(image_encoder), build_encoder(text_encoder))
            path.parent.mkdir(parents=True, exist_ok=True)
            embed_task(task, data_root, *encoders, batch_size=batch_size).save(path)
        out[task.key] = TaskFeatures.load(path)
        out[task.key].source = path.name
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """acc1, acc5 (with >= 5 classes) and mean_per_class_recall of float (N, C) logits."""
    pred = logits.argmax(1)
    out = {"acc1": float((pred == labels).mean()),
           "mean_per_class_recall": float(np.mean([(pred[labels == c] == c).mean()
                                                   for c in np.unique(labels)]))}
    if logits.shape[1] >= 5:
        top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
        out["acc5"] = float((top5 == labels[:, None]).any(1).mean())
    return out


def _stable_positions(rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Where column ``cols[i]`` lands in a stable descending sort of row ``rows[i]`` of ``scores``:
    the entries greater than it, plus the equal ones before it. One pass, no sort."""
    out = np.empty(len(rows), np.int64)
    index = np.arange(scores.shape[1])
    for start in range(0, len(rows), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        block = scores[r]
        own = block[np.arange(len(r)), c][:, None]
        out[start : start + chunk] = ((block > own).sum(1)
                                      + ((block == own) & (index[None, :] < c[:, None])).sum(1))
    return out


def retrieval_metrics(scores: np.ndarray, text_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways of float (N_images, M_texts) similarities, k <= N_images only.

    The same numbers as ranking every row with a stable argsort (ties go to the lower index),
    found from each true match's position instead: O(N M) rather than O(N M log M) per k."""
    n_images, n_texts = scores.shape
    text_image = np.asarray(text_image, np.int64)
    captions = np.arange(n_texts)
    # per caption: the position of its image among all images
    image_rank = _stable_positions(captions, text_image, np.ascontiguousarray(scores.T))
    # per image: the best position of any of its captions among all captions
    caption_pos = _stable_positions(text_image, captions, scores)
    text_rank = np.full(n_images, np.iinfo(np.int64).max)
    np.minimum.at(text_rank, text_image, caption_pos)
    out = {}
    for k in [k for k in ks if k <= n_images]:
        out[f"image_retrieval_recall@{k}"] = float((image_rank < k).mean())
        out[f"text_retrieval_recall@{k}"] = float((text_rank < k).mean())
    out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    return out


def chance_level(metric: str, f: TaskFeatures) -> float:
    """What ``metric`` scores on the task ``f`` for a model that guesses: 1/C for accuracy and
    per-class recall over C classes (k/C for top-k), k/N for recall@k among N images (either way,
    with one caption per image, as the demo's and clip_benchmark's retrieval sets mostly have)."""
    k = int(metric.rsplit("@", 1)[1]) if "@" in metric else 5 if metric == "acc5" else 1
    n = len(f.image) if f.kind == "retrieval" else f.class_text.shape[0]
    return min(1.0, k / n)


@torch.no_grad()
def evaluate_features(model, features: dict[str, TaskFeatures], tasks: list[Task]) -> tuple[list[dict], dict]:
    """Rows and aggregate as ``evaluate_tasks`` returns them, for a model with
    ``encode_image``/``encode_text`` over cached features (a :class:`ProjectionCLIP`)."""
    model.eval()
    rows = []
    for task in tasks:
        row = {"key": task.key, "dataset": task.name, "metrics": {}}
        f = features.get(task.key)
        if f is None:
            rows.append({**row, "status": "missing", "reason": f"no data for {task.folder}"})
            continue
        image = model.encode_image(torch.from_numpy(f.image)).numpy()
        if f.kind == "retrieval":
            text = model.encode_text(torch.from_numpy(f.text)).numpy()
            metrics = retrieval_metrics(image @ text.T, f.text_image)
        else:
            c, t, d = f.class_text.shape
            prompts = model.encode_text(torch.from_numpy(f.class_text.reshape(c * t, d))).reshape(c, t, -1)
            classes = F.normalize(prompts.mean(1), dim=-1).numpy()
            metrics = classification_metrics(image @ classes.T, f.labels)
        rows.append({**row, "status": "ok", "metrics": {**metrics, "main_metric": metrics[task.main_metric]},
                     "chance": chance_level(task.main_metric, f)})
    results = {r["dataset"]: r["metrics"]["main_metric"] for r in rows if r["status"] == "ok"}
    return rows, aggregate(results, requested=tasks)
