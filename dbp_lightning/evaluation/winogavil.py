"""WinoGAViL (DataComp's version): for each cue, pick as many of the candidate images as it has
associations, by CLIP similarity to "A/An <cue>", and score the pick by Jaccard index.

The data is the Hugging Face dataset ``nlphuji/winogavil`` (test split), read offline from
``<data_root>/winogavil`` (a ``datasets`` ``save_to_disk`` directory) or from DataComp's
``<data_root>/hf_cache``; nothing downloads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def load_winogavil(data_root: Optional[str]):
    """The test split as a ``datasets.Dataset``, or None when neither location holds it."""
    import datasets

    root = Path(data_root or "")
    if (root / "winogavil").is_dir():
        return datasets.load_from_disk(str(root / "winogavil"))
    if (root / "hf_cache").is_dir():
        with _offline():
            try:
                return datasets.load_dataset("nlphuji/winogavil", split="test", cache_dir=str(root / "hf_cache"))
            except (FileNotFoundError, ConnectionError, ValueError):
                return None
    return None


@contextlib.contextmanager
def _offline():
    before = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_DATASETS_OFFLINE")
        else:
            os.environ["HF_DATASETS_OFFLINE"] = before


def cue_prompt(cue: str) -> str:
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" else f"A {cue}"


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    union = (y_true | y_pred).sum()
    return float((y_true & y_pred).sum() / union) if union else 1.0


def evaluate_winogavil(model, transform: Callable, tokenizer: Callable, examples, device: str) -> dict:
    """DataComp's WinoGAViL metrics: mean Jaccard overall, by number of candidates (5, 6, 10,
    12) and for 5-6 and 10-12 candidates (the main metric)."""
    scores, sizes = [], []
    model.eval()
    for ex in examples:
        images = torch.stack([transform(img.convert("RGB")) for img in ex["candidate_images"]]).to(device)
        y_true = np.isin(ex["candidates"], ex["associations"])
        with torch.no_grad():
            img = F.normalize(model.encode_image(images).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer([cue_prompt(ex["cue"])]).to(device)).float(), dim=-1)
        sims = (txt @ img.T).squeeze(0).cpu().numpy()
        chosen = np.argsort(sims, kind="stable")[len(sims) - int(y_true.sum()):]
        scores.append(jaccard(y_true, np.isin(np.arange(len(sims)), chosen)))
        sizes.append(len(sims))
    scores, sizes = np.array(scores), np.array(sizes)

    def mean(mask):
        return float(scores[mask].mean()) if mask.any() else float("nan")

    out = {"avg_jaccard_score": float(scores.mean())}
    for n in (5, 6, 10, 12):
        out[f"jaccard_score_{n}"] = mean(sizes == n)
    out["jaccard_score_5-6"] = mean(sizes <= 6)
    out["jaccard_score_10-12"] = mean(sizes >= 10)
    return out
