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
per-cell pieces, and nothing is read twice. When the cells are visited once, in order, and each
fits in memory (SemDeDup's), :func:`sorted_runs` scatters the rows to one bucket per run of
whole cells and hands each run over as it is read back, with no second sorted write.

The memory budget sets every buffer: the sort's blocks and buckets, and which cells are read
whole (the others are read in blocks by :class:`RowRange`). When the sorted rows fit in a
quarter of the budget they stay in memory and no file is written.

Rows reach the file in pieces (a cell's or a bucket's rows, up to a share of the budget),
each written at an aligned offset (:mod:`.scratchfile`: unlinked, reserved up front, direct
I/O), and :class:`SortedRows` knows where each piece of positions lies.
"""

from __future__ import annotations

import contextlib
import errno
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from .embeddings import Embeddings
from .scratchfile import ALIGN, ScratchFile, size_text

#: working memory of the out-of-core stages when the caller gives none (``PruneConfig.memory_gb``)
DEFAULT_MEMORY_BYTES = 1 << 30


def scratch_bytes(n: int, d: int, dtype, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                  cells: int | None = None) -> int:
    """Bytes of disk that grouping ``n`` rows of ``d`` values of ``dtype`` by ``cells`` cells
    (:func:`group_rows`; None: one :func:`sort_rows`) takes with ``memory_bytes``: the rows as
    stored (float16 pools take 2 d bytes a row), and the padding of its pieces to whole
    :data:`~.scratchfile.ALIGN` blocks (at most one block a piece)."""
    row_bytes = int(d) * np.dtype(dtype).itemsize
    keys = _buckets(n, row_bytes, memory_bytes) if cells is None else cells
    return int(n) * row_bytes + _padding(n, keys, _capacity(row_bytes, memory_bytes, keys))


def _quarter(row_bytes: int, memory_bytes: int) -> int:
    """Rows in a quarter of the budget: a sort's bucket, a grouping's buffers over all cells."""
    return max(1, int(memory_bytes) // (4 * row_bytes))


def held_rows(d: int, memory_bytes: int) -> int:
    """The most rows of a cell held whole in memory (SemDeDup's cells, ``partition_kmeans``'
    coarse cells): their float32 rows (``d`` values) in a quarter of ``memory_bytes``."""
    return _quarter(4 * int(d), memory_bytes)


def run_rows(d: int, dtype, memory_bytes: int) -> int:
    """The most rows of one of :func:`sorted_runs`' runs: their stored bytes (``d`` values of
    ``dtype`` a row) in a quarter of ``memory_bytes``."""
    return _quarter(int(d) * np.dtype(dtype).itemsize, memory_bytes)


def _buckets(m: int, row_bytes: int, memory_bytes: int) -> int:
    return -(-int(m) // _quarter(row_bytes, memory_bytes))


def _capacity(row_bytes: int, memory_bytes: int, keys: int) -> int:
    """Rows one key (cell or bucket) buffers before its piece is written: its share of a
    quarter of the budget, and at least a block's worth (so padding at most doubles a piece)."""
    return max(-(-ALIGN // row_bytes), _quarter(row_bytes, memory_bytes) // max(1, keys))


def _padding(n: int, keys: int, capacity: int) -> int:
    """Most bytes the pieces' padding takes: every piece but each key's last holds at least
    ``capacity`` rows."""
    return ALIGN * (int(n) // capacity + int(keys))


class SortedRows:
    """Rows ``order`` of an :class:`Embeddings`, in that order, in memory or in a
    :class:`~.scratchfile.ScratchFile`; read back as float32 (normalised as the source is)
    through :meth:`range`.

    Use as a context manager (or call :meth:`close`): the file's space is freed on close.
    """

    def __init__(self, emb: Embeddings, n: int, memory: np.ndarray | None = None,
                 file: ScratchFile | None = None,
                 segments: tuple[np.ndarray, np.ndarray] | None = None):
        self.emb, self.n, self.d = emb, n, emb.d
        self.raw_dtype = np.dtype(emb.x.dtype)
        self.row_bytes = self.d * self.raw_dtype.itemsize
        self._memory, self._file = memory, file
        # where the file holds each run of positions (a piece): int64 first positions
        # (increasing; from 0, or from the first position written when earlier ones are held
        # elsewhere, as sorted_runs' first run) and their byte offsets
        self._seg_pos, self._seg_at = segments or (np.zeros(1, np.int64), np.zeros(1, np.int64))

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def raw(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` (0 <= start <= stop <= n) as stored (raw dtype): a new array from
        disk, a view when held in memory (read them through :class:`RowRange`, which copies);
        or the first ``stop - start`` rows of ``out`` (raw dtype, C-contiguous), filled."""
        if out is not None:
            out = out[: stop - start]
            if self._memory is not None:
                out[:] = self._memory[start:stop]
                return out
        elif self._memory is not None:
            return self._memory[start:stop]
        else:
            out = np.empty((stop - start, self.d), self.raw_dtype)
        if out.size == 0:
            return out
        if start < self._seg_pos[0]:
            raise ValueError(f"positions from {start} are not in the scratch file, which starts "
                             f"at position {int(self._seg_pos[0])}")
        i = int(np.searchsorted(self._seg_pos, start, side="right")) - 1
        at = start
        while at < stop:  # one read per run of positions the file holds in one piece
            end = stop if i + 1 == len(self._seg_pos) else min(stop, int(self._seg_pos[i + 1]))
            offset = int(self._seg_at[i]) + (at - int(self._seg_pos[i])) * self.row_bytes
            self._file.read(out[at - start : end - start], offset)
            at, i = end, i + 1
        return out

    def range(self, start: int, stop: int) -> "RowRange":
        """Rows ``start:stop`` as a lazy float32 array-like (read on indexing)."""
        return RowRange(self, start, stop)

    def ranges(self, spans: list[tuple[int, int]], whole: int):
        """Each span's rows, in order: float32 (hi - lo, d) when it holds at most ``whole``
        rows, read by a thread while the caller works on the span before it; else a
        :class:`RowRange`, read block by block.

        Memory: two buffers of the largest held span's stored rows (the one handed over and
        the next, being read) and, unless they are float32 already, one float32 buffer they
        are widened into. So a held span's array may be reused for the next span: the caller
        is done with a span when it asks for the next one.
        """
        lengths = [hi - lo for lo, hi in spans]
        largest = max((m for m in lengths if m <= whole), default=0)
        spares = [np.empty((largest, self.d), self.raw_dtype) for _ in range(2)]
        wide = None if self.raw_dtype == np.float32 else np.empty((largest, self.d), np.float32)
        held = _read_ahead(self.raw, [span for span, m in zip(spans, lengths) if m <= whole],
                           spares)
        with contextlib.closing(held):
            for (lo, hi), m in zip(spans, lengths):
                if m > whole:
                    yield self.range(lo, hi)
                else:
                    yield self.emb._finish(next(held), None if wide is None else wide[:m])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
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
        """All the rows, float32 (M, d), a new array (:meth:`SortedRows.ranges` reads span
        after span into kept buffers)."""
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
    bucket = _quarter(row_bytes, memory_bytes)  # rows per bucket and per pool block
    if m <= bucket:
        return SortedRows(emb, m, memory=np.asarray(emb.x[np.sort(order)])[_inverse(order)])
    buckets = _buckets(m, row_bytes, memory_bytes)
    with _scratch_file(scratch_dir, scratch_bytes(m, emb.d, emb.x.dtype, memory_bytes)) as file:
        # one pass over the pool: each bucket's rows, in row order, written in pieces
        pieces = _Pieces(file, buckets, _capacity(row_bytes, memory_bytes, buckets))
        _scatter(emb, order, np.arange(0, m, bucket), bucket, pieces, progress)
        out = SortedRows(emb, m, file=file, segments=pieces.segments(np.arange(buckets) * bucket))
        pos, at = out._seg_pos, out._seg_at
        for lo in range(0, m, bucket):  # each bucket put in order, back into its own pieces
            hi = min(lo + bucket, m)
            block = out.raw(lo, hi)[_inverse(order[lo:hi])]
            for i in range(np.searchsorted(pos, lo), np.searchsorted(pos, hi)):
                end = int(pos[i + 1]) if i + 1 < len(pos) else m
                file.write(block[int(pos[i]) - lo : end - lo], int(at[i]))
            del block  # two buckets at most are alive: the one read and its permuted copy
        file.wait()  # a failed write raises here, where out of room is named
    return out


def run_bounds(starts: np.ndarray, limit: int) -> np.ndarray:
    """Cut positions into runs of whole cells of at most ``limit`` rows each, greedily.

    Args:
        starts: int (C + 1,) increasing cell bounds from 0 (a cluster index's ``starts``;
            empty cells repeat a bound); no cell may hold more than ``limit`` rows.
        limit: most rows of a run.

    Returns:
        int64 (R + 1,) run bounds, from 0 to ``starts[-1]``, each a cell bound.
    """
    starts = np.unique(np.asarray(starts, np.int64))
    if np.diff(starts).max(initial=0) > limit:
        raise ValueError(f"a cell holds {int(np.diff(starts).max())} rows, more than a run's "
                         f"{limit}")
    bounds, at, end = [0], 0, int(starts[-1]) if len(starts) else 0
    while at < end:
        at = int(starts[np.searchsorted(starts, at + limit, side="right") - 1])
        bounds.append(at)
    return np.asarray(bounds, np.int64)


def sorted_runs(emb: Embeddings, order: np.ndarray, bounds: np.ndarray,
                memory_bytes: int = DEFAULT_MEMORY_BYTES,
                scratch_dir: str | os.PathLike | None = None, progress: bool = False):
    """Rows ``order`` of ``emb`` in that order, handed over one run of positions at a time.

    For a pass that visits the sorted rows once, in order (SemDeDup's cells): the rows are
    scattered to one bucket per run as :func:`sort_rows` scatters them, and each run is then
    read back whole and put in order in memory, with none of the second write and read that
    :func:`sort_rows` makes for reads in any order. The first run's bucket stays in memory
    (it is visited first), so only the other runs go through the disk, and each of those is
    read by a thread while the caller visits the run before it.

    Memory: during the scatter, the first run's rows and the other buckets' buffers (a quarter
    of the budget each); then two runs' rows (the one visited and the next, read meanwhile).

    Args:
        emb, order, memory_bytes, scratch_dir, progress: as :func:`sort_rows`.
        bounds: int (R + 1,) run bounds from 0 to ``len(order)``, increasing
            (:func:`run_bounds`); a run holds at most a quarter of the budget's rows.

    Yields:
        ``(lo, hi, rows, rank)``: positions ``lo:hi``, their rows as ``emb`` stores them (raw
        dtype, (hi - lo, d)) in pool order, and int64 (hi - lo,) ``rank``: position ``lo + i``
        is ``rows[rank[i]]`` (a caller gathers each cell it visits, small and in cache, rather
        than the whole run). ``rows`` is reused for the run after next. When all the rows fit
        in a quarter of the budget, one run of them all and no file. Close the generator
        (``contextlib.closing``) to free the file early.
    """
    order, bounds = np.asarray(order, np.int64), np.asarray(bounds, np.int64)
    m, row_bytes = len(order), emb.d * np.dtype(emb.x.dtype).itemsize
    bucket = _quarter(row_bytes, memory_bytes)
    if bounds[0] != 0 or bounds[-1] != m or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"run bounds must increase from 0 to {m}")
    if np.diff(bounds).max(initial=0) > bucket:
        raise ValueError(f"a run of {int(np.diff(bounds).max())} rows is more than a quarter "
                         f"of memory_bytes ({bucket} rows)")
    if m <= bucket:
        if m:
            yield 0, m, np.asarray(emb.x[np.sort(order)]), _inverse(order)
        return
    runs, spans = len(bounds) - 1, list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    with _scratch_file(scratch_dir, scratch_bytes(m - spans[0][1], emb.d, emb.x.dtype,
                                                  memory_bytes, runs)) as file:
        try:
            pieces = _Pieces(file, runs, _capacity(row_bytes, memory_bytes, runs), kept=1)
            _scatter(emb, order, bounds[:-1], bucket, pieces, progress)
            rows = SortedRows(emb, m, file=file, segments=pieces.segments(bounds[:-1]))
            # kept buffers (no fresh pages a run): the run visited and the next
            reads = [np.empty((bucket, emb.d), rows.raw_dtype) for _ in range(2)]
            at = 0
            for piece in pieces.pending[0]:  # the first run, in row order as scattered
                reads[0][at : at + len(piece)] = piece
                at += len(piece)
            del pieces
            raws = _read_ahead(rows.raw, spans, reads, first=reads[0][:at])
            with contextlib.closing(raws):
                for (lo, hi), raw in zip(spans, raws):
                    yield lo, hi, raw, _inverse(order[lo:hi])
        finally:
            file.close()


def _read_ahead(read, spans: list[tuple[int, int]], buffers: list[np.ndarray],
                first: np.ndarray | None = None):
    """``read(lo, hi, out=buffer)`` of each span in turn, the next span read by a thread while
    the caller works on the one handed over.

    Span ``i`` is read into ``buffers[i % 2]`` while the caller holds span ``i - 1``: the
    buffer of span ``i - 2``, which the caller was done with when it asked for span ``i - 1``.
    So a span handed over stays intact until the caller asks for the one after it.
    ``first``: the first span's rows when they are in memory already (in ``buffers[0]``), so
    that it is not read.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="dbp-read") as reader:
        ahead = None
        if spans and first is None:
            ahead = reader.submit(read, *spans[0], out=buffers[0])
        for i in range(len(spans)):
            raw = first if i == 0 and first is not None else ahead.result()
            if i + 1 < len(spans):
                ahead = reader.submit(read, *spans[i + 1], out=buffers[(i + 1) % 2])
            yield raw


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
    on_disk = emb.n > _quarter(row_bytes, memory_bytes)
    cells = np.empty(emb.n, np.int64)
    # the file outlives this function (the SortedRows closes it); closed here only on failure
    with (_scratch_file(scratch_dir, scratch_bytes(emb.n, emb.d, emb.x.dtype, memory_bytes,
                                                   n_cells))
          if on_disk else contextlib.nullcontext()) as file:
        pieces = _Pieces(file, n_cells, _capacity(row_bytes, memory_bytes, n_cells)
                         if on_disk else emb.n)
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
                pieces.add(int(ids[lo]), raw[by_cell[lo:hi]])  # gathered: a copy, not a view
            del raw
        sizes = np.bincount(cells, minlength=n_cells)
        if not on_disk:  # the rows fit a quarter of the budget: held, copied once into place
            memory, at = np.empty((emb.n, emb.d), emb.x.dtype), 0
            for c in range(n_cells):
                for piece in pieces.pending[c]:
                    memory[at : at + len(piece)] = piece
                    at += len(piece)
                pieces.pending[c] = []
            return cells, SortedRows(emb, emb.n, memory=memory)
        segments = pieces.segments(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    return cells, SortedRows(emb, emb.n, file=file, segments=segments)


class _Pieces:
    """Rows appended by key (a cell, a bucket), buffered up to ``capacity`` rows a key; a key's
    buffered rows are written as one piece at the file's end, aligned for direct I/O. Keys
    below ``kept`` are never written: their rows stay in ``pending``."""

    def __init__(self, file: ScratchFile | None, keys: int, capacity: int, kept: int = 0):
        self.file, self.capacity, self.kept = file, capacity, kept
        self.pending = [[] for _ in range(keys)]  # per key: row arrays not yet written
        self.held = np.zeros(keys, np.int64)      # rows in ``pending``
        self.written = np.zeros(keys, np.int64)   # rows already in the file
        self.pieces = []                          # (key, rows of the key before it, byte offset)
        self.end = 0

    def add(self, key: int, rows: np.ndarray) -> None:
        self.pending[key].append(rows)
        self.held[key] += len(rows)
        if self.held[key] >= self.capacity and key >= self.kept:
            self.flush(key)

    def flush(self, key: int) -> None:
        self.pieces.append((key, int(self.written[key]), self.end))
        self.end += self.file.write(self.pending[key], self.end)  # no concatenated copy
        self.written[key] += self.held[key]
        self.pending[key], self.held[key] = [], 0

    def segments(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every buffer written (but the kept keys'), then where each piece lies: int64 first
        positions (increasing) and byte offsets, for keys whose rows start at positions
        ``first``."""
        for key in np.flatnonzero(self.held[self.kept :]) + self.kept:
            self.flush(int(key))
        if self.file is not None:
            self.file.wait()  # a failed write raises here, where out of room is named
        pos = np.array([first[k] + within for k, within, _ in self.pieces], np.int64)
        at = np.array([offset for _, _, offset in self.pieces], np.int64)
        by_pos = np.argsort(pos)
        return pos[by_pos], at[by_pos]


@contextlib.contextmanager
def _scratch_file(scratch_dir, nbytes: int):
    """A :class:`~.scratchfile.ScratchFile` of ``nbytes``; closed if the body raises (out of
    room: the one-line error naming ``scratch_dir``)."""
    file = ScratchFile(scratch_dir, nbytes)
    try:
        yield file
    except OSError as exc:
        file.close()
        if exc.errno == errno.ENOSPC:  # a file system that could not reserve the space up front
            raise ValueError(f"scratch_dir {file.directory}: ran out of room writing "
                             f"{size_text(nbytes)} of sorted rows; set scratch_dir to a disk "
                             "with room") from None
        raise
    except BaseException:
        file.close()
        raise


def _inverse(rows: np.ndarray) -> np.ndarray:
    """int64 (M,): for each position of ``rows``, where that row falls in ``sorted(rows)``."""
    rank = np.empty(len(rows), np.int64)
    rank[np.argsort(rows, kind="stable")] = np.arange(len(rows))
    return rank


def _scatter(emb: Embeddings, order: np.ndarray, firsts: np.ndarray, block: int,
             pieces: _Pieces, progress: bool) -> None:
    """One pass over the pool in row order, ``block`` rows a read: each row goes to the bucket
    of its position (bucket ``i`` holds positions from ``firsts[i]``, increasing, to the next),
    and a bucket's rows are appended in row order (a stable sort of each block by bucket)."""
    position = np.full(emb.n, -1, np.int64)
    position[order] = np.arange(len(order))
    with tqdm(total=emb.n, disable=not progress, desc="sort rows", unit="row", leave=False) as bar:
        for start in range(0, emb.n, block):
            stop = min(start + block, emb.n)
            pos = position[start:stop]
            wanted = np.flatnonzero(pos >= 0)
            bar.update(stop - start)
            if wanted.size == 0:  # none of this block's rows is wanted
                continue
            ids = np.searchsorted(firsts, pos[wanted], side="right") - 1
            by_bucket = np.argsort(ids, kind="stable")
            ids = ids[by_bucket]
            rows = np.asarray(emb.x[start:stop])[wanted[by_bucket]]
            cuts = np.flatnonzero(np.diff(ids)) + 1
            for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])):
                pieces.add(int(ids[lo]), rows[lo:hi].copy())  # a copy: the block is let go
            del rows  # before the next block is read
