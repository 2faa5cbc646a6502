"""Reading img2dataset / DataComp WebDataset shards: ``KEY.jpg|jpeg|png|webp``, ``KEY.txt``,
``KEY.json`` per sample, through webdataset's own tar iterators."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from webdataset import tariterators

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a brace pattern, a glob, a directory, or a list of any of these.

    Every shard is checked before it is returned, so that no work starts on a pool with a hole in
    it: a name that a brace pattern or list gives must exist, and every file must be a readable,
    non-empty tar (see :func:`shard_problem`).

    Returns:
        sorted-within-pattern, de-duplicated absolute paths.

    Raises:
        ValueError: one line naming the pattern that matched nothing, or every shard that cannot
            be read and why, or a shard name (stem) that appears twice (outputs are stored by
            shard name).
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            found = sorted(str(p) for p in Path(s).glob("*.tar"))
        else:
            found = []
            for pattern in braceexpand(s):  # a named file that is missing is reported below
                found += sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise ValueError(f"shards: {s!r} matches no tar file")
        paths += [os.path.abspath(p) for p in found]
    paths = list(dict.fromkeys(paths))
    bad = [f"{p} ({why})" for p in paths if (why := shard_problem(p))]
    if bad:
        raise ValueError(f"shards: {len(bad)} of {len(paths)} cannot be read, fix or remove them "
                         f"before embedding: {'; '.join(bad)}")
    names = Counter(shard_name(p) for p in paths)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        both = [p for p in paths if shard_name(p) == clash[0]]
        raise ValueError(f"shards: two shards share the name {clash[0]!r}: {both[0]} and {both[1]}")
    return paths


#: how compressed tars begin (gzip, bzip2, xz): read through tarfile's "r|*" like plain ones
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def shard_problem(path: str) -> str | None:
    """Why ``path`` cannot be a tar shard, in a few words, or None when it can.

    Reads the first 512 bytes only: a missing or unreadable file, an empty file, and a file that
    does not start with a tar header (a failed download saved as ``.tar``, an HTML error page)
    are problems; a tar with no members is not (it holds no samples). Damage further in is
    found while the shard is read and counted there (:func:`iter_shard`).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror.lower() if exc.strerror else str(exc)
    if not head:
        return "empty file"
    if head.startswith(_COMPRESSED):
        return None
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:  # zero blocks: an archive with no members
        return None
    except tarfile.HeaderError:
        return f"not a tar archive: starts with {head[:16]!r}"
    return None


def shard_name(path: str) -> str:
    """The name outputs of a shard are stored under: its file name without ``.tar``."""
    name = os.path.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def sample_id(sample: dict) -> str:
    """The identity of a sample: DataComp's ``uid`` from its json when present, else ``__key__``."""
    meta = sample.get("json")
    if meta:
        try:
            uid = json.loads(meta).get("uid")
        except (ValueError, AttributeError):
            uid = None
        if uid:
            return str(uid)
    return sample["__key__"]


def with_id(sample: dict) -> dict:
    """``sample`` with ``__id__`` set to :func:`sample_id` (the json is parsed once)."""
    sample["__id__"] = sample_id(sample)
    return sample


def write_tar(path: str | os.PathLike, samples, expect: int | None = None) -> int:
    """Write webdataset ``samples`` to the tar ``path``; returns how many.

    The members get the fixed ``TAR_MTIME``, so the same samples give the same bytes. The tar is
    closed, then renamed into place: a failure (a full disk; fewer samples than ``expect``)
    leaves no tar.
    """
    import webdataset as wds

    from ..atomic import atomic_path
    from . import TAR_MTIME

    rows = 0
    with atomic_path(path) as tmp, wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
            rows += 1
        if expect is not None and rows != expect:
            raise ValueError(f"{path}: {rows} samples where {expect} were expected")
    return rows


def has_end_of_archive(path: str) -> bool:
    """Whether the file ends in the two zero blocks every complete tar ends with; a tar cut at a
    member boundary reads without error but lacks them."""
    size = os.path.getsize(path)
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def iter_shard(path: str, errors: Counter) -> Iterator[dict]:
    """Raw samples (``__key__`` and one bytes value per extension) of one tar shard.

    A truncated or corrupt tar does not stop the run: the samples read before the damage are
    yielded, except the last one (it may be missing files), ``errors["truncated"]`` is set and
    ``errors["lost_to_truncation"]`` counts the dropped sample.
    """
    broken = not has_end_of_archive(path)

    def handler(exc: Exception) -> bool:
        nonlocal broken
        broken = True
        return False  # stop reading this shard

    pending = None
    try:
        with open(path, "rb") as stream:
            files = tariterators.tar_file_iterator(stream, handler=handler)
            files = ({**f, "__url__": path} for f in files)
            for sample in tariterators.group_by_keys(files, handler=handler):
                if pending is not None:
                    yield pending
                pending = sample
    except (OSError, EOFError, tarfile.TarError, ValueError):  # raised outside webdataset's handler
        broken = True
    if broken:
        errors["truncated"] = 1
        if pending is not None:
            errors["lost_to_truncation"] += 1
        return
    if pending is not None:
        yield pending


def decode_image(sample: dict):
    """The sample's image as an RGB PIL image, or None if it has none or it does not decode."""
    from PIL import Image

    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    return img.convert("RGB")
            except Exception:  # PIL raises many types for corrupt bytes
                return None
    return None


def caption_fault(sample: dict) -> str:
    """Why :func:`decode_caption` found no caption, as a count's name: ``caption_not_utf8``
    when there are caption bytes that are not UTF-8, else ``no_caption`` (absent or blank)."""
    raw = sample.get("txt")
    if raw is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "caption_not_utf8"
    return "no_caption"


def decode_caption(sample: dict) -> str | None:
    """The sample's caption (``txt``), stripped; None when absent, empty or not UTF-8."""
    raw = sample.get("txt")
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None
