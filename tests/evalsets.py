"""Small evaluation sets in clip_benchmark's WebDataset layout (what DataComp downloads)."""

from __future__ import annotations

from pathlib import Path

import webdataset as wds

from wds_util import image_bytes

CLASSES = ["cat", "dog", "car", "tree", "boat", "house"]


def write_classification(root: Path, folder: str, n: int = 24, shards: int = 2) -> list[int]:
    """Returns the labels, in sample order."""
    base = root / folder
    (base / "test").mkdir(parents=True, exist_ok=True)
    labels = [i % len(CLASSES) for i in range(n)]
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(base / "test" / f"{s}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                sink.write({"__key__": f"s{i:04d}", "png": image_bytes(100 + i, "PNG"), "cls": str(labels[i]).encode()})
    (base / "test" / "nshards.txt").write_text(f"{shards}\n")
    (base / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (base / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    return labels


def write_retrieval(root: Path, folder: str, n: int = 10) -> list[list[str]]:
    """Each image with two captions; returns the captions, in sample order."""
    base = root / folder
    (base / "test").mkdir(parents=True, exist_ok=True)
    captions = [[f"picture {i} of a {CLASSES[i % 6]}", f"a {CLASSES[(i + 1) % 6]} number {i}"] for i in range(n)]
    with wds.TarWriter(str(base / "test" / "0.tar")) as sink:
        for i in range(n):
            sink.write({"__key__": f"r{i:04d}", "jpg": image_bytes(200 + i), "txt": "\n".join(captions[i]).encode()})
    (base / "test" / "nshards.txt").write_text("1\n")
    (base / "dataset_type.txt").write_text("retrieval\n")
    return captions


def write_grouped(root: Path, folder: str, n: int = 30, groups: int = 3, shards: int = 1
                  ) -> tuple[list[int], list[list[int]]]:
    """A WILDS/fairness-style task: .cls labels and .npy metadata (column 0 = group)."""
    import io

    import numpy as np

    base = root / folder
    (base / "test").mkdir(parents=True, exist_ok=True)
    labels = [i % len(CLASSES) for i in range(n)]
    meta = [[(i // 2) % groups, 2000 + i % 4] for i in range(n)]
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(base / "test" / f"{s}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                np.save(buf, np.array(meta[i], dtype=np.int64))
                sink.write({"__key__": f"g{i:04d}", "png": image_bytes(300 + i, "PNG"),
                            "cls": str(labels[i]).encode(), "npy": buf.getvalue()})
    (base / "test" / "nshards.txt").write_text(f"{shards}\n")
    (base / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (base / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return labels, meta
