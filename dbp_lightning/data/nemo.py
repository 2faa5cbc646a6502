"""NVIDIA NeMo Curator's embedding output: parquet files with an id column and a list<float>
column of embeddings (``embedding`` by default). Parquet pages are compressed and a list column
is not a matrix, so these pools are imported once (:mod:`.importer`), file by file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_ARRAY = "embedding"
ID_COLUMN = "id"


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.parquet"))


def _embedding_column(schema: pa.Schema) -> str | None:
    for field in schema:
        t = field.type
        if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
                and pa.types.is_floating(t.value_type):
            return field.name
    return None


def is_nemo(path: Path) -> bool:
    files = _files(path)
    if not files or path.suffix == ".npy":
        return False
    try:
        schema = pq.read_schema(files[0])
    except (OSError, ValueError):  # not parquet: none of the layouts, said by detect_layout
        return False
    return _embedding_column(schema) is not None


def parts(path: Path) -> list[tuple[str, Path]]:
    """(name, parquet) of every file, sorted by name."""
    return [(p.stem, p) for p in _files(path)]


def load_part(parquet: Path, column: str) -> tuple[np.ndarray, pa.Table]:
    """One file's embeddings (float32 (rows, d)) and its other columns."""
    table = pq.read_table(parquet)
    if column not in table.column_names:
        found = _embedding_column(table.schema)
        raise ValueError(f"array: {parquet} has no column {column!r}"
                         + (f" (its embedding column is {found!r})" if found else ""))
    lists = table.column(column).combine_chunks()
    if lists.null_count:
        raise ValueError(f"{parquet}: {lists.null_count} rows have no {column}")
    rows = len(lists)
    if pa.types.is_fixed_size_list(lists.type):
        width = lists.type.list_size
    else:
        lengths = np.diff(lists.offsets.to_numpy())
        width = int(lengths[0]) if rows else 0
        if rows and (lengths != width).any():
            raise ValueError(f"{parquet}: the {column} lists are not all of one length "
                             f"({lengths.min()} to {lengths.max()})")
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    emb = flat.reshape(rows, width).astype(np.float32, copy=False)
    return emb, table.drop_columns([column])
