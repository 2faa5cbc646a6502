import json

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
