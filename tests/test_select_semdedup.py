import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import unit_rows
from dbp_lightning.pruning import (clip_score_filter, dbp_select, duplicate_similarity,
                                   random_select, semdedup, ssp_select)


def test_dbp_select_keeps_least_prototypical_per_cluster(rng):
    n, k = 500, 7
    assignment = rng.integers(0, k, n)
    sim = rng.uniform(-1, 1, n).astype(np.float32)
    sizes = np.bincount(assignment, minlength=k)
    quotas = np.array([rng.integers(0, s + 1) for s in sizes])
    keep = dbp_select(sim, assignment, quotas)
    for j in range(k):
        members = np.flatnonzero(assignment == j)
        expected = members[np.argsort(sim[members])[: quotas[j]]]
        assert set(np.flatnonzero(keep & (assignment == j))) == set(expected)
    assert keep.sum() == quotas.sum()


def test_dbp_select_refuses_quota_above_size():
    with pytest.raises(ValueError, match="cluster 1"):
        dbp_select(np.zeros(3), np.array([0, 0, 1]), np.array([1, 2]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 12), st.floats(0, 1), st.integers(0, 2**31))
def test_ssp_select_exact_size_floor_per_cluster_hardest_rest(n, k, ratio, seed):
    rng = np.random.default_rng(seed)
    assignment = rng.integers(0, k, n)
    sim = rng.uniform(-1, 1, n)
    target = int(rng.integers(1, n + 1))
    keep = ssp_select(sim, assignment, target, balance_ratio=ratio, num_clusters=k)
    assert keep.sum() == target
    sizes = np.bincount(assignment, minlength=k)
    floor = np.minimum(sizes, int(np.floor(ratio * target / (sizes > 0).sum())))
    assert np.all(np.bincount(assignment[keep], minlength=k) >= floor)
    # inside a cluster, nothing kept is more prototypical than something dropped
    for j in range(k):
        kept, dropped = sim[keep & (assignment == j)], sim[~keep & (assignment == j)]
        if len(kept) and len(dropped):
            assert kept.max() <= dropped.min()


def test_random_select_exact_and_seeded():
    a, b, c = random_select(1000, 300, seed=1), random_select(1000, 300, seed=1), random_select(1000, 300, seed=2)
    assert a.sum() == 300 and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="target=1001"):
        random_select(1000, 1001)


def test_clip_score_filter_threshold_and_fraction():
    s = np.array([0.1, 0.5, 0.3, 0.3, 0.9])
    assert clip_score_filter(s, threshold=0.3).tolist() == [False, True, True, True, True]
    assert clip_score_filter(s, fraction=0.6).tolist() == [False, True, True, False, True]
    with pytest.raises(ValueError, match="NaN"):
        clip_score_filter(np.array([0.1, np.nan]), fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        clip_score_filter(s)


def brute_duplicate_similarity(x, assignment, sim):
    out = np.full(len(x), -1.0)
    for j in np.unique(assignment):
        members = np.flatnonzero(assignment == j)
        members = members[np.lexsort((sim[members],))]
        full = x[members] @ x[members].T
        for r in range(1, len(members)):
            out[members[r]] = full[r, :r].max()
    return out


@pytest.mark.parametrize("block", [3, 16, 4096])
def test_duplicate_similarity_matches_full_matrix(rng, block):
    x = unit_rows(rng, 300, 10)
    assignment = rng.integers(0, 4, 300)
    sim = rng.uniform(0, 1, 300).astype(np.float32)
    got = duplicate_similarity(x, assignment, sim, block_size=block)
    np.testing.assert_allclose(got, brute_duplicate_similarity(x, assignment, sim), atol=1e-5)


def planted(rng, n_base=400, d=64, copies=60):
    x = unit_rows(rng, n_base, d)  # random directions in 64-d: pairwise cosines ~ +-0.4
    src = rng.choice(n_base, copies, replace=False)
    dup = x[src] + 0.02 * rng.standard_normal((copies, d)).astype(np.float32)
    x = np.concatenate([x, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
    return x, src


def test_semdedup_removes_planted_duplicates_and_nothing_else(rng):
    x, src = planted(rng)
    assignment = np.zeros(len(x), int)          # one cluster: the hardest case for blocking
    sim = x @ (x.mean(0) / np.linalg.norm(x.mean(0)))
    keep = semdedup(x, assignment, sim, eps=0.05, block_size=32)
    pairs = np.stack([src, np.arange(400, 460)], 1)
    assert keep.sum() == 400                     # exactly one of each planted pair removed
    for a, b in pairs:
        assert keep[a] != keep[b]
        survivor = a if keep[a] else b
        assert sim[survivor] <= sim[a + b - survivor]  # the farthest from the centroid survives


def test_semdedup_target_fraction_within_half_a_point(rng):
    x = unit_rows(rng, 2000, 8)                  # 8-d: many close pairs, a smooth spectrum
    assignment = rng.integers(0, 5, 2000)
    sim = rng.uniform(0, 1, 2000)
    for f in (0.9, 0.63, 0.5, 0.2):
        keep = semdedup(x, assignment, sim, target_fraction=f, block_size=100)
        assert abs(keep.mean() - f) <= 0.005
    with pytest.raises(ValueError, match="exactly one"):
        semdedup(x, assignment, sim)


def test_several_partitions_match_definition_and_keep_a_member_of_every_group(rng):
    x = unit_rows(rng, 240, 6)                   # 6-d: plenty of close pairs
    a, b = rng.integers(0, 5, 240), rng.integers(0, 4, 240)
    key = rng.uniform(0, 1, 240)
    got = duplicate_similarity(x, [a, b], key, block_size=16)
    order = np.lexsort((key,))
    rank = np.empty(240, int); rank[order] = np.arange(240)
    full = x @ x.T
    expected = np.full(240, -1.0)
    for j in range(240):
        earlier = (rank < rank[j]) & ((a == a[j]) | (b == b[j]))
        if earlier.any():
            expected[j] = full[j, earlier].max()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # a near-duplicate pair split by partition a is found through partition b
    x2, src = planted(rng, n_base=100, copies=10)
    split = np.zeros(len(x2), int); split[100:] = 1   # every copy in another cell than its source
    sim = rng.uniform(0, 1, len(x2))
    assert (duplicate_similarity(x2, split, sim) <= 0.95).all()
    both = duplicate_similarity(x2, [split, np.zeros(len(x2), int)], sim)
    assert (both > 0.95).sum() == 10


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(1, 3), st.integers(1, 40), st.booleans(), st.integers(0, 2**31))
def test_partner_is_an_earlier_member_of_a_shared_cluster_giving_the_max(n, parts, block, copies, seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, n, 4)
    if copies:  # exact copies: tied maxima
        x[n // 2:] = x[: n - n // 2]
    partitions = [rng.integers(0, 1 + int(rng.integers(0, 6)), n) for _ in range(parts)]
    key = rng.uniform(0, 1, n)
    got, partner = duplicate_similarity(x, partitions if parts > 1 else partitions[0], key,
                                        block_size=block, return_partner=True)
    assert partner.dtype == np.int64 and partner.shape == (n,)
    rank = np.empty(n, int)
    rank[np.lexsort((key,))] = np.arange(n)
    full = x @ x.T
    for j in range(n):
        earlier = (rank < rank[j]) & np.any([a == a[j] for a in partitions], axis=0)
        if not earlier.any():
            assert partner[j] == -1 and got[j] == -1.0
            continue
        p = partner[j]
        assert p >= 0 and earlier[p]                        # ranked before j, a shared cluster
        assert abs(full[j, p] - full[j, earlier].max()) < 1e-5  # it achieves the maximum
        assert abs(got[j] - full[j, p]) < 1e-5
    # the default return value is unchanged
    np.testing.assert_array_equal(duplicate_similarity(x, partitions[0], key, block_size=block),
                                  duplicate_similarity(x, partitions[0], key, block_size=block,
                                                       return_partner=True)[0])


@pytest.mark.parametrize("block", [4096, 600, 300, 100])
def test_banded_cells_give_the_partners_of_whole_blocks(rng, block, monkeypatch):
    """Cells of ~700 rows held in memory are compared band by band over the lower triangle
    (bands of BAND_ROWS rows, several inside one column block when block > BAND_ROWS): the
    same similarities and partners as whole square blocks, exact copies (tied maxima) included."""
    module = importlib.import_module("dbp_lightning.pruning.semdedup")  # not the function

    x = unit_rows(rng, 1400, 8)
    x[1000:] = x[:400]                                  # exact copies: ties the earliest must win
    assignment = rng.permutation(np.repeat([0, 1], 700))
    key = rng.uniform(0, 1, 1400)
    banded = duplicate_similarity(x, assignment, key, block_size=block, return_partner=True)
    monkeypatch.setattr(module, "BAND_ROWS", 1 << 30)  # one band per block: square blocks
    square = duplicate_similarity(x, assignment, key, block_size=block, return_partner=True)
    np.testing.assert_array_equal(banded[0], square[0])
    np.testing.assert_array_equal(banded[1], square[1])
    np.testing.assert_allclose(banded[0], brute_duplicate_similarity(x, assignment, key), atol=1e-5)
    rank = np.empty(1400, int)
    rank[np.lexsort((key,))] = np.arange(1400)
    # a copy ranked after its original in the same cell has it (or an earlier twin) as partner
    copied = np.flatnonzero((rank[1000:] > rank[:400]) & (assignment[1000:] == assignment[:400]))
    assert copied.size > 50
    assert (banded[0][1000 + copied] >= np.float32(1 - 1e-6)).all()
