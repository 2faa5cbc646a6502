"""WinoGAViL (DataComp's version): for each cue, pick as many of the candidate images as it has
associations, by CLIP similarity to "A/An <cue>", and score the pick by Jaccard index.

The data is the Hugging Face dataset ``nlphuji/winogavil`` (test split), read offline by
:func:`~dbp_lightning.evaluation.hf_copy.load_test_split`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


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
