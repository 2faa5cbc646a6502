"""Tasks DataComp reads from Hugging Face ``datasets`` (nlphuji/*), loaded offline.

A task's test split is looked up as ``<data_root>/<name>`` (a ``save_to_disk`` directory) and
then in DataComp's ``<data_root>/hf_cache`` (``load_dataset(..., cache_dir=...)`` with
``HF_DATASETS_OFFLINE=1``); nothing downloads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import torch


def load_test_split(data_root: Optional[str], name: str):
    """``nlphuji/<name>``'s test split as a ``datasets.Dataset``, or None when not found."""
    import datasets

    root = Path(data_root or "")
    if (root / name).is_dir():
        return datasets.load_from_disk(str(root / name))
    if (root / "hf_cache").is_dir():
        with _offline():
            try:
                return datasets.load_dataset(f"nlphuji/{name}", split="test", cache_dir=str(root / "hf_cache"))
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


class ImageCaptions(torch.utils.data.Dataset):
    """(transformed image, list of captions) pairs of an HF retrieval split (image, caption)."""

    def __init__(self, hf_dataset, transform):
        self.data, self.transform = hf_dataset, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[i]
        captions = row["caption"]
        return self.transform(row["image"].convert("RGB")), [captions] if isinstance(captions, str) else list(captions)
