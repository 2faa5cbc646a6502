"""A pool's rows rewritten in cell order to scratch disk, then read back one contiguous range
per cell: how the per-cell stages stay out of core without a page fault per row.

SemDeDup and the dedup partition's second level visit the pool cell by cell, and a cell's rows
lie scattered over the pool. Gathering them from a memory-mapped store costs a fault per row
and keeps the store's pages resident until they are dropped and faulted in again (at 10M rows
that was most of SemDeDup's time). :func:`sort_rows` instead reads the pool once, in order, and
writes each row to its place in the given order (an external bucket sort: rows go to buckets of
consecutive positions in one sequential pass, then each bucket is put in order in memory), so
that every cell is then one contiguous read, as SemDeDup's public code does with one file per
cluster. When the cells are found by a pass over the pool anyway (the two-level partition's
coarse assignment), :func:`group_rows` writes the rows grouped by cell in that same pass, in
per-cell pieces, and nothing is read twice.

The memory budget sets every buffer: the sort's blocks and buckets, and which cells are read
whole (the others are read in blocks by :class:`RowRange`). When the sorted rows fit in a
quarter of the budget they stay in memory and no file is written.

The scratch file is unlinked the moment it is created, so the kernel frees it when the run
closes it, fails, or is killed (SIGKILL included): no run leaves scratch behind. Its whole size
is reserved before the first row is written; a disk without room refuses up front.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile

import numpy as np
from tqdm.auto import tqdm

from .embeddings import Embeddings

#: working memory of the out-of-core stages when the caller gives none (``PruneConfig.memory_gb``)
DEFAULT_MEMORY_BYTES = 1 << 30


def scratch_bytes(n: int, d: int, dtype) -> int:
    """Bytes of disk one :func:`sort_rows` of ``n`` rows of ``d`` values of ``dtype`` takes (the
    rows as stored: float16 pools take 2 d bytes a row)."""
    return int(n) * int(d) * np.dtype(dtype).itemsize


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
        raise ValueError(f"scratch_dir {directory}: the sorted rows need {_size(nbytes)} and "
                         f"{_size(free)} are free; set scratch_dir to a disk with room")
    return directory


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class SortedRows:
    """Rows ``order`` of an :class:`Embeddings`, in that order, in memory or in an unlinked
    scratch file; read back as float32 (normalised as the source is) through :meth:`range`.

    Use as a context manager (or call :meth:`close`): the file's space is freed on close.
    """

    def __init__(self, emb: Embeddings, n: int, memory: np.ndarray | None = None,
                 fd: int | None = None, segments: tuple[np.ndarray, np.ndarray] | None = None):
        self.emb, self.n, self.d = emb, n, emb.d
        self.raw_dtype = np.dtype(emb.x.dtype)
        self.row_bytes = self.d * self.raw_dtype.itemsize
        self._memory, self._fd = memory, fd
        # where the file holds each run of positions: int64 first positions (increasing, from
        # 0) and their byte offsets; one run unless the rows were written in chunks (group_rows)
        self._seg_pos, self._seg_at = segments or (np.zeros(1, np.int64), np.zeros(1, np.int64))

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def raw(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (0 <= start <= stop <= n) as stored (raw dtype): a new array from
        disk, a view when held in memory (read them through :class:`RowRange`, which copies)."""
        if self._memory is not None:
            return self._memory[start:stop]
        out = np.empty((stop - start, self.d), self.raw_dtype)
        if out.size == 0:
            return out
        i = int(np.searchsorted(self._seg_pos, start, side="right")) - 1
        at = start
        while at < stop:  # one read per run of positions the file holds in one piece
            end = stop if i + 1 == len(self._seg_pos) else min(stop, int(self._seg_pos[i + 1]))
            offset = int(self._seg_at[i]) + (at - int(self._seg_pos[i])) * self.row_bytes
            _pread(self._fd, out[at - start : end - start], offset)
            at, i = end, i + 1
        return out

    def range(self, start: int, stop: int) -> "RowRange":
        """Rows ``start:stop`` as a lazy float32 array-like (read on indexing)."""
        return RowRange(self, start, stop)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._memory = None

    def __enter__(self) -> "SortedRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: integer-array reads of a :class:`RowRange`: rows at most this far apart share one read, and
#: one read covers at most ``_SPAN`` wanted rows (so it holds at most ``_SPAN * _GAP`` rows)
_GAP, _SPAN = 16, 1024


class RowRange:
    """float32 (M, d) rows ``start:stop`` of a :class:`SortedRows`, read when indexed: a slice
    is one contiguous read, an integer array one read per run of nearby rows. For cells too
    large to hold."""

    dtype = np.dtype(np.float32)

    def __init__(self, rows: SortedRows, start: int, stop: int):
        self.rows, self.start, self.stop = rows, start, stop
        self.shape = (stop - start, rows.d)

    def __len__(self) -> int:
        return self.shape[0]

    def load(self) -> np.ndarray:
        """All the rows, float32 (M, d)."""
        return self[:]

    def __getitem__(self, item):
        """A slice (step 1), an integer, or a 1-D integer array of rows, as NumPy reads them
        (negative from the end); float32 rows, always a new array."""
        finish = self.rows.emb._finish
        if isinstance(item, slice):
            a, b, step = item.indices(len(self))
            if step != 1:
                raise IndexError("RowRange slices must have step 1")
            return self._own(finish(self.rows.raw(self.start + a, self.start + max(a, b))))
        index = np.asarray(item)
        if index.ndim > 1 or (index.size and index.dtype.kind not in "iu"):
            raise IndexError("RowRange takes a slice, an integer or a 1-D integer array of rows")
        index = index.astype(np.int64)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        index = np.where(index < 0, index + len(self), index) + self.start
        wanted, inverse = np.unique(index.reshape(-1), return_inverse=True)
        rows = np.empty((wanted.size, self.rows.d), self.rows.raw_dtype)
        # one read per run of wanted rows no more than _GAP apart (a training sample of a
        # quarter of the rows reads them all in a few reads, not one call a row)
        cuts = np.flatnonzero(np.diff(wanted) > _GAP) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [wanted.size]])):
            for a in range(lo, hi, _SPAN):  # a span's read stays within _SPAN wanted rows' reach
                b = min(a + _SPAN, hi)
                first = int(wanted[a])
                rows[a:b] = self.rows.raw(first, int(wanted[b - 1]) + 1)[wanted[a:b] - first]
        rows = finish(rows[inverse])  # ``rows`` was filled here: what comes back is the caller's
        return rows[0] if index.ndim == 0 else rows

    def _own(self, block: np.ndarray) -> np.ndarray:
        """``block``, copied only when it is a view of rows held in memory (float32 rows that
        need no normalising): a caller may write to what it gets."""
        held = self.rows._memory
        return block.copy() if held is not None and np.may_share_memory(block, held) else block


def sort_rows(emb: Embeddings, order: np.ndarray, memory_bytes: int = DEFAULT_MEMORY_BYTES,
              scratch_dir: str | os.PathLike | None = None, progress: bool = False) -> SortedRows:
    """Write rows ``order`` of ``emb`` in that order, for contiguous reads by range.

    Args:
        emb: the pool.
        order: int (M,) distinct row indices (a cluster index's order, or part of one).
        memory_bytes: working memory: the sort holds two buckets of a quarter of it each, and
            the rows stay in memory instead when they fit in a quarter.
        scratch_dir: where the file goes (None: ``$TMPDIR``); checked for room first.
        progress: a progress bar over the pool pass.

    Returns:
        :class:`SortedRows`; position ``i`` holds row ``order[i]``, exactly as ``emb`` stores it.
    """
    order = np.asarray(order, np.int64)
    m = len(order)
    row_bytes = emb.d * np.dtype(emb.x.dtype).itemsize
    bucket = max(1, int(memory_bytes) // (4 * row_bytes))  # rows per bucket and per pool block
    if m <= bucket:
        return SortedRows(emb, m, memory=np.asarray(emb.x[np.sort(order)])[_inverse(order)])
    with _scratch_file(scratch_dir, m * row_bytes) as fd:
        out = SortedRows(emb, m, fd=fd)
        _scatter(emb, order, bucket, fd, row_bytes, progress)
        for lo in range(0, m, bucket):  # each bucket holds its rows by row; put them in order
            hi = min(lo + bucket, m)
            block = out.raw(lo, hi)
            _pwrite(fd, block[_inverse(order[lo:hi])], lo * row_bytes)
            del block  # two buckets at most are alive: this one and its permuted copy
    return out


def group_rows(emb: Embeddings, cells_of, n_cells: int, memory_bytes: int = DEFAULT_MEMORY_BYTES,
               scratch_dir: str | os.PathLike | None = None, progress: bool = False
               ) -> tuple[np.ndarray, SortedRows]:
    """One pass over the pool that finds each row's cell and writes the rows grouped by cell.

    Where :func:`sort_rows` needs the order before it reads the pool, this reads each block
    once for both: ``cells_of`` (a k-means assignment) sees the block's float32 rows, and the
    block's rows are appended, as stored, to their cells' buffers (a quarter of the budget
    over all cells), each full buffer written to the scratch file as one piece. A cell is then
    a few contiguous reads, with no second pass over the pool and no permuting pass.

    Args:
        emb: the pool.
        cells_of: ``cells_of(rows)``: int (B,) cell in [0, n_cells) of float32 rows (B, d).
        n_cells: cells.
        memory_bytes, scratch_dir, progress: as :func:`sort_rows`.

    Returns:
        int64 (N,) each row's cell, and :class:`SortedRows` of all N rows by cell, each cell's
        rows in row order: position ``i`` holds row ``cluster_index(cells, None, n_cells)
        .order[i]``.
    """
    row_bytes = emb.d * np.dtype(emb.x.dtype).itemsize
    quarter = max(1, int(memory_bytes) // (4 * row_bytes))
    on_disk = emb.n > quarter
    capacity = max(1, quarter // n_cells) if on_disk else emb.n  # rows a cell buffers
    cells = np.empty(emb.n, np.int64)
    pending = [[] for _ in range(n_cells)]  # per cell: raw row arrays not yet written
    held = np.zeros(n_cells, np.int64)      # rows in ``pending``
    written = np.zeros(n_cells, np.int64)   # rows already in the file
    pieces = []                             # (cell, first row of the cell's, byte offset)
    # the file outlives this function (the SortedRows closes it); closed here only on failure
    with _scratch_file(scratch_dir, emb.n * row_bytes) if on_disk else contextlib.nullcontext() as fd:
        end = 0

        def flush(c: int) -> None:
            nonlocal end
            rows = np.concatenate(pending[c])
            pieces.append((c, int(written[c]), end))
            _pwrite(fd, rows, end)
            end += rows.nbytes
            written[c] += len(rows)
            pending[c], held[c] = [], 0

        step = emb.block_size
        wide = np.empty((min(step, emb.n), emb.d), np.float32)  # reused: no fresh pages a block
        for start in tqdm(range(0, emb.n, step), disable=not progress, desc="assign and group",
                          unit="block", leave=False):
            raw = np.asarray(emb.x[start : min(start + step, emb.n)])
            ids = np.asarray(cells_of(emb._finish(raw, wide[: len(raw)])), np.int64)
            cells[start : start + len(raw)] = ids
            by_cell = np.argsort(ids, kind="stable")  # each cell's rows stay in row order
            ids = ids[by_cell]
            cuts = np.flatnonzero(np.diff(ids)) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])):
                c = int(ids[lo])
                pending[c].append(raw[by_cell[lo:hi]])  # gathered: a copy, no view of the block
                held[c] += hi - lo
                if on_disk and held[c] >= capacity:
                    flush(c)
            del raw
        sizes = np.bincount(cells, minlength=n_cells)
        if not on_disk:  # the rows fit a quarter of the budget: held, copied once into place
            memory, at = np.empty((emb.n, emb.d), emb.x.dtype), 0
            for c in range(n_cells):
                for piece in pending[c]:
                    memory[at : at + len(piece)] = piece
                    at += len(piece)
                pending[c] = []
            return cells, SortedRows(emb, emb.n, memory=memory)
        for c in np.flatnonzero(held):
            flush(int(c))
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pos = np.array([first[c] + within for c, within, _ in pieces], np.int64)
        at = np.array([offset for _, _, offset in pieces], np.int64)
        by_pos = np.argsort(pos)
    return cells, SortedRows(emb, emb.n, fd=fd, segments=(pos[by_pos], at[by_pos]))


@contextlib.contextmanager
def _scratch_file(scratch_dir, nbytes: int):
    """An unlinked scratch file (fd) in ``scratch_dir`` with ``nbytes`` reserved; closed if
    the body raises (out of room: the one-line error naming ``scratch_dir``)."""
    directory = check_scratch(scratch_dir, nbytes)
    fd, path = tempfile.mkstemp(prefix="dbp-scratch-", suffix=".rows", dir=directory)
    os.unlink(path)  # freed on close or on death: nothing to clean up, ever
    try:
        _reserve(fd, nbytes, directory)
        yield fd
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.ENOSPC:  # a file system that could not reserve the space up front
            raise ValueError(f"scratch_dir {directory}: ran out of room writing "
                             f"{_size(nbytes)} of sorted rows; set scratch_dir to a disk "
                             "with room") from None
        raise
    except BaseException:
        os.close(fd)
        raise


def _inverse(rows: np.ndarray) -> np.ndarray:
    """int64 (M,): for each position of ``rows``, where that row falls in ``sorted(rows)``."""
    rank = np.empty(len(rows), np.int64)
    rank[np.argsort(rows, kind="stable")] = np.arange(len(rows))
    return rank


def _scatter(emb: Embeddings, order: np.ndarray, bucket: int, fd: int, row_bytes: int,
             progress: bool) -> None:
    """One pass over the pool in row order: each row goes to the bucket of its position, and
    a bucket's rows are appended in row order (a stable sort of each block by bucket)."""
    position = np.full(emb.n, -1, np.int64)
    position[order] = np.arange(len(order))
    filled = np.zeros(-(-len(order) // bucket), np.int64)
    with tqdm(total=emb.n, disable=not progress, desc="sort rows", unit="row", leave=False) as bar:
        for start in range(0, emb.n, bucket):
            stop = min(start + bucket, emb.n)
            pos = position[start:stop]
            wanted = np.flatnonzero(pos >= 0)
            bar.update(stop - start)
            if wanted.size == 0:  # none of this block's rows is wanted
                continue
            ids = pos[wanted] // bucket
            by_bucket = np.argsort(ids, kind="stable")
            ids = ids[by_bucket]
            block = np.asarray(emb.x[start:stop])[wanted[by_bucket]]
            cuts = np.flatnonzero(np.diff(ids)) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])):
                b = int(ids[lo])
                _pwrite(fd, block[lo:hi], (b * bucket + int(filled[b])) * row_bytes)
                filled[b] += hi - lo
            del block  # before the next block is read: two blocks at most are alive


def _reserve(fd: int, nbytes: int, directory: str) -> None:
    if not hasattr(os, "posix_fallocate"):  # macOS: writes still fail cleanly on ENOSPC
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ValueError(f"scratch_dir {directory}: no room for {_size(nbytes)} of sorted "
                             "rows; set scratch_dir to a disk with room") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a file system without fallocate: writes still fail cleanly on ENOSPC


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"scratch file ended at byte {offset + done}")
        done += got
