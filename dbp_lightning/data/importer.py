"""``dbp-lightning import``: a pool that cannot be memory-mapped where it lies (compressed
DataComp ``.npz``, NeMo Curator parquet, two arrays joined) converted once into an embedding
store, part by part.

Each part becomes ``<name>.npy`` (the source's values, float16 by default) + ``<name>.parquet`` (every
source metadata column, with ``key`` the sample's identity) + ``<name>.done.json``, each written
atomically; a rerun skips parts that are done and whose source files have not changed, so a
killed import resumes. One part is in memory at a time: peak memory does not grow with the pool.
Rows that are all zero or not finite are left out and counted, as ``embed`` does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import write_json, write_npy, write_parquet
from ..lock import directory_lock
from ..store import DTYPES, FORMAT, VERSION, EmbeddingStore
from . import clip_retrieval, datacomp, nemo
from .pools import detect_layout
from .shards import shard_stamp

log = logging.getLogger(__name__)
DONE = ".done.json"


def _parts(path: Path, layout: str, array: str) -> list[dict]:
    """Each part as {name, files (its sources), rows, load() -> (embeddings, metadata table)}."""
    names = array.split("+")
    if layout == "datacomp":
        _check_arrays(names, datacomp.ARRAYS)
        out = []
        for stem, parquet, npz in datacomp.parts(path):
            rows = datacomp.member_info(npz, names[0])[1][0]
            out.append({"name": stem, "files": [parquet, npz], "rows": rows,
                        "load": lambda parquet=parquet, npz=npz: (
                            _join([datacomp.load_array(npz, n) for n in names]),
                            pq.read_table(parquet))})
        return out
    if layout == "clip_retrieval":
        _check_arrays(names, clip_retrieval.ARRAYS)
        out = []
        for name, meta, npys in clip_retrieval.parts(path, names):
            rows = np.load(npys[names[0]], mmap_mode="r").shape[0]
            out.append({"name": name, "files": [f for f in (meta, *npys.values()) if f], "rows": rows,
                        "load": lambda meta=meta, npys=npys, rows=rows: (
                            _join([np.load(npys[n]) for n in names]),
                            pq.read_table(meta) if meta else pa.table({"_": pa.nulls(rows)}).drop_columns(["_"]))})
        return out
    if layout == "nemo":
        return [{"name": name, "files": [parquet], "rows": pq.ParquetFile(parquet).metadata.num_rows,
                 "load": lambda parquet=parquet: nemo.load_part(parquet, array)}
                for name, parquet in nemo.parts(path)]
    raise ValueError(f"input: a {layout} pool is pruned where it lies; nothing to import")


def _check_arrays(names: list[str], allowed: tuple[str, ...]) -> None:
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"array: {bad[0]!r} is not one of {', '.join(allowed)} (or two joined "
                         "by +)")


def _join(arrays: list[np.ndarray]) -> np.ndarray:
    """One array, or several each L2-normalised and joined side by side over sqrt(count), so
    that the joined rows have unit norm and each half weighs alike."""
    if len(arrays) == 1:
        return arrays[0]
    rows = {len(a) for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"array: the joined arrays have different row counts ({sorted(rows)})")
    halves = [a.astype(np.float32) for a in arrays]
    for h in halves:
        norm = np.linalg.norm(h, axis=1, keepdims=True)
        np.divide(h, norm, out=h, where=norm > 0)
    return np.concatenate(halves, axis=1) / math.sqrt(len(halves))


def _stamp(files: list[Path]) -> list:
    """What says a source part is unchanged since it was imported: name, size and mtime (a part
    re-embedded with another model keeps its size)."""
    return [[p.name, *shard_stamp(str(p))] for p in files]


def import_pool(path: str | Path, out: str | Path, layout: str = "auto", array: str | None = None,
                id_column: str | None = None, dtype: str = "float16",
                progress: bool = True) -> EmbeddingStore:
    """Convert the pool at ``path`` into an embedding store at ``out`` (resuming a killed run).

    Args:
        layout: datacomp, clip_retrieval, nemo, or "auto".
        array: which embeddings: DataComp ``l14_img`` (default), ``l14_txt``, ``b32_img``,
            ``b32_txt``; clip-retrieval ``img`` (default), ``txt``; NeMo the list column
            (default ``embedding``); two names joined by ``+`` join the arrays, each
            L2-normalised, over sqrt(2).
        id_column: the column that identifies a sample (default ``uid``, else the layout's key
            column, else the row number).
        dtype: the store's dtype, float16 (half the disk) or float32.

    Returns:
        the store; its manifest names the source, layout and array, and counts rows left out.
    """
    from tqdm.auto import tqdm

    from .pools import identity_table

    path, out = Path(path), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: a store is float16 or float32, got {dtype!r}")
    layout = detect_layout(path) if layout == "auto" else layout
    default = {"datacomp": datacomp.DEFAULT_ARRAY, "clip_retrieval": clip_retrieval.DEFAULT_ARRAY,
               "nemo": nemo.DEFAULT_ARRAY}.get(layout)
    array = array or default
    parts = _parts(path, layout, array)
    if not parts:
        raise ValueError(f"input: {path} holds no part to import")
    default_id = {"datacomp": datacomp.ID_COLUMN, "clip_retrieval": clip_retrieval.ID_COLUMN,
                  "nemo": nemo.ID_COLUMN}[layout]
    settings = {"imported_from": str(path.resolve()), "layout": layout, "array": array,
                "id_column": id_column, "dtype": dtype}
    with directory_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        settings_path = out / "import.json"
        if settings_path.is_file() and json.loads(settings_path.read_text()) != settings:
            raise ValueError(f"{out}: holds parts imported with other settings "
                             f"({settings_path.read_text().strip()}); use another directory")
        write_json(settings_path, settings)
        started, done_rows, first, skipped = time.perf_counter(), 0, 0, 0
        entries, counts, dim = [], {"read": 0, "degenerate_embedding": 0}, None
        with tqdm(total=sum(p["rows"] for p in parts), unit="row", desc=f"import {layout} {array}",
                  disable=not progress) as bar:
            for part in parts:
                done_path = out / f"{part['name']}{DONE}"
                stamp = _stamp(part["files"])
                done = json.loads(done_path.read_text()) if done_path.is_file() else None
                if done is None or done.get("sources") != stamp:
                    emb, table = part["load"]()
                    done = _write_part(out, part["name"], emb, table, dtype, stamp, first,
                                       lambda t, first=first: identity_table(
                                           t, default_id, id_column, (), part["name"], first))
                    done_rows += part["rows"]
                else:
                    skipped += 1
                entries.append({"name": part["name"], "rows": done["rows"], "counts": done["counts"]})
                for k, v in done["counts"].items():
                    counts[k] = counts.get(k, 0) + v
                if done["rows"] and dim is not None and done["dim"] != dim:
                    raise ValueError(f"input: part {part['name']} holds {done['dim']}-d rows, the "
                                     f"parts before it {dim}-d; one store holds one width")
                dim = done["dim"] if done["rows"] else dim
                first += part["rows"]
                bar.update(part["rows"])
        seconds = time.perf_counter() - started
        log.info("imported %s rows in %.1f s (%.0f rows/s); %d of %d parts were done before",
                 f"{done_rows:,}", seconds, done_rows / max(seconds, 1e-9), skipped, len(parts))
        if dim is None:
            raise ValueError(f"input: {path}: no part holds a usable row")
        write_json(out / "manifest.json", {
            "format": FORMAT, "version": VERSION, "dim": int(dim), "dtype": dtype,
            "shards": [e for e in entries if e["rows"]],
            "empty_shards": [e for e in entries if not e["rows"]], "counts": counts, **settings})
    return EmbeddingStore(out)


def _write_part(out: Path, name: str, emb: np.ndarray, table: pa.Table, dtype: str,
                stamp: list, first: int, identify) -> dict:
    if emb.ndim != 2 or len(emb) != table.num_rows:
        raise ValueError(f"{name}: {table.num_rows} metadata rows for embeddings of shape {emb.shape}")
    ident = identify(table)
    # the source's own key (and a uid that id_column overrides) kept under other names, so that
    # the store's identity is the one chosen here
    renamed = {"key": "source_key"}
    if "uid" not in ident.column_names:
        renamed["uid"] = "source_uid"
    table = table.rename_columns([renamed.get(c, c) for c in table.column_names])
    table = table.add_column(0, "key", ident.column("key"))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is left out below
        x = emb.astype(dtype, copy=False)  # the values as they are: pruning normalises what is not unit norm
    bad = ~np.isfinite(x).all(axis=1) | ~x.any(axis=1)
    counts = {"read": int(len(x)), "degenerate_embedding": int(bad.sum())}
    done = {"rows": int((~bad).sum()), "dim": int(x.shape[1]), "counts": counts, "sources": stamp}
    if bad.any():
        log.warning("%s: %d rows are all zero or not finite and are left out (first: %s)",
                    name, int(bad.sum()), ident.column("key")[int(np.argmax(bad))].as_py())
        done["degenerate"] = ident.column("key").filter(pa.array(bad)).to_pylist()
        x, table = x[~bad], table.filter(pa.array(~bad))
    write_npy(out / f"{name}.npy", np.ascontiguousarray(x))
    write_parquet(out / f"{name}.parquet", table)
    write_json(out / f"{name}{DONE}", done)
    return done
