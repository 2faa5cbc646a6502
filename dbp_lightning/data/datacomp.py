"""DataComp's metadata directory: for each pool shard, ``<stem>.parquet`` (``uid``, ``url``,
``text``, ``clip_b32_similarity_score``, ``clip_l14_similarity_score``, ...) and ``<stem>.npz``
whose row i is the parquet's row i (arrays ``l14_img``, ``l14_txt`` 768-d, ``b32_img``,
``b32_txt`` 512-d, float16 or float32, often compressed).

An array stored uncompressed in the ``.npz`` is memory-mapped where it lies; a compressed one
must be decompressed, which :mod:`.importer` does once, shard by shard.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np

ARRAYS = ("l14_img", "l14_txt", "b32_img", "b32_txt")
DEFAULT_ARRAY = "l14_img"
ID_COLUMN = "uid"


def is_datacomp(path: Path) -> bool:
    return path.is_dir() and any(p.with_suffix(".parquet").is_file() for p in path.glob("*.npz"))


def parts(path: Path) -> list[tuple[str, Path, Path]]:
    """(stem, parquet, npz) of every shard, sorted by stem.

    Raises:
        ValueError: naming every stem that has one of the two files and not the other.
    """
    npz = {p.stem for p in path.glob("*.npz")}
    parquet = {p.stem for p in path.glob("*.parquet")}
    lonely = sorted(npz ^ parquet)
    if lonely:
        raise ValueError(f"input: {path}: {len(lonely)} DataComp shards lack their "
                         f"{'.parquet' if lonely[0] in npz else '.npz'} twin (first: {lonely[0]}); "
                         "every <stem>.npz needs its <stem>.parquet, row for row")
    return [(s, path / f"{s}.parquet", path / f"{s}.npz") for s in sorted(npz)]


@functools.lru_cache(maxsize=1 << 16)
def _member_info(npz: Path, name: str, stamp: tuple[int, int]) -> tuple[bool, tuple[int, ...], np.dtype, int]:
    return _read_member_info(npz, name)


def member_info(npz: Path, name: str) -> tuple[bool, tuple[int, ...], np.dtype, int]:
    """(compressed, shape, dtype, data offset in the file) of the array ``name`` in ``npz``,
    read from the zip and .npy headers alone (once per file version: the check for an import
    and the mapping share it)."""
    st = npz.stat()
    return _member_info(npz, name, (st.st_size, st.st_mtime_ns))


def _read_member_info(npz: Path, name: str) -> tuple[bool, tuple[int, ...], np.dtype, int]:
    with zipfile.ZipFile(npz) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            arrays = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise ValueError(f"array: {npz} has no array {name!r} (it has {arrays})") from None
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            header = f.tell()
    if fortran:
        raise ValueError(f"{npz}: {name} is stored in Fortran order; import it")
    compressed = info.compress_type != zipfile.ZIP_STORED
    # the member's data begins after its local file header, whose name and extra fields vary
    with open(npz, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header
    return compressed, tuple(shape), np.dtype(dtype), offset


def open_array(npz: Path, name: str) -> np.ndarray | None:
    """The array ``name`` of ``npz`` memory-mapped in place, or None when it is compressed."""
    compressed, shape, dtype, offset = member_info(npz, name)
    if compressed:
        return None
    return np.memmap(npz, dtype=dtype, mode="r", offset=offset, shape=shape)


def load_array(npz: Path, name: str) -> np.ndarray:
    """The array ``name`` of ``npz``, decompressed into memory (one shard's worth)."""
    member_info(npz, name)  # the same error as open_array for a missing array
    with np.load(npz) as data:
        return data[name]
