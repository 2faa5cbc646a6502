"""One writer per output directory: a lock file beside it, as git's ``index.lock``.

The lock is ``<parent>/.<name>.lock`` (beside the directory, not in it, so that a run directory
can be swapped whole while its lock is held). It holds the writer's host, pid and command for
the message a second writer gets. Exclusion is the kernel's ``flock`` on that file, which the
kernel drops when its holder dies however it dies, so a lock left by a killed process is free:
the next writer takes it over and says whose it was. ``flock`` works across the hosts of NFSv4
and Lustre mounts, the shared file systems runs write to on a cluster.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

#: lock files this thread holds: taking one again (a command that locks its output, then a
#: library call inside it that locks the same directory) is a no-op, not a deadlock
_held = threading.local()

#: what flock fails with where a file system has no locks (NFSv3 without lockd, some FUSE mounts)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DirectoryBusy(RuntimeError):
    """Another live process is writing the directory."""


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of ``directory``: hidden, beside it."""
    directory = Path(directory).absolute()
    return directory.parent / f".{directory.name}.lock"


def _holder(path: Path, patience: float = 0.0) -> dict:
    """What a lock file says of its holder ({} when it is empty or unreadable), waiting up to
    ``patience`` seconds for a holder that has just taken the lock to write its name."""
    deadline = time.monotonic() + patience
    while True:
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')})"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, wait: float = 0.0) -> Iterator[Path]:
    """Hold the lock of ``directory`` for the block; yields the lock file's path.

    Args:
        directory: the output directory (it need not exist).
        wait: seconds to wait for a live holder before giving up (0: refuse at once). Caches that
            two jobs may fill with the same run wait; a command the user starts refuses.

    Raises:
        DirectoryBusy: one line naming the directory and its holder (host, pid, command).
    """
    path = lock_path(directory)
    held = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline, waiting = time.monotonic() + wait, False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:  # refusing every run there would help nobody: say so
                log.warning("%s: the file system cannot lock files (%s); a second writer of %s "
                            "will not be refused", path, exc.strerror, directory)
                path.unlink(missing_ok=True)
                yield path
                return
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OSError(exc.errno, f"cannot lock ({exc.strerror})", str(path)) from exc
            if time.monotonic() >= deadline:
                raise DirectoryBusy(f"{Path(directory)} is being written by "
                                    f"{_describe(_holder(path, patience=2.0))}; wait for it to finish, or "
                                    "write elsewhere") from None
            if not waiting:
                log.warning("%s is being written by %s; waiting up to %.0f s for it",
                            directory, _describe(_holder(path)), wait)
                waiting = True
            time.sleep(min(1.0, max(0.05, wait / 100)))
            continue
        # the holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a name nobody else sees, and must start again on the new file
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(path)
        if stale:
            log.warning("%s: took over the lock of %s, which is no longer running",
                        directory, _describe(stale))
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "command": " ".join(os.path.basename(a) if i == 0 else a
                                    for i, a in enumerate(sys.argv))[:200]}
        data = json.dumps(mine).encode()
        os.pwrite(fd, data, 0)  # over the old name, then cut: never an empty file once named
        os.ftruncate(fd, len(data))
        held.add(path)
        yield path
    finally:
        held.discard(path)
        # remove the name while still holding the lock: whoever opened it meanwhile sees
        # (above) that the name is gone and starts again
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def rank_zero_lock(directory: str | os.PathLike, wait: float = 0.0, comm=None,
                   prepare: Callable[[], None] | None = None) -> Iterator[None]:
    """:func:`directory_lock` for a group of processes of which rank 0 writes.

    Rank 0 takes the lock and runs ``prepare`` under it (checks, cleaning up after a dead
    writer); then every rank of ``comm`` (a :mod:`~dbp_lightning.pruning.collective`
    collective) learns whether that worked and raises if it did not, so that no rank waits
    for another in a collective that will never come.
    """
    import numpy as np

    rank = comm.rank if comm is not None else 0
    with contextlib.ExitStack() as stack:
        failed = None
        if rank == 0:
            try:
                stack.enter_context(directory_lock(directory, wait=wait))
                if prepare is not None:
                    prepare()
            except Exception as exc:  # noqa: BLE001 - any failure: the other ranks must learn it
                failed = exc
        if comm is not None and comm.world_size > 1:
            code = comm.broadcast(np.array([failed is not None]) if rank == 0 else None)
            if code[0] and failed is None:
                raise DirectoryBusy(f"rank 0 could not take {directory}; see its error")
        if failed is not None:
            raise failed
        yield
