"""The scratch file the out-of-core stages write rows to: unlinked, reserved up front, and read
and written past the page cache where the file system allows it.

Sorted rows are written once and read once, so caching them gains nothing, and a pool larger
than memory makes the kernel throttle buffered writes to its write-back rate: on this project's
benchmark machine a few tenths of a GB/s buffered against 2-3 GB/s direct
(``benchmarks/bench_semdedup.py``'s parts alone). So the file is opened with ``O_DIRECT`` when the file system
takes it (tmpfs and some others do not: then it is an ordinary buffered file, same bytes).
Direct I/O needs aligned offsets, lengths and buffers: every write starts at a multiple of
:data:`ALIGN` and is padded to one, and reads go through an aligned staging buffer. Direct
writes are handed to a thread, one staging buffer written while the caller fills the next, so
the disk's time overlaps the caller's (the sort's or the grouping pass's work on the next rows).

The file is unlinked the moment it is created, so the kernel frees it when the run closes it,
fails, or is killed (SIGKILL included): no run leaves scratch behind. Its whole size is reserved
before the first row is written; a disk without room refuses up front.
"""

from __future__ import annotations

import errno
import fcntl
from concurrent.futures import Future, ThreadPoolExecutor
import mmap
import os
import shutil
import tempfile
import threading

import numpy as np

#: offsets and lengths of direct reads and writes are multiples of this (every device's logical
#: block divides it)
ALIGN = 4096

#: bytes of the aligned staging buffer a direct file reads and writes through
STAGE_BYTES = 8 << 20

#: staging buffers of direct writes: one being filled while the others are written
WRITE_STAGES = 2


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`: what a write of it occupies."""
    return -(-int(nbytes) // ALIGN) * ALIGN


def check_scratch(directory: str | os.PathLike | None, nbytes: int) -> str:
    """The scratch directory (``None``: the system's temporary directory, ``$TMPDIR``), after
    checking that it exists and has ``nbytes`` free; raises ValueError saying what to set."""
    directory = str(directory) if directory else tempfile.gettempdir()
    if not os.path.isdir(directory):
        raise ValueError(f"scratch_dir {directory}: not a directory")
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise ValueError(f"scratch_dir {directory}: cannot write there ({exc.strerror}); set "
                         "scratch_dir to a writable directory") from None
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise ValueError(f"scratch_dir {directory}: the sorted rows need {size_text(nbytes)} and "
                         f"{size_text(free)} are free; set scratch_dir to a disk with room")
    return directory


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class ScratchFile:
    """An unlinked file of ``nbytes`` reserved bytes in ``scratch_dir``; direct I/O when the
    file system takes it. Use as a context manager, or :meth:`close` it: its space is freed then.

    Raises ValueError naming ``scratch_dir`` when it has no room (checked before anything is
    written).
    """

    def __init__(self, scratch_dir: str | os.PathLike | None, nbytes: int):
        directory = check_scratch(scratch_dir, nbytes)
        fd, path = tempfile.mkstemp(prefix="dbp-scratch-", suffix=".rows", dir=directory)
        os.unlink(path)  # freed on close or on death: nothing to clean up, ever
        self.fd, self.nbytes, self.directory = fd, int(nbytes), directory
        self._stage = threading.local()
        self._writer, self._stages, self._turn = None, [], 0
        self._writes: list[Future | None] = [None] * WRITE_STAGES  # each stage's last write
        try:
            _reserve(fd, nbytes, directory)
            self.direct = _set_direct(fd, True) and _takes_direct(fd, directory)
        except BaseException:
            self.close()
            raise

    def write(self, arrays, offset: int) -> int:
        """Write the bytes of an array, or of a list of arrays one after another (no
        concatenated copy), at ``offset`` (a multiple of :data:`ALIGN`); returns the bytes the
        write occupies, its length padded to a multiple of :data:`ALIGN`. A direct file may
        still be writing them on return (the arrays are copied first): :meth:`read` and
        :meth:`wait` wait for them, and raise a write's error."""
        if offset % ALIGN:
            raise ValueError(f"scratch writes start at multiples of {ALIGN} bytes, not {offset}")
        views = [memoryview(np.ascontiguousarray(a)).cast("B")
                 for a in (arrays if isinstance(arrays, (list, tuple)) else [arrays])]
        total = sum(len(v) for v in views)
        if not self.direct:
            at = offset
            for v in views:
                _write_all(self.fd, v, at)
                at += len(v)
            return padded(total)
        stage, filled, at = self._next_stage(), 0, offset
        for v in views:  # packed into a staging buffer, written a full buffer at a time
            done = 0
            while done < len(v):
                take = min(len(v) - done, STAGE_BYTES - filled)
                stage[filled : filled + take] = v[done : done + take]
                filled, done = filled + take, done + take
                if filled == STAGE_BYTES:
                    self._submit(stage, STAGE_BYTES, at)
                    stage, filled, at = self._next_stage(), 0, at + STAGE_BYTES
        if filled:
            stage[filled : padded(filled)] = 0
            self._submit(stage, padded(filled), at)
        return padded(total)

    def wait(self) -> None:
        """Return once every write is on disk; raises the first failed write's OSError."""
        for i in range(WRITE_STAGES):
            self._settle(i)

    def _next_stage(self) -> np.ndarray:
        """The staging buffer whose turn it is, once its last write is done."""
        if not self._stages:  # page-aligned, as direct I/O needs; made once, reused
            self._stages = [_aligned(STAGE_BYTES) for _ in range(WRITE_STAGES)]
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="dbp-scratch")
        self._settle(self._turn)
        return self._stages[self._turn]

    def _submit(self, stage: np.ndarray, nbytes: int, offset: int) -> None:
        self._writes[self._turn] = self._writer.submit(_write_all, self.fd,
                                                       memoryview(stage)[:nbytes], offset)
        self._turn = (self._turn + 1) % WRITE_STAGES

    def _settle(self, i: int) -> None:
        write, self._writes[i] = self._writes[i], None
        if write is not None:
            write.result()

    def read(self, out: np.ndarray, offset: int) -> None:
        """Fill C-contiguous ``out`` with the bytes at ``offset`` (any offset), once every
        write is done."""
        self.wait()
        view = memoryview(out).cast("B")
        if not self.direct:
            _read_all(self.fd, view, offset)
            return
        stage, done = self._staging(), 0
        while done < len(view):
            at = offset + done
            start = at - at % ALIGN  # the aligned window holding the next byte wanted
            stop = min(start + STAGE_BYTES, padded(offset + len(view)))
            _read_all(self.fd, memoryview(stage)[: stop - start], start)
            take = min(stop - at, len(view) - done)
            view[done : done + take] = stage[at - start : at - start + take]
            done += take

    def _staging(self) -> np.ndarray:
        """This thread's read buffer (a reader thread may read beside the caller)."""
        stage = getattr(self._stage, "buffer", None)
        if stage is None:  # page-aligned, as direct I/O needs; made once a thread, reused
            stage = self._stage.buffer = _aligned(STAGE_BYTES)
        return stage

    def close(self) -> None:
        """Free the file (after any write in flight: a failed one's error is not raised here,
        where a caller may already be handling another)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._stage, self._stages, self._writes = threading.local(), [], [None] * WRITE_STAGES

    def __enter__(self) -> "ScratchFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _aligned(nbytes: int) -> np.ndarray:
    """uint8 (nbytes,) in fresh anonymous pages: page-aligned, as direct I/O needs."""
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def _takes_direct(fd: int, directory: str) -> bool:
    """Whether an aligned direct write of one block works (a file system may take
    ``O_DIRECT`` and still want other alignments: then the file goes buffered, found here
    rather than in a write already handed to the writer thread)."""
    try:
        _write_all(fd, memoryview(_aligned(ALIGN)), 0)  # the first piece overwrites it
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # a file system that reserved nothing, and is full
            raise ValueError(f"scratch_dir {directory}: no room for the sorted rows; set "
                             "scratch_dir to a disk with room") from None
        if exc.errno != errno.EINVAL:
            raise
        return _set_direct(fd, False)
    return True


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on (or off) for ``fd``; False where the system or file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


def _reserve(fd: int, nbytes: int, directory: str) -> None:
    if not hasattr(os, "posix_fallocate"):  # macOS: writes still fail cleanly on ENOSPC
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ValueError(f"scratch_dir {directory}: no room for {size_text(nbytes)} of sorted "
                             "rows; set scratch_dir to a disk with room") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a file system without fallocate: writes still fail cleanly on ENOSPC


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"scratch file ended at byte {offset + done}")
        done += got
