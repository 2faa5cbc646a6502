"""Write the kept samples of source shards into new, equally sized WebDataset shards."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np

from ..atomic import write_json
from ..cache import LOCK_WAIT
from ..lock import rank_zero_lock
from ..pruning.collective import Local, block_range
from .shards import iter_shard, shard_name, with_id, write_tar

MANIFEST = "reshard.json"


class Keep(Protocol):
    """What :func:`reshard` keeps (:class:`~dbp_lightning.data.keep.KeptSamples`)."""

    def __call__(self, sample: dict) -> bool:
        """Whether to keep ``sample`` (``__url__`` and ``__id__`` set)."""

    def per_shard(self) -> dict[str, int]:
        """Samples it keeps in each shard, by shard name."""


def reshard(shards: list[str], keep: Keep, out_dir: str | os.PathLike, n_shards: int,
            comm=None, stamps: dict[str, tuple[int, int]] | None = None) -> dict:
    """Copy the samples ``keep`` accepts, in source order, into ``n_shards`` tars
    ``out_dir/pruned-NNNNN.tar``, filled equally (sizes differ by at most one). Each tar is written
    atomically, ``reshard.json`` last; a complete ``out_dir`` is returned as it is.

    Args:
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: each rank writes a run
            of consecutive tars in one pass over the source shards their samples come from
            (found from the per-shard kept counts); every rank calls this and gets the manifest.
        stamps: (bytes, mtime_ns) per source shard path that the shard must still have
            (:func:`~dbp_lightning.data.shards.shard_stamp`): a shard rewritten since the pool
            was listed raises :class:`~dbp_lightning.data.shards.ShardChanged` naming it.

    Returns:
        the manifest: {"shards": [{"path", "rows"}], "samples": n}.
    """
    comm = comm or Local()
    out = Path(out_dir)
    done = np.array([(out / MANIFEST).is_file()])
    if comm.broadcast(done if comm.rank == 0 else None)[0]:  # one decision for all ranks
        return json.loads((out / MANIFEST).read_text())
    # another job may be resharding the same run in the shared cache: wait for it, then reuse
    with rank_zero_lock(out, wait=LOCK_WAIT, comm=comm):
        done = np.array([(out / MANIFEST).is_file()])
        if comm.broadcast(done if comm.rank == 0 else None)[0]:
            return json.loads((out / MANIFEST).read_text())
        return _reshard(shards, keep, out, n_shards, comm, stamps or {})


def _reshard(shards: list[str], keep: Keep, out: Path, n_shards: int, comm, stamps: dict) -> dict:
    per_shard = keep.per_shard()
    kept_before = np.concatenate([[0], np.cumsum([per_shard.get(shard_name(s), 0) for s in shards])])
    total = int(kept_before[-1])
    n_shards = max(1, min(n_shards, total))
    sizes = [total // n_shards + (i < total % n_shards) for i in range(n_shards)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    paths = [out / f"pruned-{i:05d}.tar" for i in range(n_shards)]
    lo, hi = block_range(n_shards, 1, comm.rank, comm.world_size)  # this rank's run of tars
    if lo < hi:
        # the last source shard whose kept samples begin at or before the run's first sample
        first = int(np.searchsorted(kept_before, starts[lo], side="right")) - 1
        counts = Counter()
        kept = (sample for shard in shards[first:]
                for sample in iter_shard(shard, counts, stamp=stamps.get(shard))
                if keep(with_id(sample)))
        kept = itertools.islice(kept, int(starts[lo] - kept_before[first]), None)
        for i in range(lo, hi):  # one pass: each tar takes the next sizes[i] samples
            try:
                write_tar(paths[i], (_stored(x) for x in itertools.islice(kept, sizes[i])), sizes[i])
            except ValueError as exc:
                raise ValueError(f"{exc}: the shards hold fewer kept samples than the selection "
                                 "counts; were they changed after they were embedded?") from exc
    manifest = {"shards": [{"path": str(p), "rows": n} for p, n in zip(paths, sizes)], "samples": total}
    comm.barrier()  # every tar is in place
    if comm.rank == 0:
        write_json(out / MANIFEST, manifest)
    comm.barrier()
    return manifest


def _stored(sample: dict) -> dict:
    """What a tar holds of a sample: its key and files, not the stream's ``__url__``/``__id__``."""
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
