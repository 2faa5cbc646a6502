"""Exact similarities and nearest neighbours (pruning/exact.py) against exact rational
arithmetic, and the whole prune against estimates from "another kernel": every fast estimate
moved by random amounts within its proven error bound must change no byte of the result."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning import exact, kmeans
from dbp_lightning.pruning.exact import dot_bound, exact_argmax, max_norm, pair_sims, row_sims
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.synthetic import PoolSpec, make_pool


def exact_dot(a, b) -> Fraction:
    return sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b)), Fraction(0))


def rounded(value: Fraction) -> np.float32:
    """The definition: exact value -> nearest float64 -> nearest float32."""
    return np.float32(float(value))  # float(Fraction) rounds correctly


unit32 = st.integers(1, 40).flatmap(lambda d: st.lists(
    st.lists(st.floats(-1, 1, width=32), min_size=d, max_size=d), min_size=2, max_size=6))


@settings(max_examples=80, deadline=None)
@given(unit32)
def test_row_and_pair_sims_are_the_exactly_rounded_dot_products(rows):
    x = np.array(rows, np.float32)
    x = x[np.abs(x).sum(1) > 0]
    a, b = x, x[::-1].copy()
    got = row_sims(a, b)
    assert got.dtype == np.float32
    assert got.tolist() == [rounded(exact_dot(p, q)) for p, q in zip(a, b)]
    pairs = pair_sims(a, b)
    assert pairs.tolist() == [[rounded(exact_dot(p, q)) for q in b] for p in a]


def test_values_on_and_next_to_a_float32_rounding_boundary():
    """0.75 + 2^-25 lies halfway between two float32 (ties to even: 0.75); a term of 2^-40 more
    or less decides the rounding, and the float64 estimate's own error is about that size."""
    x = np.float32(0.75)  # in [0.5, 1): float32 spacing 2^-24
    got = {}
    for name, extra in {"tie": 0.0, "above": 2.0**-20, "below": -(2.0**-20)}.items():
        a = np.array([1.0, 2.0**-12, 2.0**-20], np.float32)
        b = np.array([x, 2.0**-13, extra], np.float32)
        got[name] = row_sims(a[None], b[None])[0]
        assert got[name] == rounded(exact_dot(a, b)) == pair_sims(a[None], b[None])[0, 0], name
    assert got == {"tie": x, "above": np.nextafter(x, np.float32(1)), "below": x}


def brute_argmax(q, keys, before=None):
    best, arg = None, -1
    for j, key in enumerate(keys):
        if before is not None and j >= before:
            break
        v = exact_dot(q, key)
        if best is None or v > best:
            best, arg = v, j
    return arg


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 30), st.integers(1, 16))
def test_exact_argmax_with_identical_and_last_bit_keys(seed, n, d):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float32)
    keys[rng.integers(0, n, n // 2)] = keys[0]  # identical keys: lowest index wins
    bumped = rng.integers(0, n, 3)  # one ulp away: the exact order decides
    keys[bumped, 0] = np.nextafter(keys[bumped, 0], np.float32(np.inf))
    q = keys[rng.integers(0, n, 5)] + np.float32(0)
    before = rng.integers(0, n + 1, len(q))
    got = exact_argmax(q, keys, before=before, block_size=7)
    assert got.tolist() == [brute_argmax(qi, keys, b) for qi, b in zip(q, before)]
    assert exact_argmax(q, keys).tolist() == [brute_argmax(qi, keys) for qi in q]


def test_error_bound_holds_for_float32_sums_in_many_orders(rng):
    x = rng.standard_normal((200, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bound = dot_bound(64, max_norm(x), max_norm(x), np.float32)
    truth = x.astype(np.float64) @ x.T.astype(np.float64)
    for order in (np.arange(64), np.arange(64)[::-1], rng.permutation(64)):
        sequential = np.zeros((200, 200), np.float32)
        for i in order:
            sequential += np.outer(x[:, i], x[:, i])
        assert np.abs(sequential - truth).max() <= bound
    assert np.abs(x @ x.T - truth).max() <= bound


# --- the whole prune, with every estimate from "another kernel" -----------------------------


class OtherKernel:
    """Replace every fast estimate with the exact value moved by noise of up to 90 % of the
    bound the code assumes, so the estimates are as far off as a kernel may be."""

    def __init__(self, monkeypatch, seed):
        self.rng = np.random.default_rng(seed)
        monkeypatch.setattr(exact, "gemm32", self.gemm32)
        monkeypatch.setattr(exact, "gemm64", self.gemm64)
        monkeypatch.setattr(exact, "rowdot64", self.rowdot64)
        monkeypatch.setattr(kmeans, "search_top2", self.search_top2)

    def _noisy(self, truth, a, b, dtype):
        bound = dot_bound(a.shape[1], max_norm(a), max_norm(b), dtype)
        return (truth + self.rng.uniform(-0.9, 0.9, truth.shape) * bound).astype(dtype)

    def _matrix(self, a, b, dtype):
        truth = a.astype(np.longdouble) @ b.astype(np.longdouble).T  # 64-bit mantissa
        return self._noisy(truth, a, b, dtype)

    def gemm32(self, a, b):
        return self._matrix(a, b, np.float32)

    def gemm64(self, a, b):
        return self._matrix(a, b, np.float64)

    def rowdot64(self, a, b):
        truth = (a.astype(np.longdouble) * b.astype(np.longdouble)).sum(axis=1)
        return self._noisy(truth, a, b, np.float64)

    def search_top2(self, index, block):
        centroids = np.asarray(index.centroids, np.float32)  # BlasTop2 or TorchTop2 on CPU
        sims = self.gemm32(block, centroids)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :2]
        return np.take_along_axis(sims, top, axis=1), top


@pytest.fixture(scope="module")
def tricky_pool():
    """Near-duplicates, exact copies, and copies one ulp apart: the ties that a kernel's last
    bits would decide."""
    x, _, _ = make_pool(PoolSpec(n=2500, dim=24, n_concepts=25, seed=11))
    rng = np.random.default_rng(1)
    x[rng.integers(0, 2500, 200)] = x[rng.integers(0, 2500, 200)]
    bumped = rng.integers(0, 2500, 200)
    x[bumped, 0] = np.nextafter(x[bumped, 0], np.float32(2))
    return x


CONFIGS = {
    "semdedup-dbp": dict(stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=20, target_fraction=0.8, block_size=64),
                         select=SelectConfig(target_fraction=0.5, k=25, num_neighbors=5)),
    "semdedup-ssp": dict(stages=["semdedup", "ssp"],
                         semdedup=SemDeDupConfig(k=20, eps=0.05, target_fraction=None, passes=1),
                         select=SelectConfig(target_size=900, k=25, balance_ratio=1.0)),
}


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60, reason="needs 80-bit long double")
@pytest.mark.parametrize("name", CONFIGS)
def test_prune_is_the_same_whatever_the_kernel(tricky_pool, name, monkeypatch):
    config = PruneConfig(input="in-memory", gpu="false", seed=3, **CONFIGS[name])
    reference = prune(tricky_pool, config)
    for seed in (0, 1):
        with monkeypatch.context() as patch:
            OtherKernel(patch, seed)
            other = prune(tricky_pool, config)
        assert other.selection.equals(reference.selection)
        assert other.clusters.equals(reference.clusters)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.sampled_from([np.float16, np.float32, np.float64]),
       st.floats(1e-3, 1e3), st.booleans())
def test_the_validation_norm_bound_holds_for_every_row_read(seed, d, dtype, scale, unit):
    """Embeddings.norm_bound, which the exact layer's error bounds use instead of reading the
    rows again, is at least every float32 row's norm (summed exactly), normalised on read or not."""
    import warnings

    from dbp_lightning.pruning.embeddings import Embeddings

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, d)) * rng.uniform(0.5, 2.0, (50, 1))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True) if unit else x * scale).astype(dtype)
    x[~(x != 0).any(axis=1), 0] = 1  # no all-zero rows (refused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        emb = Embeddings(x, block_size=16)
    rows = emb.rows(0, 50).astype(np.float64)
    norms = [math.sqrt(math.fsum(r * r)) for r in rows]  # squares of float32 are exact in float64
    assert max(norms) <= emb.norm_bound
    assert emb.norm_bound <= max(norms) * (1 + 1e-4)  # and tight: error bounds stay small
