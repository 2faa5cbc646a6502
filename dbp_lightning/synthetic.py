"""Synthetic embedding pools with known structure, for tests, benchmarks and the quick start.

A pool has concepts of skewed sizes and different spreads (dense and diffuse clusters, which
is what DBP's complexity measures) and planted near-duplicate groups (what SemDeDup must find).
Rows are generated block by block, so a pool of 10^7 rows never needs N x d memory at once.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from .store import EmbeddingStore, StoreWriter


class PoolSpec(NamedTuple):
    """What :func:`pool_block` generates. Defaults give within-concept cosines of ~0.3-0.7 and
    near-duplicate cosines above 0.97, so eps = 0.03-0.1 separates them."""

    n: int
    dim: int = 256
    n_concepts: int = 1000
    dup_fraction: float = 0.1  # rows overwritten by a copy of another row of the same block
    dup_noise: float = 0.1     # copy = row + dup_noise * unit-variance noise, renormalised
    spread: tuple[float, float] = (0.6, 1.4)  # per-concept noise scale (cos ~ 1 / (1 + s^2))
    zipf: float = 1.1          # concept sizes ~ rank^-zipf
    block: int = 65536
    seed: int = 0


def _concepts(spec: PoolSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([spec.seed, 0])
    centers = rng.standard_normal((spec.n_concepts, spec.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, spec.n_concepts + 1) ** spec.zipf
    rng.shuffle(weights)
    spread = rng.uniform(*spec.spread, spec.n_concepts).astype(np.float32)
    return centers, weights / weights.sum(), spread


def pool_block(spec: PoolSpec, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block ``b`` of the pool: float32 (rows, dim) unit rows, int64 concept, int64 dup group.

    ``dup_group`` is the global row index of the group's original for every member of a planted
    near-duplicate group (original and copies), else -1.
    """
    centers, weights, spread = _concepts(spec)
    start = b * spec.block
    rows = min(spec.block, spec.n - start)
    rng = np.random.default_rng([spec.seed, 1, b])
    concept = rng.choice(spec.n_concepts, rows, p=weights)
    noise = rng.standard_normal((rows, spec.dim)).astype(np.float32) / np.sqrt(spec.dim)
    x = centers[concept] + spread[concept, None] * noise
    group = np.full(rows, -1, np.int64)
    n_dup = int(spec.dup_fraction * rows)
    if n_dup and rows > 2 * n_dup:
        positions = rng.permutation(rows)
        copies, sources = positions[:n_dup], rng.choice(positions[n_dup:], n_dup)
        jitter = rng.standard_normal((n_dup, spec.dim)).astype(np.float32) / np.sqrt(spec.dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x[copies] = x[sources] + spec.dup_noise * jitter
        concept[copies] = concept[sources]
        group[copies] = group[sources] = start + sources
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, concept.astype(np.int64), group


def make_pool(spec: PoolSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole pool in memory: x float32 (n, dim), concept int64 (n,), dup_group int64 (n,)."""
    parts = [pool_block(spec, b) for b in range(-(-spec.n // spec.block))]
    return tuple(np.concatenate(p) for p in zip(*parts))


def sample_table(start: int, concept: np.ndarray, group: np.ndarray, seed: int) -> pa.Table:
    """Per-sample metadata: key, DataComp-style 32-hex uid, a synthetic CLIP score, truth."""
    keys = [f"{i:09d}" for i in range(start, start + len(concept))]
    uids = [hashlib.md5(k.encode()).hexdigest() for k in keys]
    rng = np.random.default_rng([seed, 2, start])
    score = np.clip(rng.normal(0.3, 0.05, len(concept)), -1, 1).astype(np.float32)
    return pa.table({"key": keys, "uid": uids, "clip_score": score,
                     "concept": concept, "dup_group": group})


def write_pool_store(path: str | os.PathLike, spec: PoolSpec, dtype: str = "float32",
                     progress: bool = False) -> EmbeddingStore:
    """Write the pool as an embedding store, one shard per block (memory: one block)."""
    from tqdm.auto import tqdm

    writer = StoreWriter(path, spec.dim, dtype, source={"synthetic": spec._asdict()})
    for b in tqdm(range(-(-spec.n // spec.block)), disable=not progress, desc="write pool"):
        x, concept, group = pool_block(spec, b)
        writer.add_shard(f"{b:05d}", x, sample_table(b * spec.block, concept, group, spec.seed))
    return writer.close()
