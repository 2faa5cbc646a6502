"""Which samples of the source shards training keeps: two keep tests a stream calls per sample.

A set of every kept id costs ~130 bytes per kept sample (32-hex uids, measured) in every
dataloader worker of every rank: 13 GB per process at 10^8. Neither test holds one.

:class:`KeptSamples`, for a run pruned from an embedding store of these shards: the run's
``kept`` column (1 byte per sample) and the ids of the shard being streamed, read from the
store's per-shard table. Rows of the selection follow the store's shard order, so shard ``i``'s
mask is a slice.

:class:`KeptIdentities`, for a run of any pool (DataComp's embeddings pruned without a store of
ours) or a DataComp subset file: the kept identities as a sorted array of 128-bit values in a
file that every worker memory-maps (16 bytes per kept sample, one copy per node in the page
cache), looked up with ``np.searchsorted``, DataComp's own rule. Which shard holds which kept
sample is not known beforehand: :func:`scan_shard` reads a shard as the stream does and counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
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


# ---------------------------------------------------------------------------------------------
# Any run, or a DataComp subset: kept identities as sorted 128-bit values, memory-mapped

#: the kept identities' dtype: DataComp's subset format, a 32-hex uid as two uint64 (high, low)
U128 = np.dtype("u8,u8")

_NIBBLE = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i


def hex_to_u128(ids: pa.Array) -> np.ndarray | None:
    """``divmod(int(uid, 16), 2**64)`` of each id, vectorised: (N,) :data:`U128`; None when
    some id is null or not exactly 32 hex digits."""
    ids = ids.cast(pa.large_string()) if not pa.types.is_large_string(ids.type) else ids
    if ids.null_count:
        return None
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + len(ids) + 1]
    if len(ids) == 0:
        return np.empty(0, U128)
    if not np.all(np.diff(offsets) == 32):
        return None
    chars = np.frombuffer(ids.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 32)
    nibbles = _NIBBLE[chars]
    if (nibbles == 255).any():
        return None
    out = np.empty(len(ids), U128)
    for field, part in (("f0", nibbles[:, :16]), ("f1", nibbles[:, 16:])):
        value = np.zeros(len(ids), np.uint64)
        for j in range(16):
            value = (value << np.uint64(4)) | part[:, j].astype(np.uint64)
        out[field] = value
    return out


def hash_to_u128(ids) -> np.ndarray:
    """The first 128 bits of each id's blake2b (UTF-8) as :data:`U128`: identities that are not
    32-hex uids (keys). A wrong match needs two ids to share 128 bits: ~1e-20 at 10^9 samples."""
    out = np.empty(len(ids), U128)
    for i, value in enumerate(ids):
        out[i] = _hash128(str(value))
    return out


def _hash128(identity: str) -> tuple[int, int]:
    """The (high, low) 64-bit halves of ``identity``'s 128-bit blake2b (UTF-8)."""
    digest = hashlib.blake2b(identity.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def sort_unique(values: np.ndarray) -> np.ndarray:
    """``values`` (:data:`U128`) sorted as DataComp sorts its subsets, repeats removed."""
    values = values[np.lexsort((values["f1"], values["f0"]))]
    if len(values) > 1:
        new = np.concatenate([[True], (values["f0"][1:] != values["f0"][:-1])
                              | (values["f1"][1:] != values["f1"][:-1])])
        values = values[new]
    return np.ascontiguousarray(values)


def kept_of_run(run: str | os.PathLike, batch_rows: int = 1 << 20) -> tuple[np.ndarray, str]:
    """The kept identities of a prune run, whatever pool it was made from: ``(values, encoding)``.

    Reads ``selection.parquet``'s ``kept`` and identity column (:func:`~dbp_lightning.pruning.
    pipeline.id_column`: ``uid`` when present, a null uid falling back to the row's ``key``, as
    :func:`~dbp_lightning.data.shards.sample_id` does) in batches of ``batch_rows``. The values
    are the uids' 128 bits (encoding ``"hex"``) when every kept identity is a 32-hex uid, else
    :func:`hash_to_u128` of every identity (``"hash"``); sorted, unique. Memory: 16 bytes per
    kept sample, plus a batch.
    """
    from ..pruning.pipeline import id_column

    path = Path(run) / "selection.parquet"
    names = pq.read_schema(path).names
    column = id_column(names)
    if "kept" not in names or column not in names:
        raise ValueError(f"selection: {path} has no 'kept' and '{column}' columns; not a prune "
                         "run's selection")
    columns = ["kept", column] + (["key"] if column == "uid" and "key" in names else [])
    for encoding in ("hex", "hash"):
        parts = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
            ids = _kept_ids(batch, column)
            values = hex_to_u128(ids) if encoding == "hex" else hash_to_u128(ids.to_pylist())
            if values is None:
                break  # some identity is not a 32-hex uid: hash them all
            parts.append(values)
        else:
            return sort_unique(np.concatenate(parts) if parts else np.empty(0, U128)), encoding
    raise AssertionError("unreachable")


def _kept_ids(batch: pa.RecordBatch, column: str) -> pa.Array:
    """The identities of the kept rows of ``batch``: ``column``, with a null uid taken from
    ``key``."""
    import pyarrow.compute as pc

    kept = batch.column("kept").fill_null(False)
    ids = batch.column(column)
    if column == "uid" and ids.null_count and "key" in batch.schema.names:
        ids = pc.coalesce(ids, batch.column("key").cast(ids.type))
    return pc.filter(ids, kept).cast(pa.large_string())


def kept_of_subset(path: str | os.PathLike) -> np.ndarray:
    """DataComp's subset file (a ``.npy`` of a structured array of two uint64 per uid, as
    :func:`~dbp_lightning.rundir.datacomp_subset` writes), sorted and unique, as :data:`U128`."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"subset: {path}: not a readable .npy ({exc})") from exc
    fields = array.dtype.fields or {}
    if array.ndim != 1 or len(fields) != 2 or any(np.dtype(f[0]) != np.dtype("u8") for f in fields.values()):
        raise ValueError(f"subset: {path} holds {array.dtype} {array.shape}; DataComp's subset is a "
                         "1-d structured array of dtype u8,u8 (a uid's 128 bits)")
    values = np.empty(len(array), U128)
    values["f0"], values["f1"] = (array[name] for name in array.dtype.names)
    return sort_unique(values)


def json_uid(sample: dict) -> str | None:
    """The ``uid`` of the sample's json, or None (no json, not JSON, no uid)."""
    meta = sample.get("json")
    if not meta:
        return None
    try:
        uid = json.loads(meta).get("uid")
    except (ValueError, AttributeError):
        return None
    return str(uid) if uid else None


class KeptIdentities:
    """A per-sample keep test by identity, for a run of any pool or a DataComp subset;
    picklable for dataloader workers.

    Args:
        path: a ``.npy`` of sorted, unique :data:`U128` values (:func:`kept_of_run`,
            :func:`kept_of_subset`), written once; each worker memory-maps it on first use, so
            every process on a node shares one copy in the page cache: 16 bytes per kept
            sample (1.6 GB at 10^8), against ~130 (a set of 32-hex strings) in every worker.
        encoding: ``"hex"`` (values are 32-hex uids' bits) or ``"hash"`` (:func:`hash_to_u128`).
        uid_only: look up the json's ``uid`` only, never ``__key__`` (DataComp's resharder
            rule for subsets); else the sample's identity (``__id__``: json uid, else key).
        per_shard: samples kept per shard name, as a scan of the shards found
            (:func:`scan_shard`); what :meth:`per_shard` returns.

    A lookup is ``np.searchsorted`` on the mapped array (DataComp's rule for a uid:
    ``divmod(int(uid, 16), 2**64)``), ~4 us per sample.
    """

    def __init__(self, path: str | os.PathLike, encoding: str = "hex", uid_only: bool = False,
                 per_shard: dict[str, int] | None = None):
        if encoding not in ("hex", "hash"):
            raise ValueError(f"encoding: hex or hash, got {encoding!r}")
        self.path, self.encoding, self.uid_only = Path(path), encoding, uid_only
        self._per_shard = dict(per_shard or {})
        self._values: np.ndarray | None = None

    def __getstate__(self):  # each worker maps the file itself
        return {**self.__dict__, "_values": None}

    @property
    def values(self) -> np.ndarray:
        """(K,) :data:`U128`, memory-mapped read-only."""
        if self._values is None:
            self._values = np.load(self.path, mmap_mode="r")
        return self._values

    def __len__(self) -> int:
        return len(self.values)

    def identity(self, sample: dict) -> str | None:
        """What is looked up for ``sample``: its json uid (``uid_only``), else ``__id__``."""
        return json_uid(sample) if self.uid_only else sample["__id__"]

    def encode(self, identity: str | None) -> tuple[int, int] | None:
        """``identity`` as (high, low) 64-bit halves; None when it cannot be kept (no uid, or
        not 32 hex digits where the kept values are uids)."""
        if identity is None:
            return None
        if self.encoding == "hash":
            return _hash128(identity)
        if len(identity) != 32 or not _is_hex(identity):
            return None
        return divmod(int(identity, 16), 2**64)

    def position(self, sample: dict) -> int:
        """Index of ``sample``'s identity in :attr:`values`, or -1 when it is not kept."""
        query = self.encode(self.identity(sample))
        if query is None:
            return -1
        values = self.values
        at = int(np.searchsorted(values, np.array(query, dtype=values.dtype)))
        if at < len(values) and values[at]["f0"] == query[0] and values[at]["f1"] == query[1]:
            return at
        return -1

    def __call__(self, sample: dict) -> bool:
        return self.position(sample) >= 0

    def per_shard(self) -> dict[str, int]:
        """Kept samples per shard name (from the scan given as ``per_shard``)."""
        return dict(self._per_shard)


_HEX = frozenset("0123456789abcdefABCDEF")


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


#: what :func:`scan_shard` counts per shard, in this order
SCAN_FIELDS = ("read", "matched", "streamed", "undecodable", "no_caption", "no_uid")


def scan_shard(path: str, kept: KeptIdentities, stamp: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read shard ``path`` as the training stream reads it and find the kept samples in it.

    Returns:
        counts: int64 (len(SCAN_FIELDS),): samples read; samples whose identity is kept
            (``matched``); of those, the ones the stream yields (``streamed``: the image
            decodes and the caption is UTF-8 text, the stream's own rule) and the ones it drops
            (``undecodable`` image, ``no_caption``); samples with no 32-hex json uid
            (``no_uid``, counted when ``kept.uid_only``: they cannot match).
        found: int64 positions in ``kept.values`` of the kept identities met (repeats possible).
    """
    from collections import Counter

    from .shards import decode_caption, decode_image, iter_shard, with_id

    counts = dict.fromkeys(SCAN_FIELDS, 0)
    found = []
    for sample in iter_shard(path, Counter(), stamp=stamp):
        counts["read"] += 1
        with_id(sample)
        if kept.uid_only and kept.encode(kept.identity(sample)) is None:
            counts["no_uid"] += 1
            continue
        at = kept.position(sample)
        if at < 0:
            continue
        found.append(at)
        counts["matched"] += 1
        if decode_image(sample) is None:
            counts["undecodable"] += 1
        elif decode_caption(sample) is None:
            counts["no_caption"] += 1
        else:
            counts["streamed"] += 1
    return np.array([counts[f] for f in SCAN_FIELDS], np.int64), np.array(found, np.int64)
