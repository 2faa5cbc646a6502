"""clip-retrieval / LAION embedding folders: ``img_emb/img_emb_{N}.npy`` and
``text_emb/text_emb_{N}.npy`` (float16, unit norm, ~1M rows per part) with
``metadata/metadata_{N}.parquet`` (or LAION's ``laion2B-en-metadata/metadata_{N:04d}.parquet``),
aligned part by part. The ``.npy`` parts are memory-mapped where they lie."""

from __future__ import annotations

import re
from pathlib import Path

ARRAYS = ("img", "txt")
DEFAULT_ARRAY = "img"
ID_COLUMN = "key"  # img2dataset's sample key, when the metadata has it
_FOLDERS = {"img": ("img_emb", "img_emb_"), "txt": ("text_emb", "text_emb_")}
_NUMBER = re.compile(r"_(\d+)$")


def is_clip_retrieval(path: Path) -> bool:
    return path.is_dir() and any((path / folder).is_dir() for folder, _ in _FOLDERS.values())


def _numbered(files) -> dict[int, Path]:
    out = {}
    for p in files:
        m = _NUMBER.search(p.stem)
        if m:
            out[int(m.group(1))] = p
    return out


def parts(path: Path, arrays: list[str]) -> list[tuple[str, Path | None, dict[str, Path]]]:
    """(name, metadata parquet or None, {array: .npy}) of every part, in part-number order.

    Raises:
        ValueError: a requested array folder is missing, or parts of the arrays and metadata do
            not line up (naming the first part that is missing).
    """
    npys = {}
    for a in arrays:
        folder, _ = _FOLDERS[a]
        if not (path / folder).is_dir():
            raise ValueError(f"input: {path} has no {folder}/ for array {a!r}")
        npys[a] = _numbered((path / folder).glob("*.npy"))
    meta_dirs = sorted({p.parent for p in path.glob("*/metadata_*.parquet")})
    if len(meta_dirs) > 1:
        raise ValueError(f"input: {path} has metadata parts in {len(meta_dirs)} folders "
                         f"({', '.join(d.name for d in meta_dirs)}); keep one")
    meta = _numbered(meta_dirs[0].glob("metadata_*.parquet")) if meta_dirs else {}
    numbers = sorted(set().union(*npys.values()))
    for a, found in npys.items():
        missing = sorted(set(numbers) - set(found))
        if missing:
            raise ValueError(f"input: {path}: part {missing[0]} has no {_FOLDERS[a][0]}/ file")
    if meta:
        missing = sorted(set(numbers) ^ set(meta))
        if missing:
            raise ValueError(f"input: {path}: part {missing[0]} is in the embeddings or the "
                             "metadata, not both")
    return [(f"{n:05d}", meta.get(n), {a: npys[a][n] for a in arrays}) for n in numbers]
