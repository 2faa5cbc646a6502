"""Every way a pool comes in, opened as arrays and a table for the pruning core.

Layouts (``input_format``; ``auto`` guesses from what the path holds):

    store           this project's embedding store (``dbp-lightning embed`` or ``import``)
    npy             one (N, d) ``.npy``, with an optional N-row metadata parquet
    datacomp        DataComp's metadata directory: ``<stem>.parquet`` + ``<stem>.npz`` per shard
    clip_retrieval  clip-retrieval / LAION: ``img_emb/``, ``text_emb/``, ``metadata/`` parts
    nemo            NeMo Curator parquet with an id column and a list<float> embedding column

Embeddings are memory-mapped where they lie (a store, a ``.npy``, clip-retrieval parts, arrays
stored uncompressed in a DataComp ``.npz``). What cannot be mapped (compressed ``.npz``, NeMo's
list column, two arrays joined) is imported once into a store by :mod:`.importer`.

Identity, one rule for the whole project: the ``id_column`` the user names, else ``uid``, else
the layout's own key column, else the row number. The table the core gets holds only ``key``
(that identity, as a string), ``uid`` when the source has one, and the columns asked for (a CLIP
score): 10^8 urls and captions stay on disk, and the run's ``kept_metadata/`` copies them part by
part (:func:`~dbp_lightning.rundir.write_run`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..store import EmbeddingStore, ShardedArray
from . import clip_retrieval, datacomp, nemo
from .shards import shard_stamp

LAYOUTS = ("store", "npy", "datacomp", "clip_retrieval", "nemo")


@dataclass
class Pool:
    """A pool opened for pruning.

    Attributes:
        embeddings: (N, d) rows, memory-mapped part by part.
        metadata: N rows: ``key`` (the identity, str), ``uid`` when the source has one, and the
            columns asked for.
        fingerprint: what the prune run records as its input (changes when a part changes).
        layout: one of :data:`LAYOUTS`.
        sources: (metadata parquet, rows) per part in row order: the files whose kept rows a
            run copies into ``kept_metadata/``; empty when there are none.
    """

    embeddings: ShardedArray
    metadata: pa.Table
    fingerprint: str
    layout: str
    sources: list[tuple[str, int]] = field(default_factory=list)


def detect_layout(path: Path) -> str:
    """The layout of ``path``; ValueError listing the accepted ones when none fits."""
    if path.is_dir() and (path / "manifest.json").is_file():
        return "store"
    if path.suffix == ".npy" and path.is_file():
        return "npy"
    if clip_retrieval.is_clip_retrieval(path):
        return "clip_retrieval"
    if datacomp.is_datacomp(path):
        return "datacomp"
    if path.exists() and nemo.is_nemo(path):
        return "nemo"
    if not path.exists():
        raise ValueError(f"input: no file or directory {path}")
    raise ValueError(f"input: {path} is none of the layouts prune reads: an embedding store "
                     "(manifest.json), a .npy, a DataComp metadata directory (<stem>.parquet + "
                     "<stem>.npz), a clip-retrieval/LAION folder (img_emb/, text_emb/, metadata/), "
                     "or NeMo Curator parquet (an id and a list<float> embedding column)")


def needs_import(path: Path, layout: str, array: str | None) -> str | None:
    """Why the pool at ``path`` cannot be memory-mapped where it lies (so ``dbp-lightning
    import`` must convert it first), or None when it can."""
    if layout == "nemo":
        return "NeMo Curator's parquet holds embeddings as list columns"
    if layout in ("datacomp", "clip_retrieval") and array and "+" in array:
        return f"array {array!r} joins two arrays"
    if layout == "datacomp":
        name = array or datacomp.DEFAULT_ARRAY
        for _, _, npz in datacomp.parts(path):
            if datacomp.member_info(npz, name)[0]:
                return f"{npz} stores {name} compressed"
    return None


def open_pool(path: str | os.PathLike, layout: str = "auto", array: str | None = None,
              id_column: str | None = None, columns: tuple[str, ...] = (),
              metadata: str | None = None) -> Pool:
    """Open the pool at ``path`` for pruning, without copying its embeddings.

    Args:
        layout: one of :data:`LAYOUTS`, or "auto".
        array: which embeddings (DataComp: ``l14_img``, ``l14_txt``, ``b32_img``, ``b32_txt``;
            clip-retrieval: ``img``, ``txt``); default the layout's image array.
        id_column: the metadata column that identifies a sample (default: ``uid``, else the
            layout's key column, else the row number).
        columns: metadata columns the stages read (e.g. a CLIP score); must exist.
        metadata: an N-row parquet for a ``.npy`` pool.

    Raises:
        ValueError: one line naming the file, array or column at fault, or saying which
            ``dbp-lightning import`` command converts a pool that cannot be mapped.
    """
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"input_format: {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if layout != "npy" and metadata:
        raise ValueError("metadata: only a .npy pool takes a separate metadata file")
    why = needs_import(path, layout, array)
    if why:
        flags = f" --input_format {layout}" + (f" --array {array}" if array else "")
        raise ValueError(f"input: {why}, which cannot be memory-mapped; import the pool once: "
                         f"dbp-lightning import --input {path}{flags} --out STORE, then prune "
                         "--input STORE")
    opener = {"store": _open_store, "npy": _open_npy, "datacomp": _open_datacomp,
              "clip_retrieval": _open_clip_retrieval}[layout]
    return opener(path, array=array, id_column=id_column, columns=tuple(columns),
                  metadata=metadata)


def identity_table(table: pa.Table, default_id: str | None, id_column: str | None,
                   columns: tuple[str, ...], where: str, first_row: int = 0) -> pa.Table:
    """The table the core gets from one part's metadata (see :class:`Pool`); ``first_row``
    numbers rows when nothing identifies them."""
    names = table.column_names
    if id_column and id_column not in names:
        raise ValueError(f"id_column: {where} has no column {id_column!r} "
                         f"(columns: {', '.join(names)})")
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"clip_score.column: {where} has no column {missing[0]!r} "
                         f"(columns: {', '.join(names)})")
    name = id_column or next((c for c in ("uid", default_id) if c and c in names), None)
    if name is None:
        ident = pa.array(np.arange(first_row, first_row + table.num_rows)).cast(pa.string())
    else:
        ident = table.column(name).cast(pa.string())
    # the core identifies a sample by uid, else key (pruning.pipeline.id_column): a named
    # id_column becomes the key, and a uid it overrides is left out
    keep_key = "key" in names and not (id_column and id_column != "key")
    out = {"key": table.column("key").cast(pa.string()) if keep_key else ident}
    if "uid" in names and id_column in (None, "uid"):
        out["uid"] = table.column("uid").cast(pa.string())
    for c in columns:
        if c not in out:
            out[c] = table.column(c)
    return pa.table(out)


def _read_parts(metas: list[Path | None], arrays: list[np.ndarray], default_id: str | None,
                id_column: str | None, columns: tuple[str, ...]) -> tuple[pa.Table, list]:
    """The identity tables of every part, checked row for row against its array."""
    tables, sources, first = [], [], 0
    for meta, array in zip(metas, arrays):
        if meta is None:
            table = pa.table({"_": pa.nulls(len(array))})
        else:
            wanted = {c for c in (id_column, "uid", default_id, *columns) if c}
            table = pq.read_table(meta, columns=[c for c in pq.read_schema(meta).names if c in wanted])
            if table.num_rows != len(array):
                raise ValueError(f"{meta}: {table.num_rows} rows, its embeddings have {len(array)}")
            sources.append((str(meta), len(array)))
        tables.append(identity_table(table, default_id, id_column, columns,
                                     str(meta) if meta else "the pool (no metadata)", first))
        first += len(array)
    return pa.concat_tables(tables), sources


def _fingerprint(layout: str, array: str | None, files: list[Path]) -> str:
    stamps = [(str(p.resolve()), *shard_stamp(str(p))) for p in files]
    return hashlib.sha256(json.dumps([layout, array, stamps]).encode()).hexdigest()


def _open_store(path, array, id_column, columns, metadata) -> Pool:
    if array:
        raise ValueError("array: a store holds one array; choose it when importing")
    store = EmbeddingStore(path)
    schema = set(store.metadata_columns())
    wanted = [c for c in ("key", "uid", id_column, *columns) if c and c in schema]
    table = store.metadata(list(dict.fromkeys(wanted)))
    shards = [path / f"{s['name']}.parquet" for s in store.manifest["shards"]]
    table = identity_table(table, "key", id_column, columns, str(path))
    return Pool(store.embeddings, table, store.fingerprint(), "store",
                [(str(p), s["rows"]) for p, s in zip(shards, store.manifest["shards"])])


def _open_npy(path, array, id_column, columns, metadata) -> Pool:
    try:
        x = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise ValueError(f"input: {path}: unreadable .npy ({exc})") from exc
    if x.ndim != 2:
        raise ValueError(f"input: {path} holds an array of shape {x.shape}, not (N, d)")
    if metadata and not Path(metadata).is_file():
        raise ValueError(f"metadata: no file {metadata}")
    table, sources = _read_parts([Path(metadata) if metadata else None], [x], "key", id_column,
                                 columns)
    st = path.stat()
    return Pool(ShardedArray([x]), table, f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}",
                "npy", sources)


def _open_datacomp(path, array, id_column, columns, metadata) -> Pool:
    name = array or datacomp.DEFAULT_ARRAY
    found = datacomp.parts(path)
    if not found:
        raise ValueError(f"input: {path} holds no DataComp shard")
    arrays = [datacomp.open_array(npz, name) for _, _, npz in found]
    table, sources = _read_parts([p for _, p, _ in found], arrays, datacomp.ID_COLUMN, id_column,
                                 columns)
    files = [f for _, p, npz in found for f in (p, npz)]
    return Pool(ShardedArray(_one_width(arrays, path)), table,
                _fingerprint("datacomp", name, files), "datacomp", sources)


def _open_clip_retrieval(path, array, id_column, columns, metadata) -> Pool:
    name = array or clip_retrieval.DEFAULT_ARRAY
    if name not in clip_retrieval.ARRAYS:
        raise ValueError(f"array: {name!r} is not one of {', '.join(clip_retrieval.ARRAYS)} "
                         "(or img+txt, imported)")
    found = clip_retrieval.parts(path, [name])
    arrays = [np.load(npys[name], mmap_mode="r") for _, _, npys in found]
    table, sources = _read_parts([m for _, m, _ in found], arrays, clip_retrieval.ID_COLUMN,
                                 id_column, columns)
    files = [f for _, m, npys in found for f in (m, npys[name]) if f is not None]
    return Pool(ShardedArray(_one_width(arrays, path)), table,
                _fingerprint("clip_retrieval", name, files), "clip_retrieval", sources)


def _one_width(arrays: list[np.ndarray], path: Path) -> list[np.ndarray]:
    widths = {a.shape[1] for a in arrays if a.ndim == 2}
    if any(a.ndim != 2 for a in arrays) or len(widths) != 1:
        raise ValueError(f"input: {path}: the parts' arrays are not all (rows, d) of one width")
    dtypes = {str(a.dtype) for a in arrays}
    if len(dtypes) > 1:  # one pool, one dtype: a row must read the same however it is read
        raise ValueError(f"input: {path}: the parts mix {' and '.join(sorted(dtypes))}; import "
                         f"the pool into one dtype: dbp-lightning import --input {path} --out STORE")
    return arrays


def open_input(config) -> Pool:
    """The pool a :class:`~dbp_lightning.config.PruneConfig` names, with the columns its stages
    read."""
    columns = (config.clip_score.column,) if "clip_score" in config.stages else ()
    return open_pool(config.input, config.input_format, config.array, config.id_column, columns,
                     config.metadata)
