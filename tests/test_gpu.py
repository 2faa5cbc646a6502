"""GPU paths, run where CUDA is present (``benchmarks/gpu_check.sh`` on a lent device); skipped
elsewhere. Their CPU twins are tests/test_backend.py (torch on CPU against faiss)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import unit_rows
from dbp_lightning.pruning.backend import Backend
from dbp_lightning.pruning.kmeans import spherical_kmeans
from dbp_lightning.pruning.semdedup import duplicate_similarity

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CPU, CUDA = Backend("torch", "cpu"), Backend("torch", "cuda:0")


def test_kmeans_on_cuda_is_the_cpu_bytes(rng):
    x = unit_rows(rng, 20000, 64)
    a, b = (spherical_kmeans(x, 100, niter=10, seed=0, backend=be) for be in (CPU, CUDA))
    assert a.assignment.tobytes() == b.assignment.tobytes()
    assert a.centroids.tobytes() == b.centroids.tobytes()
    assert a.similarity.tobytes() == b.similarity.tobytes()


def test_semdedup_on_cuda_is_the_cpu_bytes(rng):
    x = unit_rows(rng, 6000, 64)
    x[3000:] = x[:3000] + 1e-3 * rng.standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    km = spherical_kmeans(x, 20, niter=5, seed=0, backend=CPU)
    a, b = (duplicate_similarity(x, km.assignment, km.similarity, 1024, return_partner=True, backend=be)
            for be in (CPU, CUDA))
    assert a[0].tobytes() == b[0].tobytes() and (a[1] == b[1]).all()
    assert (a[0] > 0.99).sum() >= 2900  # the planted copies are found


def test_bf16_embedding_is_within_tolerance_of_fp32(rng):
    from dbp_lightning.config import EncoderConfig
    from dbp_lightning.encoders import build_encoder

    encoder = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True,
                                          modality="image")).cuda().eval()
    images = torch.from_numpy(rng.standard_normal((64, 3, 64, 64)).astype(np.float32)).cuda()
    with torch.inference_mode():
        fp32 = encoder.embed_images(images).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = encoder.embed_images(images).float()
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert cosine.min().item() > 0.99, cosine.min().item()


def test_fit_under_ddp_nccl_with_the_datamodule(tmp_path):
    from wds_util import write_shards

    write_shards(tmp_path / "pool", n_shards=4, per_shard=64)
    argv = [sys.executable, "-m", "dbp_lightning.cli", "fit", "--config",
            str(Path(__file__).parents[1] / "configs/fit/tiny_cpu.yaml"),
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.strategy", "ddp",
            "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "6",
            "--trainer.default_root_dir", str(tmp_path / "fit"), "--data.shards", str(tmp_path / "pool"),
            "--data.cache_dir", str(tmp_path / "cache"), "--data.encoder.kind", "open_clip",
            "--data.encoder.model", "tiny-clip", "--data.encoder.random_init", "true"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DBPDataModule: kept" in done.stdout + done.stderr
    assert list((tmp_path / "fit").rglob("last.ckpt"))
