"""Writes small real WebDataset shards for tests: JPEG/PNG bytes, captions, DataComp-style json."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def image_bytes(i: int, fmt: str = "JPEG", size: int = 48) -> bytes:
    """A distinct picture per i: a coloured background with a stripe pattern."""
    rng = np.random.default_rng(i)
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = rng.integers(0, 256, 3)
    arr[:, :: 2 + i % 5] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(root: Path, n_shards: int = 3, per_shard: int = 20, corrupt=(), no_caption=(),
                 empty_shard: bool = False, duplicate_key_in: int | None = None) -> list[str]:
    """Shards ``root/shard-0000k.tar``; sample i of the pool has key f"{i:06d}".

    corrupt: global sample indices whose image bytes are garbage; no_caption: indices without a
    ``.txt``; empty_shard: one more shard with no samples; duplicate_key_in: a shard that also
    holds sample 0's key (for the negative test).
    """
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards + int(empty_shard)):
        path = root / f"shard-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            if s < n_shards:
                for i in range(s * per_shard, (s + 1) * per_shard):
                    write_sample(sink, i, corrupt=i in corrupt, caption=i not in no_caption)
            if duplicate_key_in == s:
                write_sample(sink, 0)
        paths.append(str(path))
    return paths


def uid(i: int) -> str:
    return hashlib.md5(f"{i:06d}".encode()).hexdigest()


def write_sample(sink, i: int, corrupt: bool = False, caption: bool = True) -> None:
    sample = {"__key__": f"{i:06d}",
              "json": json.dumps({"uid": uid(i), "similarity": round(0.2 + (i % 10) / 50, 2)}).encode()}
    ext = "png" if i % 3 == 0 else "jpg"
    sample[ext] = b"not an image" if corrupt else image_bytes(i, "PNG" if ext == "png" else "JPEG")
    if caption:
        sample["txt"] = f"a {COLOURS[i % 8]} picture number {i}".encode()
    sink.write(sample)
