"""The embedding store: per-shard ``.npy`` embeddings and ``.parquet`` metadata + a manifest.

Layout of a store directory::

    manifest.json          {"format": "dbp-lightning-embeddings", "version": 1, "dim": d,
                            "dtype": "float16"|"float32", "shards": [{"name", "rows"}, ...], ...}
    <shard>.npy            (rows, d) L2-normalised embeddings, read memory-mapped
    <shard>.parquet        one row per embedding: ``key`` (str), optional ``uid`` (str) and any
                           other per-sample columns (``clip_score``, LAION ``similarity``, ...)

The manifest is written last and atomically, so a store with a manifest is complete; a shard
the manifest does not list is ignored. The embedder (``dbp-lightning embed``) writes stores
with :class:`StoreWriter`; ``prune`` reads them with :class:`EmbeddingStore`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_json, write_npy, write_parquet

FORMAT = "dbp-lightning-embeddings"
VERSION = 1
DTYPES = ("float16", "float32")


class ShardedArray:
    """Read-only (N, d) view over per-shard memory-mapped arrays, concatenated along rows.

    Supports ``shape``, ``dtype``, ``len``, slicing with step 1 and integer-array indexing,
    which is all :class:`~dbp_lightning.pruning.embeddings.Embeddings` needs.
    """

    #: bytes read through the mappings after which their pages are dropped from this process
    RELEASE_BYTES = 256 << 20
    #: file bytes one scattered row read may map (the kernel's fault-around window)
    FAULT_BYTES = 64 << 10
    #: rows gathered between two accounting steps
    GATHER_ROWS = 1024

    def __init__(self, arrays: list[np.ndarray]):
        if not arrays:
            raise ValueError("a ShardedArray needs at least one shard")
        self.arrays = arrays
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(arrays[0].shape[1]))
        self.dtype = arrays[0].dtype
        self._read = 0

    def _account(self, nbytes: int) -> None:
        """Out of core: pages of a memory-mapped store that were read stay mapped into this
        process and count in its RSS, so a pass over a 5 GB store would hold 5 GB. Every
        RELEASE_BYTES, drop them (MADV_DONTNEED: the kernel keeps them in its page cache, and
        a later read maps them again)."""
        import mmap

        self._read += nbytes
        if self._read < self.RELEASE_BYTES:
            return
        self._read = 0
        for a in self.arrays:
            m = getattr(a, "_mmap", None)
            if m is not None and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(self.shape[0])
            if step != 1:
                raise IndexError("ShardedArray slices must have step 1")
            return self._range(start, stop)
        index = np.asarray(item)
        if index.dtype == bool:  # a keep mask, as NumPy reads it (not rows 0 and 1)
            if index.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {index.shape} for {self.shape[0]} rows")
            index = np.flatnonzero(index)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise IndexError("ShardedArray takes a slice, a 1-D integer array or a boolean mask "
                             "of its rows")
        index = index.astype(np.int64, copy=False)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]})")
        out = np.empty((len(index), self.shape[1]), self.dtype)
        # a scattered row maps more than itself: the kernel maps the pages around a fault that
        # are already cached (fault-around, 64 KiB by default), so gather in chunks and count that
        for lo in range(0, len(index), self.GATHER_ROWS):
            part = index[lo : lo + self.GATHER_ROWS]
            shard = np.searchsorted(self.offsets, part, side="right") - 1
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                out[lo + sel] = self.arrays[s][part[sel] - self.offsets[s]]
            self._account(len(part) * max(out.itemsize * self.shape[1], self.FAULT_BYTES))
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, self.shape[1]), self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
        if first == last:
            o = self.offsets[first]
            # a copy: the caller's block must not keep pages that _account is about to drop
            out = np.array(self.arrays[first][start - o : stop - o])
        else:
            out = np.concatenate([a[max(start - o, 0) : min(stop - o, len(a))]
                                  for a, o in zip(self.arrays[first : last + 1],
                                                  self.offsets[first : last + 1])])
        self._account(out.nbytes)
        return out


class EmbeddingStore:
    """A complete embedding store directory, opened read-only and checked against its manifest.

    Raises ``ValueError`` naming the file when the manifest is missing or malformed, a shard
    file is missing, or a shard's shape, dtype or row count disagrees with the manifest.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        self.manifest = read_manifest(self.path)
        self.dim = int(self.manifest["dim"])
        arrays = []
        for shard in self.manifest["shards"]:
            npy = self.path / f"{shard['name']}.npy"
            if not npy.is_file() or not (self.path / f"{shard['name']}.parquet").is_file():
                raise ValueError(f"{npy.with_suffix('')}.npy/.parquet: shard listed in the "
                                 "manifest is missing")
            try:
                array = np.load(npy, mmap_mode="r")
            except ValueError as exc:
                raise ValueError(f"{npy}: unreadable .npy ({exc})") from exc
            if array.shape != (shard["rows"], self.dim) or str(array.dtype) != self.manifest["dtype"]:
                raise ValueError(f"{npy}: shape {array.shape} {array.dtype} does not match the "
                                 f"manifest ({shard['rows']}, {self.dim}) {self.manifest['dtype']}")
            arrays.append(array)
        if not arrays:
            raise ValueError(f"{manifest_path}: the store has no shards")
        self.embeddings = ShardedArray(arrays)

    def __len__(self) -> int:
        return len(self.embeddings)

    def metadata(self, columns: list[str] | None = None) -> pa.Table:
        """The per-sample table of all shards, in row order (``columns`` to read only some)."""
        tables = []
        for shard in self.manifest["shards"]:
            path = self.path / f"{shard['name']}.parquet"
            table = pq.read_table(path, columns=columns)
            if table.num_rows != shard["rows"]:
                raise ValueError(f"{path}: {table.num_rows} rows, the manifest says {shard['rows']}")
            tables.append(table)
        return pa.concat_tables(tables)

    def metadata_columns(self) -> list[str]:
        """The names of the per-sample table's columns (read from one shard's schema)."""
        first = self.manifest["shards"][0]["name"]
        return pq.read_schema(self.path / f"{first}.parquet").names

    def fingerprint(self) -> str:
        """See :func:`fingerprint`."""
        return fingerprint(self.path)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the complete store at ``path``, without opening its shards.

    Raises ``ValueError`` naming the file when it is missing, not JSON, or not a store's.
    """
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: no manifest; not an embedding store, or an "
                         "embedding run that has not finished")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest



def source_shards(store: str | os.PathLike) -> list[str] | None:
    """The WebDataset shards the store at ``store`` was embedded from, when they are all still
    there (a report can then show the pictures); None otherwise, and for a ``.npy``."""
    if not Path(store).is_dir():
        return None
    shards = read_manifest(store).get("source_shards")
    return shards if shards and all(os.path.isfile(s) for s in shards) else None


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the store's manifest: names, row counts and provenance of every shard. A prune
    run records it as its ``input``; the prune cache is keyed by it."""
    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()


class StoreWriter:
    """Writes a store shard by shard (each atomically); :meth:`close` writes the manifest."""

    def __init__(self, path: str | os.PathLike, dim: int, dtype: str = "float32", **info):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dim, self.dtype, self.info = int(dim), dtype, info
        self.shards: list[dict] = []

    def add_shard(self, name: str, embeddings: np.ndarray, table: pa.Table) -> None:
        """Write ``name.npy`` (rows, dim) and ``name.parquet`` (needs a ``key`` column)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"shard {name}: embeddings of shape {embeddings.shape}, expected (rows, {self.dim})")
        if "key" not in table.column_names or table.num_rows != len(embeddings):
            raise ValueError(f"shard {name}: the table needs a 'key' column and one row per embedding")
        array = np.ascontiguousarray(embeddings, dtype=self.dtype)
        write_npy(self.path / f"{name}.npy", array)
        write_parquet(self.path / f"{name}.parquet", table)
        self.shards.append({"name": name, "rows": len(array),
                            "sha256": hashlib.sha256(array.tobytes()).hexdigest()})

    def close(self) -> EmbeddingStore:
        write_json(self.path / "manifest.json", {"format": FORMAT, "version": VERSION,
                                                 "dim": self.dim, "dtype": self.dtype,
                                                 "shards": self.shards, **self.info})
        return EmbeddingStore(self.path)


def write_store(path: str | os.PathLike, embeddings: np.ndarray, table: pa.Table,
                shard_rows: int = 100_000, dtype: str = "float32", **info) -> EmbeddingStore:
    """Write an in-memory (N, d) array and its N-row table as a store of ``shard_rows`` shards."""
    writer = StoreWriter(path, embeddings.shape[1], dtype, **info)
    for i, start in enumerate(range(0, len(embeddings), shard_rows)):
        stop = min(start + shard_rows, len(embeddings))
        writer.add_shard(f"{i:05d}", embeddings[start:stop], table.slice(start, stop - start))
    return writer.close()
