"""Reading img2dataset / DataComp WebDataset shards: ``KEY.jpg|jpeg|png|webp``, ``KEY.txt``,
``KEY.json`` per sample, grouped into samples as webdataset groups them, with every fault on the
way (damage, members out of place) counted and named rather than silently dropped."""

from __future__ import annotations

import glob
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a brace pattern, a glob, a directory, or a list of any of these.

    Every shard is checked before it is returned, so that no work starts on a pool with a hole in
    it: a name that a brace pattern or list gives must exist, and every file must be a readable,
    non-empty tar (see :func:`shard_problem`). :func:`list_shards` leaves such shards out instead.

    Returns:
        sorted-within-pattern, de-duplicated absolute paths.

    Raises:
        ValueError: one line naming the pattern that matched nothing, or every shard that cannot
            be read and why, or a shard name (stem) that appears twice (outputs are stored by
            shard name).
    """
    paths, bad = list_shards(spec)
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in bad)
        raise ValueError(f"shards: {len(bad)} of {len(paths) + len(bad)} cannot be read, fix or "
                         f"remove them before embedding (or set skip_bad_shards to leave them "
                         f"out): {listed}")
    return paths


def list_shards(spec: str | list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The shards of ``spec`` that can be read, and those that cannot, with why.

    As :func:`expand_shards`, except that a missing, empty or non-tar shard is returned in the
    second list as ``(path, why)`` instead of raising.

    Raises:
        ValueError: a pattern that matches nothing, or two readable shards with the same name.
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
    problems = {p: why for p in paths if (why := shard_problem(p))}
    good = [p for p in paths if p not in problems]
    names = Counter(shard_name(p) for p in good)
    clash = [n for n, c in names.items() if c > 1]
    if clash:
        both = [p for p in good if shard_name(p) == clash[0]]
        raise ValueError(f"shards: two shards share the name {clash[0]!r}: {both[0]} and {both[1]}")
    return good, list(problems.items())


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


def write_shards(folder: str | os.PathLike, samples: list, shard_size: int) -> int:
    """``samples`` in order as ``folder/shard-NNNNN.tar`` of ``shard_size`` each; returns how many shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), shard_size):
        write_tar(folder / f"shard-{start // shard_size:05d}.tar", samples[start : start + shard_size])
    return -(-len(samples) // shard_size)


def has_end_of_archive(path: str) -> bool:
    """Whether the file ends in the two zero blocks every complete tar ends with; a tar cut at a
    member boundary reads without error but lacks them."""
    size = os.path.getsize(path)
    if size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


class ShardChanged(RuntimeError):
    """A shard is not the file it was when the pool was listed: its size or mtime differ."""


def shard_stamp(path: str) -> tuple[int, int]:
    """(bytes, mtime_ns) of a shard: what tells that it was rewritten."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def img2dataset_expected(path: str) -> int | None:
    """How many samples img2dataset wrote into the tar ``path``, from the files it writes beside
    it: ``NNNNN_stats.json`` (``successes``), else ``NNNNN.parquet`` (one row per attempted
    sample; those with ``status`` "success" are in the tar). None when neither is readable."""
    base = path
    for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    try:
        with open(f"{base}_stats.json") as f:
            successes = json.load(f).get("successes")
        if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0:
            return successes
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if "status" in pq.read_schema(f"{base}.parquet").names:
            status = pq.read_table(f"{base}.parquet", columns=["status"]).column("status")
            return int(pc.sum(pc.equal(status, "success")).as_py() or 0)
    except (OSError, ValueError, TypeError, KeyError):  # pyarrow's errors derive from these
        pass
    return None


def count_samples(path: str, headers: bool = True) -> int | None:
    """Samples (keys with an image) in the shard ``path``, without reading the images: img2dataset's
    count beside it when there is one, else (``headers``) the tar's headers, a seek per member of
    a plain tar (a compressed one is not counted). None when it is not counted. Approximate
    where a shard is damaged or a sample lacks its caption (the reader counts those exactly)."""
    known = img2dataset_expected(path)
    if known is not None or not headers:
        return known
    try:
        with tarfile.open(path, mode="r:") as tar:  # a plain tar only: headers, data seeked over
            keys = set()
            for info in tar:
                m = _KEY_EXT.match(info.name)
                if (info.isreg() and m and not _META.match(info.name)
                        and m.group(2).lower() in IMAGE_EXTENSIONS):
                    keys.add(m.group(1))
                tar.members = []
            return len(keys)
    except (tarfile.TarError, OSError, EOFError):
        return None


def count_pool(paths: list[str], at_least: int | None = None,
               scan: int | None = None) -> tuple[int, bool]:
    """(samples, exact) in the shards ``paths``, from :func:`count_samples`.

    Args:
        at_least: stop as soon as this many are found (the pool is then known to be at least
            that large: what a size check needs, one shard's worth on a large pool).
        scan: read the tar headers of at most this many shards, evenly spread (img2dataset's
            counts are read for all): a progress bar's total on 10^4 shards in a second.

    Shards not counted are estimated at the samples per byte of those counted (``exact`` False).
    """
    headers = set(range(len(paths)) if scan is None or len(paths) <= scan
                  else (i * len(paths) // scan for i in range(scan)))
    counted = counted_bytes = unknown_bytes = 0
    for i, path in enumerate(paths):
        n = count_samples(path, headers=i in headers)
        if n is None:
            unknown_bytes += os.path.getsize(path)
            continue
        counted, counted_bytes = counted + n, counted_bytes + os.path.getsize(path)
        if at_least is not None and counted >= at_least:
            return counted, True
    estimate = round(unknown_bytes * counted / counted_bytes) if counted_bytes else 0
    return counted + estimate, unknown_bytes == 0


#: webdataset's split of a member name into sample key and extension (``base_plus_ext``), and
#: the member names it skips (``__meta__`` entries)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")

#: bytes of incomplete samples one reader holds back, waiting for members that come later in the
#: tar (see :func:`iter_shard`); beyond it the oldest is given out as it is
HOLD_BYTES = 64 << 20


def _is_pair(sample: dict) -> bool:
    """Whether a sample has the two members every use needs: an image and a caption."""
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def _zeros_to_end(read) -> bool:
    """Whether what ``read(n)`` gives from here to the end is all zero bytes."""
    while chunk := read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _tar_members(path: str, stream, damage: dict) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular members of an open tar, as webdataset's
    ``tar_file_iterator`` gives them. When reading stops before the archive's end, ``damage``
    gets ``kind`` ("truncated" or "corrupt_header"), ``why``, ``member`` (the name of the member
    whose data was being read, when tarfile had read its header) and ``partial`` (a member, or
    part of one, lies where reading stopped: a sample was cut there).

    Python's tarfile stops without an error at a header that does not check out after the
    first; what follows the place it stopped tells a clean end (zeros only) from damage."""
    size = os.fstat(stream.fileno()).st_size
    plain = True
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
            for info in tar:
                if info.isreg() and not _META.match(info.name):
                    damage["member"] = info.name  # the member being read, should reading fail
                    data = tar.extractfile(info).read()
                    del damage["member"]
                    yield info.name, data
                tar.members = []  # a stream's member list would grow with the shard
            stop = tar.offset  # the header tarfile stopped at (uncompressed position)
            if not plain:  # tarfile read the block at stop, if there was a whole one
                if tar.fileobj.tell() < stop + tarfile.BLOCKSIZE:
                    damage.update(kind="truncated", why=f"the compressed tar ends at uncompressed "
                                  f"byte {stop:,} between members, without its end-of-archive blocks")
                elif not _zeros_to_end(tar.fileobj.read):
                    damage.update(kind="corrupt_header", partial=True, why=f"a corrupt tar header at "
                                  f"uncompressed byte {stop:,}; nothing after it is read")
                return
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        where = f"at byte {size:,} " if plain else ""
        damage.update(kind="truncated", partial=True, why=f"the tar ends {where}inside a member ({exc})")
        return
    stream.seek(stop)  # a plain tar: its offsets are the file's
    head = stream.read(tarfile.BLOCKSIZE)
    if 0 < len(head) < tarfile.BLOCKSIZE:
        damage.update(kind="truncated", partial=True,
                      why=f"the tar ends at byte {size:,} inside a member's header")
    elif head.count(0) != len(head):
        damage.update(kind="corrupt_header", partial=True,
                      why=f"a corrupt tar header at byte {stop:,}; nothing after it is read")
    elif not _zeros_to_end(stream.read):  # the archive ended whole: its last sample did too
        damage.update(kind="corrupt_header", ended=True,
                      why=f"members after the end-of-archive blocks at byte {stop:,} "
                          "(tars joined end to end?); nothing after them is read")
    if not damage and not has_end_of_archive(path):
        damage.update(kind="truncated", why=f"the tar ends at byte {size:,} between members, "
                                            "without its end-of-archive blocks")


class _Grouper:
    """Members -> samples of one shard: adjacent members with one key make a sample, as
    webdataset groups them; a sample missing its image or caption is held back (up to
    :data:`HOLD_BYTES`) so that members of its key further on complete it."""

    def __init__(self, path: str, errors: Counter, notes: dict):
        self.path, self.errors, self.notes = path, errors, notes
        self.current: dict | None = None
        self.held: dict[str, dict] = {}  # insertion order: the oldest first
        self.held_bytes = 0
        self.given: set[str] = set()  # keys of samples given out (this shard's keys only)
        self.noted: set[tuple[str, str]] = set()
        self.last_members: set[str] | None = None  # extensions of the last sample given out
        self.count = 0

    def note(self, cause: str, key: str) -> None:
        if (cause, key) not in self.noted:
            self.noted.add((cause, key))
            self.errors[cause] += 1
            self.notes.setdefault(cause, []).append(key)

    def add(self, name: str, data: bytes) -> Iterator[dict]:
        match = _KEY_EXT.match(name)
        if not match:  # no extension: webdataset drops it too
            return
        key, ext = match.group(1), match.group(2).lower()
        if self.current is not None and key != self.current["__key__"]:
            yield from self.close_current()
        if self.current is None:
            self.current = {"__key__": key, "__url__": self.path}
        if ext in self.current:  # webdataset would stop the shard here; the first copy is kept
            self.note("duplicate_member", key)
        else:
            self.current[ext] = data

    def close_current(self) -> Iterator[dict]:
        group, self.current = self.current, None
        if group is None:
            return
        key = group["__key__"]
        if key in self.held:  # more members of a sample seen before, with others in between
            self.note("members_not_adjacent", key)
            sample = self.held[key]
            for ext, value in group.items():
                if ext.startswith("__"):
                    continue
                if ext in sample:
                    self.note("duplicate_member", key)
                else:
                    sample[ext] = value
                    self.held_bytes += len(value)
            if _is_pair(sample):
                yield self._give(self._unhold(key))
        elif key in self.given:  # its sample was given out already: these members come too late
            self.note("members_not_adjacent", key)
        elif _is_pair(group):
            yield self._give(group)
        else:
            self.held[key] = group
            self.held_bytes += _size(group)
            while self.held_bytes > HOLD_BYTES and len(self.held) > 1:
                yield self._give(self._unhold(next(iter(self.held))))

    def settle_current(self, failed_member: str | None) -> int:
        """At damage: drop the sample open when reading stopped if the damage may have cut it
        short; 1 if dropped. It is whole when the member being read as reading failed belongs
        to the next sample; with no name to tell (a damaged header), when it has every member
        the sample before it had."""
        current = self.current
        if current is None:
            return 0
        if failed_member is not None:
            match = _KEY_EXT.match(failed_member)
            whole = match is not None and match.group(1) != current["__key__"]
        else:
            whole = self.last_members is not None and _members(current) >= self.last_members
        if whole:
            return 0
        self.current = None
        return 1

    def release(self) -> Iterator[dict]:
        """The samples still held (each lacks an image or a caption), in tar order."""
        while self.held:
            yield self._give(self._unhold(next(iter(self.held))))

    def _unhold(self, key: str) -> dict:
        sample = self.held.pop(key)
        self.held_bytes -= _size(sample)
        return sample

    def _give(self, sample: dict) -> dict:
        self.last_members = _members(sample)
        self.given.add(sample["__key__"])
        self.count += 1
        return sample


def _members(sample: dict) -> set[str]:
    """What a sample holds, an image of any format counted alike (samples mix jpg and png)."""
    return {"image" if k in IMAGE_EXTENSIONS else k for k in sample if not k.startswith("__")}


def _size(sample: dict) -> int:
    return sum(len(v) for k, v in sample.items() if not k.startswith("__"))


def iter_shard(path: str, errors: Counter, notes: dict | None = None,
               stamp: tuple[int, int] | None = None) -> Iterator[dict]:
    """Raw samples (``__key__``, ``__url__`` and one bytes value per extension) of one tar shard.

    Members are grouped into samples by key as webdataset groups them, with these faults counted
    in ``errors`` (and described in ``notes``) instead of stopping the run:

    - damage (the file is cut short, or a member header is corrupt): reading stops there; the
      samples before it are yielded, the one it cut short is dropped: the one whose member was
      being read, or, when a damaged header hides the name, the open sample if it lacks a
      member the sample before it had (a whole sample before the damage is kept).
      ``errors["truncated"]`` or ``errors["corrupt_header"]`` is 1 and ``notes["damage"]``
      says where. ``errors["lost_to_truncation"]`` counts the samples lost: with img2dataset's
      ``NNNNN_stats.json`` or ``NNNNN.parquet`` beside the tar, the samples it wrote minus those
      read; without, only the sample known to be cut, and ``errors["lost_to_truncation_unknown"]``
      is 1 (how many samples followed the damage is not known).
    - members of one key that are not adjacent (``a.jpg b.jpg a.txt``): webdataset would give
      ``a`` twice, each half unusable; here a sample missing its image or caption is held back
      (up to :data:`HOLD_BYTES` per reader) and the later members join it, so ``a`` is read
      once, whole. Members that come after their sample was given out are dropped. Either way
      the sample is counted once as ``members_not_adjacent`` and its key listed in ``notes``.
    - a member name repeated within a sample: the first is kept, ``duplicate_member`` counted.

    Samples with an image and a caption come in tar order; a sample completed by later
    members comes when it is complete, and samples that stay incomplete come at the end.

    Args:
        stamp: (bytes, mtime_ns) the shard must still have (:func:`shard_stamp`).

    Raises:
        OSError: the shard cannot be opened (it was there when the pool was listed).
        ShardChanged: ``stamp`` is given and the open file differs from it.
    """
    notes = {} if notes is None else notes
    damage: dict = {}
    with open(path, "rb") as stream:
        if stamp is not None:
            st = os.fstat(stream.fileno())
            if (st.st_size, st.st_mtime_ns) != tuple(stamp):
                raise ShardChanged(f"shard {path}: changed since the pool was listed ({stamp[0]:,} "
                                   f"bytes then, {st.st_size:,} now; mtime_ns {stamp[1]} then, "
                                   f"{st.st_mtime_ns} now)")
        samples = _Grouper(path, errors, notes)
        for name, data in _tar_members(path, stream, damage):
            yield from samples.add(name, data)
        dropped = 0  # samples known to be lost to the damage
        if damage and not damage.get("ended"):
            failed = damage.get("member")
            dropped = samples.settle_current(failed)
            if damage.get("partial") and not dropped:  # what was there began the next sample
                dropped = 1
        yield from samples.close_current()
        yield from samples.release()
    if damage:
        errors[damage["kind"]] = 1
        notes["damage"] = damage["why"]
        expected = img2dataset_expected(path)
        lost = dropped if expected is None else max(expected - samples.count, dropped)
        if lost:
            errors["lost_to_truncation"] += lost
        if expected is None:
            errors["lost_to_truncation_unknown"] = 1
        else:
            notes["expected"] = expected


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
