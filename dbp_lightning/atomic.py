"""Atomic writes: write to a temporary name in the same directory, then rename.

A reader therefore sees either the previous file (or directory) or the complete new one, never
a partial one, even if the process is killed mid-write or the disk fills.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file is as readable as any
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename not in (None, tmp, str(tmp)):
            raise  # about another file (an input read inside the block): its own name
        # name the file being written, not its temporary twin
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; when the block succeeds, the staging
    directory takes ``path``'s place in one rename and the previous ``path`` is removed.

    The caller must hold ``path``'s :func:`~dbp_lightning.lock.directory_lock` (the staging
    names are per process, and :func:`recover_dir` removes those of dead writers). If the block
    fails, the staging directory is removed and ``path`` is as it was.

    On Linux the swap is ``renameat2(RENAME_EXCHANGE)``: at every instant ``path`` is the old
    or the new directory. Where the file system cannot exchange (NFS), it is two renames, the
    old directory first set aside as ``.<name>.old-<pid>``; a kill between them leaves
    ``path`` absent for an instant, and :func:`recover_dir` puts the old directory back.
    """
    path = Path(path).absolute()
    stage = path.parent / f".{path.name}.swap-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        try:
            yield stage
        except OSError as exc:  # name the file by where it was going, not its staging name
            name = str(exc.filename or "")
            if not name.startswith(str(stage)):
                raise
            raise OSError(exc.errno, exc.strerror or str(exc),
                          str(path) + name[len(str(stage)):]) from exc
        if not path.exists():
            os.rename(stage, path)
        elif not _exchange(stage, path):
            aside = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, aside)
            os.rename(stage, path)
            # NFS keeps files an old reader holds open: recover_dir removes what is left later
            shutil.rmtree(aside, ignore_errors=True)
    finally:  # the staging directory holds the failed new run, or the replaced old one
        shutil.rmtree(stage, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what a killed :func:`atomic_dir` left beside ``path``: put an old directory set
    aside back if ``path`` is missing, and remove staging directories. Call it holding the lock."""
    path = Path(path).absolute()
    aside = sorted(path.parent.glob(f".{path.name}.old-*"))
    if aside and not path.exists():
        log.warning("%s: a swap was cut short; restoring the previous directory", path)
        os.rename(aside.pop(), path)
    for leftover in [*aside, *path.parent.glob(f".{path.name}.swap-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False when the
    platform or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                np.save(f, array)
            except OSError as exc:
                if exc.errno is not None:
                    raise
                # NumPy's fwrite reports a short write ("N requested and M written") with no
                # errno: say what it was, a full disk when the file system has no room left
                st = os.statvfs(tmp.parent)
                full = st.f_bavail * st.f_frsize < array.nbytes
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              f"{os.strerror(errno.ENOSPC if full else errno.EIO)} ({exc})",
                              str(tmp)) from exc


def write_parquet(path: str | os.PathLike, table) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(root: str | os.PathLike, paths) -> str:
    """16 hex digits of the files ``paths`` under ``root``: each one's path relative to ``root``,
    size and bytes, in sorted order. The same fingerprint, the same files (a demo build, a font set)."""
    root = Path(root)
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(p) for p in paths):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
