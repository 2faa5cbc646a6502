"""Write the kept samples of source shards into new, equally sized WebDataset shards."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Protocol

import webdataset as wds

from ..atomic import atomic_path, write_json
from . import TAR_MTIME
from .shards import iter_shard, sample_id

MANIFEST = "reshard.json"


class Keep(Protocol):
    """What :func:`reshard` keeps (:class:`~dbp_lightning.data.keep.KeptSamples`)."""

    def __call__(self, sample: dict) -> bool:
        """Whether to keep ``sample`` (``__url__`` and ``__id__`` set)."""

    def __len__(self) -> int:
        """Samples it keeps in all."""


def reshard(shards: list[str], keep: Keep, out_dir: str | os.PathLike, n_shards: int) -> dict:
    """Copy the samples ``keep`` accepts, in source order, into ``n_shards`` tars
    ``out_dir/pruned-NNNNN.tar``, filled equally (sizes differ by at most one). Each tar is written
    atomically, ``reshard.json`` last; a complete ``out_dir`` is returned as it is.

    Returns:
        the manifest: {"shards": [{"path", "rows"}], "samples": n}.
    """
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())
    n_shards = max(1, min(n_shards, len(keep)))
    sizes = [len(keep) // n_shards + (i < len(keep) % n_shards) for i in range(n_shards)]
    out.mkdir(parents=True, exist_ok=True)
    written, rows, sink, tmp_ctx, counts = [], 0, None, None, Counter()

    def close():
        nonlocal sink, tmp_ctx
        if sink is not None:
            sink.close()
            tmp_ctx.__exit__(None, None, None)  # renames the finished tar into place
            written[-1]["rows"] = rows
            sink = tmp_ctx = None

    for shard in shards:
        for sample in iter_shard(shard, counts):
            sample["__id__"] = sample_id(sample)
            if not keep(sample):
                continue
            if sink is None or rows == sizes[len(written) - 1]:
                close()
                path = out / f"pruned-{len(written):05d}.tar"
                tmp_ctx = atomic_path(path)
                sink = wds.TarWriter(str(tmp_ctx.__enter__()), mtime=TAR_MTIME)
                written.append({"path": str(path), "rows": 0})
                rows = 0
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
            rows += 1
    close()
    manifest = {"shards": written, "samples": sum(s["rows"] for s in written)}
    write_json(out / MANIFEST, manifest)
    return manifest
