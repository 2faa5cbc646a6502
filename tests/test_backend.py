"""The PyTorch path of the matmul-bound kernels against faiss's, on CPU (the CUDA run is
``benchmarks/gpu_check.sh``): the exact layer makes both give the same bytes."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import unit_rows
from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning import backend as backend_module
from dbp_lightning.pruning import kmeans as kmeans_module
from dbp_lightning.pruning.backend import (Backend, BlasTop2, TorchTop2, resolve_backend,
                                           torch_earlier_top2)
from dbp_lightning.pruning.kmeans import partition_kmeans, spherical_kmeans
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.pruning.semdedup import _earlier_top2, duplicate_similarity, semdedup

FAISS, TORCH = Backend("faiss", "cpu"), Backend("torch", "cpu")
# the comparisons need both; the GPU machine of benchmarks/gpu_check.sh has torch and no faiss
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss is not installed: nothing to compare torch with")


def planted(rng, n=3000, d=32, concepts=30, dup=0.2):
    """Clustered unit rows, a share of them near-copies of others (noise 1e-3)."""
    centres = unit_rows(rng, concepts, d)
    x = centres[rng.integers(0, concepts, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    copies = rng.choice(n, int(dup * n), replace=False)
    x[copies] = x[rng.integers(0, n, len(copies))] + 1e-3 * rng.standard_normal((len(copies), d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("faiss_gpus, cuda, backend, gpu, rank, expected", [
    (0, False, "auto", "auto", 0, FAISS),
    (0, False, "torch", "auto", 0, TORCH),
    (0, True, "auto", "auto", 1, Backend("torch", "cuda:1")),    # CUDA torch, faiss-cpu only
    (0, True, "auto", False, 0, FAISS),
    (0, True, "faiss", "auto", 0, FAISS),
    (2, True, "auto", "auto", 3, Backend("faiss", "cuda:1")),    # faiss-gpu first
    (2, True, "torch", "auto", 0, Backend("torch", "cuda:0")),
    (None, False, "auto", "auto", 0, TORCH),                     # no faiss installed at all
])
def test_backend_choice(monkeypatch, faiss_gpus, cuda, backend, gpu, rank, expected):
    monkeypatch.setattr(backend_module, "_faiss_gpus", lambda: faiss_gpus)
    monkeypatch.setattr(backend_module, "_torch_cuda", lambda: cuda)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert resolve_backend(backend, gpu, rank) == expected


def test_backend_refusals_name_the_option(monkeypatch):
    monkeypatch.setattr(backend_module, "_faiss_gpus", lambda: None)
    monkeypatch.setattr(backend_module, "_torch_cuda", lambda: False)
    with pytest.raises(ValueError, match="backend=faiss: faiss is not installed"):
        resolve_backend("faiss")
    with pytest.raises(ValueError, match="backend must be one of auto, faiss, torch"):
        resolve_backend("cupy")
    with pytest.raises(ValueError, match="gpu=true but torch sees no CUDA device"):
        resolve_backend("torch", True)
    monkeypatch.setattr(backend_module, "_faiss_gpus", lambda: 0)
    with pytest.raises(ValueError, match="gpu=true but neither faiss nor torch sees a GPU"):
        resolve_backend("auto", True)


@needs_faiss
def test_torch_top2_is_faiss_search(rng):
    import faiss

    x, c = unit_rows(rng, 2000, 48), unit_rows(rng, 300, 48)
    index = faiss.IndexFlatIP(48)
    index.add(c)
    fs, fi = index.search(x, 2)
    top = TorchTop2(c, "cpu")
    top.rows = 333  # several sub-blocks
    ts, ti = top.search(x, 2)
    np.testing.assert_allclose(ts, fs, atol=2e-6)
    clear = fs[:, 0] - fs[:, 1] > 1e-5  # near-ties may swap: the exact layer decides them
    assert clear.mean() > 0.95 and (ti[clear, 0] == fi[clear, 0]).all()


def test_blas_top2_is_the_brute_force_top_two(rng):
    """The faiss backend's CPU estimate: the two largest float32 products per row, largest
    first, across sub-blocks; a row's equal products are both reported (the tie is the exact
    layer's to decide)."""
    x, c = unit_rows(rng, 2000, 48), unit_rows(rng, 300, 48)
    c[7] = c[3]  # a tie in every row
    top = BlasTop2(c)
    top.rows = 333  # several sub-blocks
    sims, ids = top.search(x, 2)
    truth = x.astype(np.float64) @ c.astype(np.float64).T
    expected = np.sort(truth, axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(truth, ids, axis=1), expected, atol=1e-5)
    assert (ids[:, 0] != ids[:, 1]).all()
    tied = np.isin(ids[:, 0], [3, 7])
    assert tied.any() and (np.sort(ids[tied], axis=1) == [3, 7]).all()
    with pytest.raises(ValueError, match="top 2 of at least 2 centroids"):
        BlasTop2(c[:1]).search(x, 2)


@needs_faiss
def test_kmeans_same_bytes_on_either_backend_and_deterministic(rng):
    x = planted(rng)
    runs = [spherical_kmeans(x, 40, niter=15, seed=3, backend=b) for b in (FAISS, TORCH, TORCH)]
    for other in runs[1:]:
        assert other.n_iter == runs[0].n_iter
        for a, b in zip(runs[0][:3], other[:3]):
            assert a.tobytes() == b.tobytes()
    objective = runs[0].similarity.mean(dtype=np.float64)
    assert objective > 0.4  # a real clustering (rows lie ~0.5 from their concept), not a degenerate one


@needs_faiss
def test_two_level_partition_same_on_either_backend(rng, monkeypatch):
    monkeypatch.setattr(kmeans_module, "FLAT_MAX_K", 16)
    x = planted(rng, n=2500)
    a, b = (partition_kmeans(x, 60, niter=5, seed=1, backend=be) for be in (FAISS, TORCH))
    assert a.assignment.max() > 40  # two levels ran
    assert a.assignment.tobytes() == b.assignment.tobytes()
    assert a.similarity.tobytes() == b.similarity.tobytes()


@needs_faiss
@pytest.mark.parametrize("block_size", [7, 4096])
def test_semdedup_estimates_and_removals_agree(rng, block_size):
    x = planted(rng, n=1500)
    km = spherical_kmeans(x, 20, niter=10, seed=0, backend=FAISS)
    members = np.flatnonzero(km.assignment == np.bincount(km.assignment).argmax())
    xc = x[members[np.argsort(km.similarity[members], kind="stable")]]
    not_before = np.triu(np.ones((block_size, block_size), bool))
    nb, ns, na = _earlier_top2(xc, block_size, not_before)
    tb, ts, ta = torch_earlier_top2(xc, block_size, "cpu")
    np.testing.assert_allclose(tb, nb, atol=2e-6)
    np.testing.assert_allclose(ts, ns, atol=2e-6)
    clear = nb - ns > 1e-5
    assert (ta[clear] == na[clear]).all() and ta[0] == na[0] == -1
    sims = {b.kind: duplicate_similarity(x, km.assignment, km.similarity, block_size,
                                         return_partner=True, backend=b) for b in (FAISS, TORCH)}
    assert sims["faiss"][0].tobytes() == sims["torch"][0].tobytes()
    assert (sims["faiss"][1] == sims["torch"][1]).all()
    keep = {b.kind: semdedup(x, km.assignment, km.similarity, eps=0.01, block_size=block_size,
                             backend=b) for b in (FAISS, TORCH)}
    assert (keep["faiss"] == keep["torch"]).all() and 150 < (~keep["torch"]).sum() < 400  # ~300 copies


@needs_faiss
def test_prune_writes_the_same_selection_on_torch_and_says_where_it_ran(rng):
    x = planted(rng, n=2000)
    config = PruneConfig(stages=["semdedup", "dbp"], semdedup=SemDeDupConfig(k=20),
                         select=SelectConfig(target_fraction=0.5, k=25, num_neighbors=5))
    results = {b: prune(x, PruneConfig(**{**config.__dict__, "backend": b})) for b in ("faiss", "torch")}
    assert results["faiss"].selection.equals(results["torch"].selection)
    assert results["torch"].report["backend"] == {"kind": "torch", "device": "cpu"}
    assert results["faiss"].report["backend"] == {"kind": "faiss", "device": "cpu"}
