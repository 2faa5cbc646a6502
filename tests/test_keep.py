"""The stream's keep tests: KeptSamples agrees with the selection shard by shard; KeptIdentities
keeps a run's or a DataComp subset's identities by DataComp's own lookup rule."""

import hashlib
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbp_lightning.atomic import write_npy
from dbp_lightning.cache import ensure_pruned
from dbp_lightning.config import PruneConfig, SelectConfig
from dbp_lightning.data.keep import (U128, KeptIdentities, KeptSamples, hex_to_u128, kept_of_run,
                                     kept_of_subset)
from dbp_lightning.rundir import datacomp_subset
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


# ------------------------------------------------------------------ KeptIdentities (selection= / subset=)
def _uids(n, seed=0):
    return [hashlib.md5(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


def _sample(uid=None, key="k"):
    sample = {"__key__": key, "__url__": "/data/00000.tar"}
    if uid is not None:
        sample["json"] = json.dumps({"uid": uid}).encode()
    sample["__id__"] = uid or key
    return sample


def test_a_subset_is_looked_up_by_datacomps_own_rule(tmp_path):
    uids = _uids(2000)
    kept, other = uids[::3], [u for i, u in enumerate(uids) if i % 3]
    np.save(tmp_path / "subset.npy", datacomp_subset(kept))
    values = kept_of_subset(tmp_path / "subset.npy")
    write_npy(tmp_path / "kept.npy", values)
    assert (tmp_path / "kept.npy").stat().st_size == 128 + 16 * len(kept)  # 16 bytes per kept uid
    keep = pickle.loads(pickle.dumps(KeptIdentities(tmp_path / "kept.npy", "hex", uid_only=True)))
    assert keep._values is None  # a worker maps the file itself

    subset = np.load(tmp_path / "subset.npy")  # DataComp's resharder: divmod + searchsorted

    def datacomp_keeps(uid):
        query = np.array(divmod(int(uid, 16), 2**64), dtype=subset.dtype)
        at = np.searchsorted(subset, query)
        return bool(at < len(subset) and subset[at] == query)

    for uid in kept[:200] + other[:200] + [uids[0].upper()]:
        assert keep(_sample(uid)) == datacomp_keeps(uid)
    assert all(keep(_sample(u)) for u in kept) and not any(keep(_sample(u)) for u in other)
    # no uid in the json: the key is never looked up, even when it is a kept uid's text
    assert not keep(_sample(None, key=kept[0])) and not keep(_sample("not-hex"))
    with pytest.raises(ValueError, match=r"subset: .* holds float64 \(3,\); DataComp's subset is a 1-d "
                                         r"structured array of dtype u8,u8"):
        np.save(tmp_path / "bad.npy", np.zeros(3))
        kept_of_subset(tmp_path / "bad.npy")


def test_the_identities_of_any_run_are_its_uids_or_hashed_keys(tmp_path):
    uids = _uids(100)
    kept = np.arange(100) % 4 == 0
    (tmp_path / "hex").mkdir()
    pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(100)], "uid": uids, "kept": kept}),
                   tmp_path / "hex" / "selection.parquet")
    values, encoding = kept_of_run(tmp_path / "hex", batch_rows=7)
    assert encoding == "hex" and (values == datacomp_subset([u for u, k in zip(uids, kept) if k])).all()

    keys = [f"{i:06d}" for i in range(100)]  # no uid: WebDataset keys, hashed to 128 bits
    (tmp_path / "keys").mkdir()
    pq.write_table(pa.table({"key": keys, "kept": kept}), tmp_path / "keys" / "selection.parquet")
    values, encoding = kept_of_run(tmp_path / "keys", batch_rows=7)
    write_npy(tmp_path / "keys.npy", values)
    keep = KeptIdentities(tmp_path / "keys.npy", encoding)
    assert encoding == "hash" and len(keep) == 25
    assert [keep(_sample(None, key=k)) for k in keys] == kept.tolist()

    mixed = uids[:50] + [None] * 50  # a null uid falls back to the row's key, as sample_id does
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"key": keys, "uid": pa.array(mixed, pa.string()), "kept": kept}),
                   tmp_path / "mixed" / "selection.parquet")
    values, encoding = kept_of_run(tmp_path / "mixed")
    write_npy(tmp_path / "mixed.npy", values)
    keep = KeptIdentities(tmp_path / "mixed.npy", encoding)
    ids = [u or k for u, k in zip(mixed, keys)]
    assert encoding == "hash" and [keep(_sample(None, key=i)) for i in ids] == kept.tolist()


def test_hex_parsing_is_divmod_of_the_int():
    uids = _uids(500) + ["0" * 32, "f" * 32, "ABCDEF" + "0" * 26]
    expected = np.array([divmod(int(u, 16), 2**64) for u in uids], U128)
    assert (hex_to_u128(pa.array(uids)) == expected).all()
    assert (hex_to_u128(pa.array(uids).slice(3, 10)) == expected[3:13]).all()
    for bad in (["a" * 31], ["g" * 32], ["0x" + "0" * 30], [None]):
        assert hex_to_u128(pa.array(bad, pa.string())) is None


def test_datacomp_subset_is_sorted_by_high_then_low_word():
    """DataComp's order (np.sort of the u8,u8 records), uids sharing their high word included."""
    rng = np.random.default_rng(7)
    high = [f"{h:016x}" for h in rng.integers(0, 2**63, 5, dtype=np.uint64)]
    uids = [high[i % 5] + f"{lo:016x}" for i, lo in enumerate(rng.integers(0, 2**63, 200, dtype=np.uint64))]
    got = datacomp_subset(uids)
    want = np.sort(np.array([divmod(int(u, 16), 2**64) for u in uids], dtype=got.dtype))
    assert got.tobytes() == want.tobytes()
