"""Block-wise, validated float32 access to an (N, d) embedding matrix.

Every pruning function reads embeddings through :class:`Embeddings`, so an in-memory array, a
memory-mapped ``.npy`` and a sharded :class:`~dbp_lightning.store.EmbeddingStore` behave the same
and no stage ever materialises the whole matrix in float32: rows are read in blocks (or gathered
by index) and converted, and normalised if needed, one block at a time.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterator

import numpy as np

from .collective import Local, block_range
from .exact import max_norm, normalised_norm_bound

log = logging.getLogger(__name__)

#: rows are unit-norm when | ||x|| - 1 | is below this (float16 storage rounds to ~1e-3).
NORM_TOLERANCE = 2e-3

_NOT_FINITE, _ZERO = 0, 1  # what is wrong with a bad row


class Embeddings:
    """A validated, read-only view of ``x`` that yields float32, L2-normalised rows.

    Args:
        x: array-like of shape (N, d), float16/float32/float64: a NumPy array, a ``np.memmap``
            or any object with ``shape``, ``dtype``, slicing and integer-array indexing (such as
            :class:`~dbp_lightning.store.ShardedArray`).
        block_size: rows per block in :meth:`blocks` and in the validation pass.
        name: how error messages name the input (a file or store path).
        comm: a :mod:`~dbp_lightning.pruning.collective` collective: the ranks validate a share
            of the blocks each and all raise (or warn) alike.

    Validation reads ``x`` once, block by block. NaN/inf values and all-zero rows are refused
    with a ``ValueError`` naming the first bad row. Rows that are finite but not unit-norm are
    accepted with one warning and normalised on every read (the paper's embeddings are
    L2-normalised; cosine similarity is what every stage means).

    Attributes:
        norm_bound: an upper bound (float) of the L2 norm of every float32 row this returns,
            found by the validation pass: the exact layer's error bounds use it rather than
            reading the rows again (:mod:`.exact`).
    """

    def __init__(self, x, block_size: int = 65536, name: str = "embeddings", comm=None):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{name}: expected a non-empty 2-D array (N, d), got shape {shape}")
        if np.dtype(x.dtype).kind != "f":
            raise ValueError(f"{name}: expected floating-point embeddings, got dtype {x.dtype}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.x = x
        self.name = name
        self.n, self.d = int(shape[0]), int(shape[1])
        self.block_size = int(block_size)
        self.normalize = False
        self._validate(comm or Local())

    def _validate(self, comm) -> None:
        # per rank: [first bad row, its problem, rows off unit norm]; -1 is max's identity
        found = np.full((comm.world_size, 3), -1, np.int64)
        found[comm.rank] = (-1, -1, 0)
        largest = np.zeros(comm.world_size)  # per rank: the largest norm bound of its rows
        lo, hi = block_range(self.n, self.block_size, comm.rank, comm.world_size)
        wide = np.empty((min(self.block_size, max(hi - lo, 0)), self.d), np.float32)  # reused
        for start in range(lo, hi, self.block_size):
            raw = self.x[start : min(start + self.block_size, hi)]
            block = as_float32(raw, wide[: len(raw)])
            squares = np.einsum("ij,ij->i", block, block)  # NaN or inf wherever a value is
            if not np.isfinite(squares).all():
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    found[comm.rank, :2] = start + int(np.argmin(finite)), _NOT_FINITE
                    break
            if (squares == 0).any():
                found[comm.rank, :2] = start + int(np.argmin(squares)), _ZERO
                break
            found[comm.rank, 2] += int((np.abs(np.sqrt(squares) - 1.0) > NORM_TOLERANCE).sum())
            largest[comm.rank] = max(largest[comm.rank], max_norm(block, squares))
        found = comm.reduce_max(found)
        bad = found[found[:, 0] >= 0]
        if len(bad):  # the first rank's rows come first: its bad row is the matrix's first
            row, problem = int(bad[0, 0]), int(bad[0, 1])
            if problem == _NOT_FINITE:
                raise ValueError(f"{self.name}: row {row} has NaN or inf values; "
                                 "re-embed that sample or drop it before pruning")
            raise ValueError(f"{self.name}: row {row} is all zeros and has no direction; "
                             "drop it before pruning")
        off_norm = int(found[:, 2].sum())
        self.norm_bound = float(comm.reduce_max(largest).max())
        if off_norm:
            self.normalize = True
            self.norm_bound = normalised_norm_bound(self.d)
            warnings.warn(f"{self.name}: {off_norm} of {self.n} rows are not L2-normalised; "
                          "they are normalised on read", stacklevel=3)

    def __len__(self) -> int:
        return self.n

    def _finish(self, block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        block = as_float32(block, out)
        if self.normalize:  # a new array: ``block`` may be a view of the caller's data
            block = block / np.linalg.norm(block, axis=1, keepdims=True)
        return block

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 (stop - start, d)."""
        return self._finish(self.x[start:stop])

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at ``index`` (int, any order) as float32 (len(index), d)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size == 0:
            return np.zeros((0, self.d), np.float32)
        return self._finish(self.x[index])

    def subset(self, rows: np.ndarray) -> "Embeddings":
        """The rows ``rows`` (int64, sorted or not) as an Embeddings, without re-validating."""
        view = object.__new__(Embeddings)
        view.__dict__.update(self.__dict__)
        view.x = _RowSubset(self.x, np.asarray(rows, dtype=np.int64))
        view.n = len(view.x.rows)
        return view

    def over(self, x) -> "Embeddings":
        """``x``, float32 rows this Embeddings already returned (a copy or a
        :class:`~.scratch.RowRange` of sorted rows), as an Embeddings without re-validating."""
        view = object.__new__(Embeddings)
        view.__dict__.update(self.__dict__)
        view.x, view.n, view.normalize = x, len(x), False
        return view

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)`` over the whole matrix, rows float32 (<= block_size, d)."""
        step = block_size or self.block_size
        for start in range(0, self.n, step):
            yield start, self.rows(start, min(start + step, self.n))


#: float16 blocks of at least this many values are widened by torch (:func:`as_float32`)
_TORCH_WIDEN_MIN = 1 << 20


def as_float32(block, out: np.ndarray | None = None) -> np.ndarray:
    """``block`` (n, d) as C-contiguous float32: itself when it already is, else a new array
    (or ``out``, float32 of ``block``'s shape, reused by a caller that converts block after
    block: fresh memory costs a page fault per page).

    Widening float16 is exact, so the kernel is free to choose: NumPy's takes ~1.5 ns a value
    here, torch's (F16C) ~0.2 ns, and a float16 pool is widened once per pass over it. So large
    float16 blocks go through torch, into an array NumPy allocated (NumPy asks for huge pages,
    torch's allocator does not: its fresh pages cost more than the conversion).
    """
    block = np.asarray(block)
    if block.dtype == np.float32 and block.flags.c_contiguous:
        return block
    if out is None:
        out = np.empty(block.shape, np.float32)
    if block.dtype != np.float16 or block.size < _TORCH_WIDEN_MIN:
        np.copyto(out, block, casting="same_kind")  # float64 rounds to float32, as astype does
        return out
    import torch  # imported here: only float16 pools pay its import

    with warnings.catch_warnings():  # a read-only memmap: torch warns that it could write to it
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(block)))
    return out


class _RowSubset:
    """Array-like rows ``rows`` of ``x``: slicing and integer-array indexing map through."""

    def __init__(self, x, rows: np.ndarray):
        self.x, self.rows = x, rows
        self.shape, self.dtype = (len(rows), x.shape[1]), x.dtype

    def __getitem__(self, item):
        return self.x[self.rows[item]]


def as_embeddings(x, name: str = "embeddings", comm=None) -> Embeddings:
    """Wrap ``x`` in :class:`Embeddings` (validating it, split over ``comm``'s ranks) unless it
    already is one."""
    return x if isinstance(x, Embeddings) else Embeddings(x, name=name, comm=comm)
