"""DBP quotas: how many samples each cluster keeps (paper Eq. 2 and the quadratic program).

The paper minimises sum_j (x_j - P_j N)^2 subject to sum_j x_j = N and 1 <= x_j <= M_j, with
P = softmax(C / tau), solves it with OSQP and rounds with ``np.rint``, which can break both
constraints. That QP is the Euclidean projection of P N onto a capped simplex: its solution is
x_j = clip(P_j N - lam, l_j, u_j) for the one lam where the sum is N. :func:`dbp_quotas` finds
lam exactly from the sorted breakpoints (O(k log k)) and rounds to integers that keep the sum,
keep every bound, and differ from x* by less than one: the integer optimum of the same QP.
"""

from __future__ import annotations

import math

import numpy as np

SOLVERS = ("exact", "osqp")


def softmax_probabilities(complexity: np.ndarray, sizes: np.ndarray, temperature: float) -> np.ndarray:
    """P = softmax(C / temperature) over the non-empty clusters; 0 for empty ones. float64 (k,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    complexity = np.asarray(complexity, dtype=np.float64)
    live = np.asarray(sizes) > 0
    if not np.isfinite(complexity[live]).all():
        raise ValueError("complexity has NaN or inf for a non-empty cluster")
    logits = complexity[live] / temperature
    top = logits.max()
    # math.exp and fsum, not np.exp and sum: NumPy picks its exp by the CPU's SIMD width, and the
    # results differ in the last bit between machines
    e = np.array([math.exp(v - top) for v in logits.tolist()])
    p = np.zeros(len(complexity))
    p[live] = e / math.fsum(e)
    return p


def quota_bounds(sizes: np.ndarray, target: int, min_per_cluster: int = 1,
                 balance_ratio: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Integer bounds (lower, upper), int64 (k,) each, of the quota QP.

    upper_j = M_j; lower_j = min(M_j, max(min_per_cluster, floor(balance_ratio * N / k'))),
    with k' the number of non-empty clusters: the cluster balancing ratio of the paper's
    ablation (Fig. 6b) as an extra lower bound (0 = off, the paper's choice).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if min_per_cluster < 0:
        raise ValueError(f"min_per_cluster must be >= 0, got {min_per_cluster}")
    if not 0.0 <= balance_ratio <= 1.0:
        raise ValueError(f"balance_ratio must be in [0, 1], got {balance_ratio}")
    live = int((sizes > 0).sum())
    floor_share = int(np.floor(balance_ratio * target / max(live, 1)))
    lower = np.minimum(sizes, max(min_per_cluster, floor_share))
    return lower, sizes.copy()


def project_capped_simplex(t: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                           total: float) -> np.ndarray:
    """argmin_x ||x - t||^2 subject to sum(x) = total, lower <= x <= upper. float64 (k,).

    x = clip(t - lam, lower, upper), so g(lam) = sum(x) is continuous, piecewise linear and
    non-increasing, with breakpoints a_j = t_j - upper_j and c_j = t_j - lower_j. Prefix sums
    over the sorted breakpoints give g at all of them in O(k log k); the segment holding
    ``total`` is then solved in closed form.
    """
    t, lower, upper = (np.asarray(v, dtype=np.float64) for v in (t, lower, upper))
    if (lower > upper).any():
        raise ValueError("a lower bound exceeds its upper bound")
    if lower.sum() > total or upper.sum() < total:
        raise ValueError(f"no x with sum {total} fits the bounds (sum of lower bounds "
                         f"{lower.sum():.0f}, sum of upper bounds {upper.sum():.0f})")
    x = lower.copy()  # clusters with lower == upper are fixed and take no part below
    free = np.flatnonzero(lower < upper)
    if free.size == 0:
        return x
    t, lo, up = t[free], lower[free], upper[free]
    remaining = total - (lower.sum() - lo.sum())
    a, c = t - up, t - lo  # a_j < c_j
    a_order, c_order = np.argsort(a, kind="stable"), np.argsort(c, kind="stable")
    a_sorted, c_sorted = a[a_order], c[c_order]
    up_above = np.concatenate([np.cumsum(up[a_order][::-1])[::-1], [0.0]])  # sum up_j, a_j >= lam
    t_below_a = np.concatenate([[0.0], np.cumsum(t[a_order])])  # sum t_j, a_j < lam
    lo_below = np.concatenate([[0.0], np.cumsum(lo[c_order])])  # sum lo_j, c_j <= lam
    t_below_c = np.concatenate([[0.0], np.cumsum(t[c_order])])  # sum t_j, c_j <= lam

    def pieces(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """g(lam) = const - n_free * lam, with the free set {a_j < lam < c_j} of lam."""
        ia = np.searchsorted(a_sorted, lam, side="left")
        ic = np.searchsorted(c_sorted, lam, side="right")
        n_free = ia - ic
        const = up_above[ia] + lo_below[ic] + (t_below_a[ia] - t_below_c[ic])
        return const, n_free

    breaks = np.unique(np.concatenate([a, c]))
    const, n_free = pieces(breaks)
    values = const - n_free * breaks
    i = max(int(np.searchsorted(-values, -remaining, side="right")) - 1, 0)  # last g >= total
    if values[i] == remaining or i == len(breaks) - 1:
        lam = breaks[i]
    else:  # g is linear on (breaks[i], breaks[i + 1]) and crosses ``remaining`` there
        const_mid, n_mid = pieces(np.array([0.5 * (breaks[i] + breaks[i + 1])]))
        lam = (const_mid[0] - remaining) / n_mid[0]
    x[free] = np.clip(t - lam, lo, up)
    return x


def round_to_total(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray:
    """Integers within [lower, upper] that sum to ``total``, each floor(x_j) or ceil(x_j) of x
    clipped to the bounds, largest fractional parts rounded up first (ties: lower index first).
    """
    x = np.clip(np.asarray(x, dtype=np.float64), lower, upper)
    base = np.floor(x).astype(np.int64)
    frac = x - base
    deficit = int(total - base.sum())
    if deficit >= 0:
        room = np.flatnonzero(base < upper)
        if deficit > len(room):
            raise ValueError(f"cannot reach total {total}: only {len(room)} clusters can grow")
        up = room[np.argsort(-frac[room], kind="stable")[:deficit]]
        base[up] += 1
    else:  # x summed above total (a solver's tolerance): take back the smallest fractions
        room = np.flatnonzero(base > lower)
        if -deficit > len(room):
            raise ValueError(f"cannot reach total {total}: only {len(room)} clusters can shrink")
        down = room[np.argsort(frac[room], kind="stable")[:-deficit]]
        base[down] -= 1
    return base


def _solve_osqp(t: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray:
    """The paper's route: qpsolvers + OSQP on the same QP (the caller repairs the rounding), at
    tolerance 1e-9 with polishing so that the repair starts from the optimum (the paper's own
    call, at OSQP's defaults, is timed beside it in ``benchmarks/bench_prune.py``)."""
    import scipy.sparse as sp
    from qpsolvers import solve_qp

    k = len(t)
    x = solve_qp(P=sp.identity(k, format="csc") * 2.0, q=-2.0 * t, A=sp.csc_matrix(np.ones((1, k))),
                 b=np.array([float(total)]), lb=lower.astype(np.float64), ub=upper.astype(np.float64),
                 solver="osqp", eps_abs=1e-9, eps_rel=1e-9, max_iter=100000, polishing=True)
    if x is None:
        raise ValueError("OSQP found no solution for the quota QP")
    return x


def dbp_quotas(complexity: np.ndarray, sizes: np.ndarray, target: int, temperature: float = 0.1,
               min_per_cluster: int = 1, balance_ratio: float = 0.0,
               solver: str = "exact") -> np.ndarray:
    """How many samples each cluster keeps under DBP.

    Args:
        complexity: float (k,) cluster complexity C_j = d_inter,j * d_intra,j.
        sizes: int (k,) cluster sizes M_j. Empty clusters get quota 0 and no softmax mass.
        target: N, the total number of samples to keep, <= sum(sizes).
        temperature: tau of P = softmax(C / tau) (paper: 0.1); > 0.
        min_per_cluster: lower bound per non-empty cluster (paper: 1), capped at M_j.
        balance_ratio: cluster balancing ratio, an extra lower bound of
            floor(ratio * N / k') per cluster (paper's best: 0 = off).
        solver: "exact" (capped-simplex projection, this module) or "osqp" (qpsolvers + OSQP,
            as in the paper) followed by the same bound- and sum-respecting rounding.

    Returns:
        int64 (k,) quotas with sum == target and lower_j <= quota_j <= M_j; with "exact" each
        quota is floor or ceil of the continuous optimum x*.

    Raises:
        ValueError: when no quotas satisfy the constraints, saying which one fails.
    """
    sizes = np.asarray(sizes)
    complexity = np.asarray(complexity)
    if sizes.ndim != 1 or complexity.shape != sizes.shape:
        raise ValueError(f"complexity and sizes must be 1-D of equal length, got "
                         f"{complexity.shape} and {sizes.shape}")
    if (sizes < 0).any():
        raise ValueError("sizes must be >= 0")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    target = int(target)
    total = int(sizes.sum())
    if not 0 < target <= total:
        raise ValueError(f"target={target} must be in [1, {total}] (the samples in all clusters)")
    lower, upper = quota_bounds(sizes, target, min_per_cluster, balance_ratio)
    if lower.sum() > target:
        raise ValueError(f"target={target} is below the sum of per-cluster lower bounds "
                         f"({int(lower.sum())}: min_per_cluster={min_per_cluster} and "
                         f"balance_ratio={balance_ratio} over {int((sizes > 0).sum())} clusters)")
    t = softmax_probabilities(complexity, sizes, temperature) * target
    if solver == "exact":
        x = project_capped_simplex(t, lower, upper, target)
    else:
        x = _solve_osqp(t, lower, upper, target)
    return round_to_total(x, lower, upper, target)


def rint_quotas(complexity: np.ndarray, sizes: np.ndarray, target: int, temperature: float = 0.1,
                ) -> np.ndarray:
    """The paper's public recipe, for comparison only: OSQP with 1 <= x <= M, then ``np.rint``.

    The result may miss ``target`` and may leave the bounds; benchmarks report by how much.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    t = softmax_probabilities(complexity, sizes, temperature) * int(target)
    lower = np.minimum(sizes, 1)
    return np.rint(_solve_osqp(t, lower, sizes, int(target))).astype(np.int64)
