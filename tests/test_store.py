import json
import os

import numpy as np
import pyarrow as pa
import pytest

from conftest import unit_rows
from dbp_lightning.store import EmbeddingStore, write_store


def make_store(tmp_path, rng, n=250, d=8, shard_rows=60, dtype="float32"):
    x = unit_rows(rng, n, d)
    table = pa.table({"key": [f"k{i}" for i in range(n)], "score": np.arange(n, dtype=np.float32)})
    return x, write_store(tmp_path / "store", x, table, shard_rows=shard_rows, dtype=dtype)


def test_store_round_trip_and_sharded_indexing(tmp_path, rng):
    x, store = make_store(tmp_path, rng)
    assert len(store) == 250 and len(store.manifest["shards"]) == 5
    arr = store.embeddings
    np.testing.assert_array_equal(arr[:], x)
    np.testing.assert_array_equal(arr[55:130], x[55:130])
    idx = rng.integers(0, 250, 40)
    np.testing.assert_array_equal(arr[idx], x[idx])
    assert store.metadata(["key"]).column("key").to_pylist() == [f"k{i}" for i in range(250)]


def test_float16_store(tmp_path, rng):
    x, store = make_store(tmp_path, rng, dtype="float16")
    assert store.embeddings.dtype == np.float16
    np.testing.assert_allclose(store.embeddings[:].astype(np.float32), x, atol=1e-3)


def test_store_errors_name_the_file(tmp_path, rng):
    _, store = make_store(tmp_path, rng)
    with pytest.raises(ValueError, match="no manifest"):
        EmbeddingStore(tmp_path)
    (store.path / "00002.npy").unlink()
    with pytest.raises(ValueError, match="00002"):
        EmbeddingStore(store.path)


def test_store_manifest_mismatch(tmp_path, rng):
    _, store = make_store(tmp_path, rng)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 61
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"00001.npy: shape \(60, 8\)"):
        EmbeddingStore(store.path)


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_reads_drop_their_pages_so_a_pass_stays_out_of_core(tmp_path, monkeypatch):
    """A pass over a memory-mapped store must not keep the store resident in this process."""
    from dbp_lightning.store import ShardedArray

    x = np.random.default_rng(0).standard_normal((64 * 1024, 512)).astype(np.float16)  # 64 MiB
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", x[:1000])
    arr = ShardedArray([np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")])
    monkeypatch.setattr(ShardedArray, "RELEASE_BYTES", 4 << 20)
    before = _rss_file_kb()
    for start in range(0, len(arr), 4096):
        np.testing.assert_array_equal(arr[start : start + 4096][:5], np.concatenate([x, x[:1000]])[start : start + 5])
    rows = np.random.default_rng(1).permutation(len(arr))[:20000]
    np.testing.assert_array_equal(arr[rows], np.concatenate([x, x[:1000]])[rows])
    grown_mib = (_rss_file_kb() - before) / 1024
    assert grown_mib < 24, f"{grown_mib:.0f} MiB of the 64 MiB store stayed mapped in"


def test_masks_index_the_store_as_numpy_does_and_other_indices_raise(tmp_path, rng):
    """The README's API snippet, on a store, selects what it selects on the array."""
    from dbp_lightning.pruning import semdedup, spherical_kmeans

    x, store = make_store(tmp_path, rng, n=250, d=8, shard_rows=60)
    rows = store.embeddings
    dedup = spherical_kmeans(rows, k=5, niter=5, gpu=False)
    keep = semdedup(rows, dedup.assignment, dedup.similarity, target_fraction=0.8)
    assert 0 < keep.sum() < len(keep)
    np.testing.assert_array_equal(rows[keep], x[keep])
    for bad in (keep[:-1], np.array([0.0, 2.0]), np.zeros((2, 2), int)):
        with pytest.raises(IndexError):
            rows[bad]
