"""KeptSamples: the stream's per-shard keep test agrees with the selection, shard by shard."""

import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from dbp_lightning.cache import ensure_pruned
from dbp_lightning.config import PruneConfig, SelectConfig
from dbp_lightning.data.keep import KeptSamples
from dbp_lightning.synthetic import PoolSpec, write_pool_store

RANDOM = PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.3))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        store = root / name
        write_pool_store(store, PoolSpec(n=5000, dim=8, n_concepts=10, block=1200, seed=seed))
        out[name] = (store, ensure_pruned(root / "cache", store, RANDOM, progress=False))
    return out


def test_kept_samples_match_the_selection_shard_by_shard(stores):
    store, run = stores["a"]
    kept = KeptSamples(store, run)
    kept = pickle.loads(pickle.dumps(kept))  # as a dataloader worker receives it
    selection = pq.read_table(run / "selection.parquet")
    assert "uid" in selection.column_names  # the identity a stream sees, as in an embedded store
    expected = set(np.asarray(selection.column("uid").to_pylist())[selection.column("kept").to_numpy()])
    seen = set()
    for shard in sorted(store.glob("*.parquet")):
        for key in pq.read_table(shard).column("uid").to_pylist():
            if kept({"__url__": f"/data/{shard.stem}.tar", "__id__": key}):
                seen.add(key)
    assert seen == expected and sum(kept.per_shard().values()) == len(expected) == 1500
    with pytest.raises(KeyError, match="not in the embedding store"):
        kept({"__url__": "/data/other.tar", "__id__": "0"})


def test_a_run_of_another_store_is_refused(stores):
    with pytest.raises(ValueError, match="was not made from the store"):
        KeptSamples(stores["a"][0], stores["b"][1])
