"""Write the kept samples of source shards into new, equally sized WebDataset shards."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
import webdataset as wds

from ..atomic import atomic_path, write_json
from ..pruning.collective import Local
from . import TAR_MTIME
from .shards import iter_shard, shard_name, with_id

MANIFEST = "reshard.json"


class Keep(Protocol):
    """What :func:`reshard` keeps (:class:`~dbp_lightning.data.keep.KeptSamples`)."""

    def __call__(self, sample: dict) -> bool:
        """Whether to keep ``sample`` (``__url__`` and ``__id__`` set)."""

    def per_shard(self) -> dict[str, int]:
        """Samples it keeps in each shard, by shard name."""


def reshard(shards: list[str], keep: Keep, out_dir: str | os.PathLike, n_shards: int,
            comm=None) -> dict:
    """Copy the samples ``keep`` accepts, in source order, into ``n_shards`` tars
    ``out_dir/pruned-NNNNN.tar``, filled equally (sizes differ by at most one). Each tar is written
    atomically, ``reshard.json`` last; a complete ``out_dir`` is returned as it is.

    Args:
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: rank r writes tars r,
            r + W, ..., reading only the source shards their samples come from (found from the
            per-shard kept counts); every rank calls this and gets the manifest.

    Returns:
        the manifest: {"shards": [{"path", "rows"}], "samples": n}.
    """
    comm = comm or Local()
    out = Path(out_dir)
    done = np.array([(out / MANIFEST).is_file()])
    if comm.broadcast(done if comm.rank == 0 else None)[0]:  # one decision for all ranks
        return json.loads((out / MANIFEST).read_text())
    per_shard = keep.per_shard()
    kept_before = np.concatenate([[0], np.cumsum([per_shard.get(shard_name(s), 0) for s in shards])])
    total = int(kept_before[-1])
    n_shards = max(1, min(n_shards, total))
    sizes = [total // n_shards + (i < total % n_shards) for i in range(n_shards)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    paths = [out / f"pruned-{i:05d}.tar" for i in range(n_shards)]
    for i in range(comm.rank, n_shards, comm.world_size):
        # the last source shard whose kept samples begin at or before this tar's first sample
        first = int(np.searchsorted(kept_before, starts[i], side="right")) - 1
        skip = int(starts[i] - kept_before[first])
        counts = Counter()
        kept = (sample for shard in shards[first:] for sample in iter_shard(shard, counts)
                if keep(with_id(sample)))
        _write_tar(paths[i], itertools.islice(kept, skip, skip + sizes[i]), sizes[i])
    manifest = {"shards": [{"path": str(p), "rows": n} for p, n in zip(paths, sizes)], "samples": total}
    comm.barrier()  # every tar is in place
    if comm.rank == 0:
        write_json(out / MANIFEST, manifest)
    comm.barrier()
    return manifest


def _write_tar(path: Path, samples, size: int) -> None:
    """``samples`` into the tar ``path``; closed, then renamed into place: a failure (a full
    disk, too few samples) leaves no tar."""
    rows = 0
    with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
            rows += 1
        if rows < size:
            raise ValueError(f"{path}: the shards hold fewer kept samples than the selection "
                             f"counts ({rows} of {size}); were they changed after they were embedded?")
