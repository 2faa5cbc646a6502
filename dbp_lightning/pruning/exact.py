"""Similarities and nearest neighbours that no BLAS kernel, thread count or process count changes.

A matrix product's rounding depends on the order its sums are taken in, which the BLAS kernel
(chosen per CPU), its thread count and its blocking decide: the same dot product differs in its
last bits from one machine to the next. So every number the selection is built from is defined
on exact arithmetic over the float32 inputs, and computed so that any summation order gives it:

- a **similarity value** (stored, or compared with a threshold) is the exact dot product of the
  two float32 vectors, rounded to float64 and then to float32. A float64 estimate in any order
  lies within a proven bound of the exact value; when every value in that interval rounds to the
  same float32, that is the result, and otherwise (about one value in 6,000) ``math.fsum`` gives
  the exactly rounded sum.
- a **nearest neighbour** (a k-means assignment, SemDeDup's partner) is the argmax of the exact
  dot products, the lowest index on ties. A fast estimate decides it where its best and second
  best are more than twice its error bound apart; the other rows are decided again from float64
  estimates, and the candidates within the float64 bound of the best (identical vectors, in
  practice) by the exact sign of a difference of two dot products.

The fast estimates may come from anywhere (faiss on CPU or GPU, threaded BLAS) as long as they
are IEEE float32 or float64 sums: a dot product of d terms summed in any order, with or without
FMA, is within ``gamma_d * sum_i |a_i b_i| <= gamma_d * ||a|| ||b||`` of the exact value, with
``gamma_d = d u / (1 - d u)`` and ``u`` the unit roundoff (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., eq. 3.5). Products of two float32 are exact in float64, which
makes the fallbacks exact.

Every estimate goes through :func:`gemm32`, :func:`gemm64`, :func:`rowdot64` or
:func:`~.kmeans.search_top2`, so a test can replace them with any estimate within the bound (as
another kernel would give) and check that nothing changes.
"""

from __future__ import annotations

import math

import numpy as np

#: rows per read when an array-like input is too large to hold (max_norm)
_BLOCK = 65536

#: absolute slack for the rounding of the bound arithmetic itself (|values| stay below ~2).
SLACK = 2.0**-40


def dot_bound(d: int, norm_a: float, norm_b: float, dtype) -> float:
    """Largest error of a ``d``-term dot product summed in ``dtype`` in any order.

    Args:
        d: terms in the sum.
        norm_a, norm_b: upper bounds of the two vectors' L2 norms.
        dtype: float32 or float64, the precision the sum is taken in.

    Returns:
        ``gamma_d * norm_a * norm_b`` (a float): ``|computed - exact|`` never exceeds it.
    """
    du = d * float(np.finfo(dtype).eps) / 2
    if du >= 0.5:
        raise ValueError(f"d={d} terms are too many for a {np.dtype(dtype).name} error bound")
    return du / (1.0 - du) * norm_a * norm_b * (1.0 + 1e-9)


def max_norm(x: np.ndarray, squares: np.ndarray | None = None) -> float:
    """Upper bound of the L2 norms of the float32 rows of ``x`` (n, d); 0.0 for no rows.

    The squares are summed in float32 (relative error <= d u) and the result raised to cover it.
    ``squares``: float32 (n,) those sums (``np.einsum("ij,ij->i", x, x)``), when the caller
    has them.
    """
    if len(x) == 0:
        return 0.0
    if squares is None and not isinstance(x, np.ndarray):  # too large to hold: blocks
        return max(max_norm(x[s : s + _BLOCK]) for s in range(0, len(x), _BLOCK))
    if squares is None:
        squares = np.einsum("ij,ij->i", x, x)
    return float(np.sqrt(float(squares.max()) * (1.0 + 3.0 * x.shape[1] * 2.0**-24)))


def normalised_norm_bound(d: int) -> float:
    """Upper bound of the L2 norm of a float32 row of ``d`` values divided, in float32, by its
    norm computed in float32 (``x / np.linalg.norm(x)``): (1 + u) / ((1 - gamma_d)(1 - u)).

    The computed squared norm is within gamma_d of the exact one in any order, its square root
    and each quotient within one rounding (Higham, eq. 3.5 and section 2.2).
    """
    u = float(np.finfo(np.float32).eps) / 2
    gamma = d * u / (1 - d * u)
    return (1 + u) / ((1 - gamma) * (1 - u)) * (1.0 + 1e-9)


def gemm32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 (m, n) estimates of ``a @ b.T`` for float32 (m, d) and (n, d): BLAS, threaded."""
    return a @ b.T


def gemm64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (m, n) estimates of ``a @ b.T`` for float32 (m, d) and (n, d), any order."""
    return a.astype(np.float64) @ b.astype(np.float64).T


def rowdot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (n,) estimates of the row-wise dot products of float32 (n, d) arrays."""
    return np.einsum("ij,ij->i", a, b, dtype=np.float64)


def row_sums_in_order(v: np.ndarray) -> np.ndarray:
    """float64 (m,): the sums of the rows of ``v`` (m, d), taken column by column.

    Elementwise additions in a fixed order: no SIMD width, thread count or BLAS kernel changes
    the result (as NumPy's reductions and matrix products may).
    """
    total = np.zeros(len(v), np.float64)
    for column in np.asarray(v, np.float64).T:
        total += column
    return total


def _exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """The exact dot product of two float32 vectors, rounded once to float64."""
    return math.fsum(a.astype(np.float64) * b.astype(np.float64))  # products are exact


def _round(v: np.ndarray, bound: float, exact) -> np.ndarray:
    """float32 of the exact values that the float64 estimates ``v`` lie within ``bound`` of.

    ``exact(i)`` gives the exactly rounded float64 of value ``i`` (flat index) where the
    interval straddles a float32 rounding boundary.
    """
    delta = bound + SLACK
    lo, hi = (v - delta).astype(np.float32), (v + delta).astype(np.float32)
    unsure = np.flatnonzero(lo != hi)  # rounding is monotone: equal ends, one float32 between
    out = hi.reshape(-1)
    for i in unsure:
        out[i] = np.float32(exact(i))
    return out.reshape(v.shape)


def row_sims(a: np.ndarray, b: np.ndarray, norm_a: float | None = None,
             norm_b: float | None = None) -> np.ndarray:
    """Row-wise similarities ``a_i . b_i``, exactly computed and rounded to float32.

    Args:
        a, b: float32 (n, d).
        norm_a, norm_b: upper bounds of their rows' L2 norms, when the caller has them
            (:func:`max_norm` of each otherwise).

    Returns:
        float32 (n,): the exact dot products rounded to float64, then to float32.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"row_sims needs equal shapes, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return np.zeros(0, np.float32)
    norm_a = max_norm(a) if norm_a is None else norm_a
    norm_b = max_norm(b) if norm_b is None else norm_b
    bound = dot_bound(a.shape[1], norm_a, norm_b, np.float64)
    return _round(rowdot64(a, b), bound, lambda i: _exact_dot(a[i], b[i]))


def pair_sims(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All similarities ``a_i . b_j``, exactly computed and rounded to float32.

    Args:
        a: float32 (m, d); b: float32 (n, d).

    Returns:
        float32 (m, n).
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    bound = dot_bound(a.shape[1], max_norm(a), max_norm(b), np.float64)
    n = b.shape[0]
    return _round(gemm64(a, b), bound, lambda i: _exact_dot(a[i // n], b[i % n]))


def _winner(q: np.ndarray, keys: np.ndarray, candidates: np.ndarray) -> int:
    """Among ``candidates`` (increasing), the key with the largest exact ``q . key``, the
    lowest index on ties."""
    q64 = q.astype(np.float64)
    best = int(candidates[0])
    for c in candidates[1:]:
        c = int(c)
        if np.array_equal(keys[c], keys[best]):
            continue
        # the sign of an exactly rounded sum is the sign of the exact sum
        if math.fsum(np.concatenate([q64 * keys[c], -(q64 * keys[best])])) > 0:
            best = c
    return best


def top2_update(best: np.ndarray, second: np.ndarray, arg: np.ndarray, sims: np.ndarray,
                offset: int) -> None:
    """Fold a block of estimates into each row's running best, second best and argmax.

    Args:
        best, second: (m,) running best and second-best estimates (updated in place).
        arg: int64 (m,) running argmax (in place); ties keep the earlier block's.
        sims: (m, b) estimates for keys ``offset .. offset + b`` (-inf: excluded); overwritten.
        offset: index of the block's first key.
    """
    rows = np.arange(len(sims))
    col = sims.argmax(axis=1)
    top = sims[rows, col]
    sims[rows, col] = -np.inf
    second[:] = np.maximum(np.maximum(second, sims.max(axis=1)), np.minimum(best, top))
    better = top > best
    best[better], arg[better] = top[better], offset + col[better]


def exact_argmax(q: np.ndarray, keys: np.ndarray, before: np.ndarray | None = None,
                 block_size: int = 4096, norm_q: float | None = None,
                 norm_keys: float | None = None) -> np.ndarray:
    """For each query, the key with the largest exact dot product, the lowest index on ties.

    Float64 estimates decide every row whose best and second best are more than twice their
    error bound apart. In the other rows, the keys within that bound of the best are the
    candidates: when they are all one vector (identical rows, as web pools hold), its lowest
    index wins; otherwise the exact sign of each difference decides.

    Args:
        q: float32 (m, d) queries.
        keys: float32 (n, d): an array, or an array-like read in blocks and by index (a
            :class:`~.scratch.RowRange`).
        before: optional int64 (m,): query i considers keys j < before[i] only.
        block_size: keys per float64 block (memory: m x block_size float64 and a mask).
        norm_q, norm_keys: upper bounds of the queries' and keys' L2 norms, when the caller
            has them (:func:`max_norm` of each otherwise).

    Returns:
        int64 (m,) key indices; -1 where a query has no key to consider.
    """
    m, n = len(q), len(keys)
    limit = np.full(m, n, np.int64) if before is None else np.minimum(before, n)

    def blocks(rows):
        """(block start, live rows, their float64 estimates) over the keys ``rows`` consider."""
        for start in range(0, int(limit[rows].max(initial=0)), block_size):
            stop = min(start + block_size, n)
            live = rows[limit[rows] > start]
            v = gemm64(q[live], keys[start:stop])
            v[np.arange(start, stop)[None, :] >= limit[live, None]] = -np.inf
            yield start, live, v

    best, second = np.full(m, -np.inf), np.full(m, -np.inf)
    arg = np.full(m, -1, np.int64)
    for start, live, v in blocks(np.arange(m)):
        b, s, a = best[live], second[live], arg[live]
        top2_update(b, s, a, v, start)
        best[live], second[live], arg[live] = b, s, a
    norm_q = max_norm(q) if norm_q is None else norm_q
    norm_keys = max_norm(keys) if norm_keys is None else norm_keys
    margin = 2 * dot_bound(q.shape[1], norm_q, norm_keys, np.float64) + SLACK
    unsure = np.flatnonzero((best > -np.inf) & (second >= best - margin))
    if unsure.size == 0:
        return arg
    # the best key's estimate is >= best - margin in any order of summation: the candidates.
    # A row whose only candidate is one key is decided. The keys that are anyone's candidate
    # are grouped by their bits (copies, as web pools hold, are the usual several candidates),
    # and a row whose candidates are all one vector takes that vector's lowest index.
    floor = np.full(m, np.inf)
    floor[unsure] = best[unsure] - margin
    count = np.zeros(m, np.int64)
    candidate = np.zeros(n, bool)
    for start, live, v in blocks(unsure):
        near = v >= floor[live, None]
        count[live] += near.sum(axis=1)
        candidate[start : start + v.shape[1]] |= near.any(axis=0)
    several = unsure[count[unsure] > 1]
    if several.size == 0:
        return arg  # each unsure row's one candidate is its best estimate's key: arg already
    group = np.arange(n)
    held = np.flatnonzero(candidate)
    group[held] = held[_first_copy(keys[held])]  # a copy's group: its lowest-index copy
    low, high = np.full(m, n), np.full(m, -1)
    for start, live, v in blocks(several):
        near = v >= floor[live, None]
        ids = group[start : start + v.shape[1]][None, :]
        low[live] = np.minimum(low[live], np.where(near, ids, n).min(axis=1))
        high[live] = np.maximum(high[live], np.where(near, ids, -1).max(axis=1))
    one = several[low[several] == high[several]]
    arg[one] = low[one]
    for i in several[low[several] != high[several]]:  # distinct vectors within the bound: rare
        v = gemm64(q[i : i + 1], keys[: limit[i]])[0]
        arg[i] = _winner(q[i], keys, np.unique(group[np.flatnonzero(v >= floor[i])]))
    return arg


def _first_copy(rows) -> np.ndarray:
    """int64 (n,): for each of the float32 rows (n, d), the position of the first row with the
    same bits."""
    bits = np.ascontiguousarray(rows, np.float32)
    void = bits.view(np.dtype((np.void, bits.dtype.itemsize * bits.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)
