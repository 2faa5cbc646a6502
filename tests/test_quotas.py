import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from dbp_lightning.pruning import dbp_quotas
from dbp_lightning.pruning.quotas import (project_capped_simplex, quota_bounds, rint_quotas,
                                          softmax_probabilities)


def continuous_optimum_slsqp(t, lower, upper, total):
    """A dense general-purpose solver (SLSQP) on the same QP, scaled to O(1), as the reference."""
    s = float(total)
    ts, lo, up = t / s, lower / s, upper / s
    res = minimize(lambda y: ((y - ts) ** 2).sum(), np.clip(ts, lo, up), jac=lambda y: 2 * (y - ts),
                   bounds=list(zip(lo, up)), method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda y: y.sum() - 1.0, "jac": lambda y: np.ones_like(y)}],
                   options={"ftol": 1e-15, "maxiter": 2000})
    x = res.x * s
    # SLSQP may stop on a line-search precision limit; its point must still be feasible
    assert abs(x.sum() - total) < 1e-4 * total and np.all(x >= lower - 1e-6) and np.all(x <= upper + 1e-6)
    return x


def random_problem(rng, k):
    sizes = rng.integers(1, 200, k)
    complexity = rng.uniform(0.01, 0.5, k)
    target = int(rng.integers(k, sizes.sum() + 1))
    return complexity, sizes, target


@pytest.mark.parametrize("seed", range(8))
def test_projection_matches_dense_solver(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 50))
    complexity, sizes, target = random_problem(rng, k)
    lower, upper = quota_bounds(sizes, target)
    t = softmax_probabilities(complexity, sizes, 0.1) * target
    exact = project_capped_simplex(t, lower, upper, target)
    reference = continuous_optimum_slsqp(t, lower.astype(float), upper.astype(float), target)
    assert abs(exact.sum() - target) < 1e-6
    assert np.all(exact >= lower - 1e-9) and np.all(exact <= upper + 1e-9)
    assert ((exact - t) ** 2).sum() <= ((reference - t) ** 2).sum() + 1e-6
    np.testing.assert_allclose(exact, reference, atol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_quotas_are_floor_or_ceil_of_optimum_and_exact(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 50))
    complexity, sizes, target = random_problem(rng, k)
    q = dbp_quotas(complexity, sizes, target, temperature=0.1)
    lower, upper = quota_bounds(sizes, target)
    x = project_capped_simplex(softmax_probabilities(complexity, sizes, 0.1) * target, lower, upper, target)
    assert q.dtype == np.int64 and q.sum() == target
    assert np.all(q >= 1) and np.all(q <= sizes)
    assert np.all((q == np.floor(x + 1e-9)) | (q == np.ceil(x - 1e-9)))


@pytest.mark.parametrize("seed", range(10))
def test_quotas_are_the_integer_optimum_by_enumeration(seed):
    rng = np.random.default_rng(200 + seed)
    k = int(rng.integers(2, 5))
    sizes = rng.integers(1, 7, k)
    complexity = rng.uniform(0, 1, k)
    target = int(rng.integers(k, sizes.sum() + 1))
    t = softmax_probabilities(complexity, sizes, 0.3) * target
    best = min((((np.array(c) - t) ** 2).sum(), c)
               for c in itertools.product(*[range(1, m + 1) for m in sizes]) if sum(c) == target)
    q = dbp_quotas(complexity, sizes, target, temperature=0.3)
    assert ((q - t) ** 2).sum() == pytest.approx(best[0], abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_osqp_backend_agrees_with_exact_within_rounding(seed):
    rng = np.random.default_rng(300 + seed)
    complexity, sizes, target = random_problem(rng, 40)
    exact = dbp_quotas(complexity, sizes, target)
    osqp = dbp_quotas(complexity, sizes, target, solver="osqp")
    assert osqp.sum() == target and np.all(osqp >= 1) and np.all(osqp <= sizes)
    assert np.abs(osqp - exact).max() <= 1


def test_rint_baseline_can_miss_target_where_exact_does_not():
    rng = np.random.default_rng(7)
    misses = 0
    for _ in range(20):
        complexity, sizes, target = random_problem(rng, 40)
        misses += rint_quotas(complexity, sizes, target).sum() != target
        assert dbp_quotas(complexity, sizes, target).sum() == target
    assert misses > 0  # the paper's np.rint recipe does break the sum constraint


def test_empty_clusters_get_nothing_and_no_softmax_mass():
    sizes = np.array([10, 0, 5, 0, 20])
    complexity = np.array([0.2, np.nan, 0.1, 0.0, 0.3])  # NaN on an empty cluster is ignored
    q = dbp_quotas(complexity, sizes, 12)
    assert q[1] == 0 and q[3] == 0 and q.sum() == 12
    p = softmax_probabilities(complexity, sizes, 0.1)
    assert p[1] == 0 and p[3] == 0 and p.sum() == pytest.approx(1.0)


def test_balance_ratio_raises_lower_bounds():
    sizes = np.array([100, 100, 100, 100])
    complexity = np.array([1.0, 0.0, 0.0, 0.0])
    q0 = dbp_quotas(complexity, sizes, 100, temperature=0.05)
    q1 = dbp_quotas(complexity, sizes, 100, temperature=0.05, balance_ratio=1.0)
    assert q0[1] < 25 and np.all(q1 == 25)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=1000), "must be in"),
    (dict(target=0), "must be in"),
    (dict(target=2, min_per_cluster=1), "lower bounds"),
    (dict(target=10, temperature=0.0), "temperature"),
    (dict(target=10, solver="cvx"), "solver"),
])
def test_infeasible_or_bad_requests_say_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dbp_quotas(np.array([0.1, 0.2, 0.3]), np.array([5, 5, 5]), **kwargs)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_property_constraints_hold_or_valueerror(data):
    k = data.draw(st.integers(1, 30))
    sizes = np.array(data.draw(st.lists(st.integers(0, 50), min_size=k, max_size=k)))
    complexity = np.array(data.draw(st.lists(st.floats(0, 2), min_size=k, max_size=k)))
    target = data.draw(st.integers(0, int(sizes.sum()) + 2))
    tau = data.draw(st.sampled_from([0.01, 0.1, 1.0]))
    ratio = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    try:
        q = dbp_quotas(complexity, sizes, target, temperature=tau, balance_ratio=ratio)
    except ValueError:
        lower, _ = quota_bounds(sizes, max(target, 1), 1, ratio)
        assert target < 1 or target > sizes.sum() or lower.sum() > target
        return
    lower, upper = quota_bounds(sizes, target, 1, ratio)
    assert q.sum() == target
    assert np.all(q >= lower) and np.all(q <= upper)
