import numpy as np
import pytest

from conftest import unit_rows
from dbp_lightning.pruning import assign, cluster_complexity, spherical_kmeans


def test_kmeans_assignment_is_the_argmax_and_centroids_unit(rng):
    x = unit_rows(rng, 3000, 24)
    res = spherical_kmeans(x, 20, niter=15, seed=3)
    assert res.centroids.shape == (20, 24) and res.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    sims = x @ res.centroids.T
    assert np.array_equal(res.assignment, sims.argmax(axis=1))
    np.testing.assert_allclose(res.similarity, sims.max(axis=1), atol=1e-5)
    assert res.assignment.dtype == np.int64 and res.n_iter == 15


def test_kmeans_same_seed_same_output_and_sampled_float16(rng):
    x = unit_rows(rng, 4000, 16).astype(np.float16)
    a = spherical_kmeans(x, 10, niter=10, seed=5, sample=1000)
    b = spherical_kmeans(x, 10, niter=10, seed=5, sample=1000)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.assignment, b.assignment)
    c = spherical_kmeans(x, 10, niter=10, seed=6, sample=1000)
    assert not np.array_equal(a.centroids, c.centroids)


def test_kmeans_tol_stops_early_on_clustered_data(rng):
    centers = unit_rows(rng, 8, 32)
    x = centers[rng.integers(0, 8, 4000)] + 0.05 * rng.standard_normal((4000, 32)).astype(np.float32)
    res = spherical_kmeans(x / np.linalg.norm(x, axis=1, keepdims=True), 8, niter=100, tol=1e-6)
    assert res.n_iter < 100


def test_kmeans_refuses_bad_k_and_streams_assignment(rng):
    x = unit_rows(rng, 50, 8)
    with pytest.raises(ValueError, match="k=51"):
        spherical_kmeans(x, 51)
    centroids = unit_rows(rng, 4, 8)
    a, s = assign(x, centroids, block_size=7)
    assert np.array_equal(a, (x @ centroids.T).argmax(1))


def brute_complexity(x, centroids, assignment, l):
    k = len(centroids)
    d_intra = np.array([np.mean(1 - x[assignment == j] @ centroids[j]) if (assignment == j).any() else 0.0
                        for j in range(k)])
    d_inter = np.empty(k)
    for j in range(k):
        others = [1 - centroids[j] @ centroids[i] for i in range(k) if i != j]
        d_inter[j] = np.mean(sorted(others)[:l])
    return d_intra, d_inter


@pytest.mark.parametrize("l", [1, 3, 9])
def test_complexity_matches_definition(rng, l):
    x = unit_rows(rng, 600, 12).astype(np.float64)
    centroids = unit_rows(rng, 10, 12).astype(np.float64)
    assignment = (x @ centroids.T).argmax(1)
    assignment[assignment == 4] = 5  # cluster 4 is empty
    cc = cluster_complexity(x, centroids, assignment, num_neighbors=l)
    d_intra, d_inter = brute_complexity(x, centroids, assignment, l)
    np.testing.assert_allclose(cc.d_intra, d_intra, atol=1e-5)
    np.testing.assert_allclose(cc.d_inter, d_inter, atol=1e-5)
    assert cc.sizes[4] == 0 and cc.d_intra[4] == 0.0 and np.isfinite(cc.complexity).all()
    np.testing.assert_allclose(cc.complexity, d_intra * d_inter, atol=1e-5)
    given = cluster_complexity(x, centroids, assignment, l,
                               similarity=np.einsum("ij,ij->i", x, centroids[assignment]))
    np.testing.assert_allclose(given.d_intra, cc.d_intra, atol=1e-6)


def test_complexity_refuses_too_many_neighbours(rng):
    with pytest.raises(ValueError, match="num_neighbors=20"):
        cluster_complexity(unit_rows(rng, 30, 4), unit_rows(rng, 10, 4), np.zeros(30, int))


def test_partition_kmeans_two_levels(rng, monkeypatch):
    """Above FLAT_MAX_K the partition is coarse cells split into fine ones: every row sits in a
    fine cell of its own coarse cell, at the nearest fine centroid there, and the cell count is
    about k; the same seed gives the same partition; at most FLAT_MAX_K it is plain k-means."""
    from dbp_lightning.pruning import kmeans as km

    x = unit_rows(rng, 3000, 16)
    flat = km.partition_kmeans(x, 9, niter=5, seed=3)
    plain = spherical_kmeans(x, 9, niter=5, seed=3)
    np.testing.assert_array_equal(flat.assignment, plain.assignment)

    monkeypatch.setattr(km, "FLAT_MAX_K", 4)
    k = 30
    part = km.partition_kmeans(x, k, niter=5, seed=3)
    coarse = spherical_kmeans(x, 6, niter=5, seed=3)  # ceil(sqrt(30)) coarse cells, same seed
    n_cells = len(part.centroids)
    assert abs(n_cells - k) <= 6 and set(np.unique(part.assignment)) <= set(range(n_cells))
    np.testing.assert_allclose(np.linalg.norm(part.centroids, axis=1), 1.0, atol=1e-5)
    sims = x @ part.centroids.T
    np.testing.assert_allclose(part.similarity, sims[np.arange(len(x)), part.assignment], atol=1e-5)
    for c in range(6):
        rows = np.flatnonzero(coarse.assignment == c)
        cells = np.unique(part.assignment[rows])
        assert not np.isin(part.assignment[coarse.assignment != c], cells).any()  # cells nest
        best = cells[np.argmax(sims[np.ix_(rows, cells)], axis=1)]
        np.testing.assert_array_equal(part.assignment[rows], best)
    again = km.partition_kmeans(x, k, niter=5, seed=3)
    np.testing.assert_array_equal(again.assignment, part.assignment)
