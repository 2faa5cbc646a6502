"""Which samples of each source shard a prune run keeps, looked up one shard at a time.

A set of every kept id costs ~130 bytes per kept sample (32-hex uids, measured) in every
dataloader worker of every rank: 13 GB per process at 10^8. :class:`KeptSamples` holds the run's ``kept`` column (1 byte
per sample) and the ids of the shard being streamed, read from the embedding store's
per-shard table. Rows of the selection follow the store's shard order, so shard ``i``'s mask is
a slice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..store import fingerprint, read_manifest
from .shards import shard_name


class KeptSamples:
    """A per-sample keep test over a store and a prune run of it; picklable for workers.

    Args:
        store: the embedding store directory the run pruned (its manifest lists the shards).
        run: the prune run directory (its ``selection.parquet`` has a row per store row).

    Calling it on a webdataset sample (with ``__url__`` and ``__id__``, the identity of
    :func:`~dbp_lightning.data.shards.sample_id`) says whether the run kept it. A sample of a
    shard the store does not list raises ``KeyError`` naming the shard; a run made from another
    store raises ``ValueError``.
    """

    def __init__(self, store: str | os.PathLike, run: str | os.PathLike):
        self.store, self.run = Path(store), Path(run)
        pruned = json.loads((self.run / "manifest.json").read_text()).get("input")
        if pruned != fingerprint(self.store):
            raise ValueError(f"{self.run}: this prune run was not made from the store {self.store}")
        manifest = read_manifest(self.store)
        rows = np.array([s["rows"] for s in manifest["shards"]], np.int64)
        starts = np.concatenate([[0], np.cumsum(rows)])
        self.n = int(starts[-1])
        self.ranges = {s["name"]: (int(a), int(b))
                       for s, a, b in zip(manifest["shards"], starts, starts[1:])}
        # shards whose every sample was skipped have no rows, and so nothing kept
        self.ranges.update({s["name"]: (self.n, self.n) for s in manifest.get("empty_shards", [])})
        self._mask: np.ndarray | None = None
        self._url: str | None = None
        self._ids: frozenset = frozenset()

    def __getstate__(self):  # spawned workers read the mask themselves, not through a pipe
        return {**self.__dict__, "_mask": None, "_url": None, "_ids": frozenset()}

    @property
    def mask(self) -> np.ndarray:
        """bool (N,): the run's ``kept`` column, read on first use."""
        if self._mask is None:
            table = pq.read_table(self.run / "selection.parquet", columns=["kept"])
            self._mask = table.column("kept").to_numpy(zero_copy_only=False)
            if len(self._mask) != self.n:
                raise ValueError(f"{self.run / 'selection.parquet'}: {len(self._mask)} rows, the "
                                 f"store {self.store} has {self.n}")
        return self._mask

    def per_shard(self) -> dict[str, int]:
        """Kept samples per shard name."""
        return {name: int(self.mask[a:b].sum()) for name, (a, b) in self.ranges.items()}

    def ids(self, name: str) -> frozenset:
        """The kept ids of the store shard ``name``."""
        if name not in self.ranges:
            raise KeyError(f"shard {name!r} is not in the embedding store {self.store}")
        a, b = self.ranges[name]
        if a == b:
            return frozenset()
        path = self.store / f"{name}.parquet"
        id_column = "uid" if "uid" in pq.read_schema(path).names else "key"
        column = pq.read_table(path, columns=[id_column]).column(id_column)
        return frozenset(np.asarray(column.to_pylist(), dtype=object)[self.mask[a:b]])

    def __call__(self, sample: dict) -> bool:
        if sample["__url__"] != self._url:  # streams read shards one after another
            self._url, self._ids = sample["__url__"], self.ids(shard_name(sample["__url__"]))
        return sample["__id__"] in self._ids
