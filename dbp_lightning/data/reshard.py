"""Write the kept samples of source shards into new, equally sized WebDataset shards."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Protocol

import webdataset as wds

from ..atomic import atomic_path, write_json
from . import TAR_MTIME
from .shards import iter_shard, with_id

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
    total = len(keep)
    n_shards = max(1, min(n_shards, total))
    sizes = [total // n_shards + (i < total % n_shards) for i in range(n_shards)]
    counts = Counter()
    kept = (sample for shard in shards for sample in iter_shard(shard, counts) if keep(with_id(sample)))
    written = []
    for i, size in enumerate(sizes):
        path, rows = out / f"pruned-{i:05d}.tar", 0
        # the tar is closed, then renamed into place; a failure (a full disk) leaves neither
        with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
            for sample in itertools.islice(kept, size):
                sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
                rows += 1
        written.append({"path": str(path), "rows": rows})
        if rows < size:
            raise ValueError(f"{out}: the shards hold fewer kept samples than the selection's "
                             f"{total}; were they changed after they were embedded?")
    manifest = {"shards": written, "samples": total}
    write_json(out / MANIFEST, manifest)
    return manifest
