"""The cache is keyed by what determines its content: a package upgrade, a touch or a copy keeps
the embedding store; another encoder, a shard of another size, or recompute=True embeds again."""

import dataclasses
import logging
import os
import shutil

import pytest

from dbp_lightning import cache, embed
from dbp_lightning.config import PruneConfig, SelectConfig
from dbp_lightning.datamodule import DBPDataModule
from dbp_lightning.encoders import EncoderConfig
from wds_util import write_shards

PRUNE = PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.5))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """tiny-clip weights in a file: an encoder whose key holds a weights file's identity."""
    import torch

    from dbp_lightning.encoders import build_encoder

    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    model = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True)).model
    torch.save(model.state_dict(), path)
    return path


def make_dm(tmp_path, weights, **kwargs):
    encoder = EncoderConfig(kind="open_clip", model="tiny-clip", checkpoint=str(kwargs.pop("checkpoint", weights)))
    return DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"), encoder=encoder,
                         prune=PRUNE, batch_size=4, num_workers=0, embed_batch_size=8, **kwargs)


@pytest.fixture
def embeds(monkeypatch):
    """The names of the shards embedded (each store shard written) while the test runs."""
    written = []
    real = embed.ShardWriter._write_shard

    def counting(self, chunks):
        written.append(chunks[0]["shard"])
        return real(self, chunks)

    monkeypatch.setattr(embed.ShardWriter, "_write_shard", counting)
    return written


def _stamps(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.is_file()}


def _touch(path, seconds=100):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_an_upgrade_a_touch_or_a_copy_of_the_weights_reuses_the_store(tmp_path, weights, embeds,
                                                                      monkeypatch, caplog):
    shards = write_shards(tmp_path / "wds", n_shards=3, per_shard=6)
    first = make_dm(tmp_path, weights)
    first.prepare_data()
    first.setup("fit")
    assert sorted(embeds) == ["shard-00000", "shard-00001", "shard-00002"]
    store, run = first.store_dir, first.prune_dir
    before = _stamps(store), _stamps(run)
    kept = sorted(i for batch in first.train_dataloader() for i in batch[2])

    # a pyarrow / numpy / torch upgrade, as importlib.metadata and rundir.versions report it
    import importlib.metadata

    from dbp_lightning import rundir

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name in (
        "pyarrow", "numpy", "torch", "faiss-cpu") else real_version(name))
    monkeypatch.setattr(rundir, "versions", lambda: {"python": "3.99", "pyarrow": "99.0", "numpy": "99.0"})
    # the pool copied without its mtimes (rsync without -t), the weights touched and moved
    for shard in shards:
        _touch(shard)
    moved = tmp_path / "elsewhere" / "tiny-copy.pt"
    moved.parent.mkdir()
    shutil.copyfile(weights, moved)
    _touch(moved, 5000)
    embeds.clear()
    caplog.set_level(logging.INFO, logger="dbp_lightning")
    again = make_dm(tmp_path, weights, checkpoint=moved)
    again.prepare_data()
    again.setup("fit")  # a touched shard of the same size is the same file
    assert again.store_dir == store and again.prune_dir == run and embeds == []
    assert (_stamps(store), _stamps(run)) == before  # nothing written again
    assert sorted(i for batch in again.train_dataloader() for i in batch[2]) == kept
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"embedding cache: reusing {store} (3 shards by name and size, encoder "
                            "open_clip tiny-clip, weights of ") for m in messages), messages
    assert any(m.startswith(f"prune cache: reusing {run}") for m in messages), messages
    assert any("3 shards (e.g. " in m and "another mtime than when embedded" in m and
               "taken as the same files" in m for m in messages), messages


def test_another_encoder_or_a_shard_of_another_size_embeds_again(tmp_path, weights, embeds, caplog):
    shards = write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    first = make_dm(tmp_path, weights)
    first.prepare_data()
    caplog.set_level(logging.INFO, logger="dbp_lightning.cache")

    other_weights = tmp_path / "other.pt"  # same architecture, other numbers: a fine-tuned model
    import torch

    state = torch.load(weights)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other_weights)
    embeds.clear()
    fine_tuned = make_dm(tmp_path, weights, checkpoint=other_weights)
    assert fine_tuned.store_dir != first.store_dir
    fine_tuned.prepare_data()
    assert sorted(embeds) == ["shard-00000", "shard-00001"]
    assert any(r.getMessage().startswith(
        f"embedding cache: embedding 2 shards into {fine_tuned.store_dir}: the nearest cached store, "
        f"{first.store_dir.name}, differs in encoder.checkpoint") for r in caplog.records)

    with open(shards[1], "ab") as f:  # the same name, another size: re-downloaded
        f.write(bytes(1024))
    embeds.clear()
    resized = make_dm(tmp_path, weights)
    assert resized.store_dir not in (first.store_dir, fine_tuned.store_dir)
    resized.prepare_data()
    assert sorted(embeds) == ["shard-00000", "shard-00001"]
    assert any(r.getMessage().endswith(
        f"differs in the size of 1 shard (e.g. shard-00001: {os.path.getsize(shards[1]) - 1024:,} -> "
        f"{os.path.getsize(shards[1]):,} bytes)") for r in caplog.records), [r.getMessage() for r in caplog.records]
    # the first store still names the old size: handed over as store=, setup refuses the shard
    given = make_dm(tmp_path, weights, store=str(first.store_dir))
    with pytest.raises(RuntimeError, match=r"shard .*shard-00001\.tar: changed since it was embedded "
                                           r"into .* \(.* bytes then, .* now\); embed it again"):
        given.setup("fit")


def test_recompute_embeds_and_prunes_again(tmp_path, weights, embeds, caplog):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    first = make_dm(tmp_path, weights)
    first.prepare_data()
    first.setup("fit")
    run_manifest = (first.prune_dir / "manifest.json").stat().st_mtime_ns
    embeds.clear()
    caplog.set_level(logging.INFO, logger="dbp_lightning.cache")
    again = make_dm(tmp_path, weights, recompute=True)
    again.prepare_data()
    again.setup("fit")
    assert again.store_dir == first.store_dir and sorted(embeds) == ["shard-00000", "shard-00001"]
    assert (again.prune_dir / "manifest.json").stat().st_mtime_ns != run_manifest
    messages = [r.getMessage() for r in caplog.records]
    assert f"embedding cache: embedding 2 shards into {again.store_dir} again: recompute=True" in messages
    assert any(m.startswith("prune cache: pruning ") and m.endswith(": recompute=True") for m in messages)
    assert (again.store_dir / cache.KEY_FILE).is_file() and not list(tmp_path.glob("cache/.embeddings-*.swap-*"))
    embeds.clear()
    again.prepare_data()  # once per DataModule: Trainer.validate after fit reuses what fit made
    assert embeds == []


def test_a_weights_file_is_known_by_its_content_not_its_path_or_mtime(tmp_path):
    a = tmp_path / "a.pt"
    a.write_bytes(os.urandom(3 << 20))
    b = tmp_path / "sub" / "b.pt"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    _touch(b)
    assert cache.file_identity(a) == cache.file_identity(b)
    data = bytearray(a.read_bytes())
    data[-1] ^= 1  # the same size, the last byte changed
    b.write_bytes(bytes(data))
    assert cache.file_identity(a) != cache.file_identity(b)
    assert cache.file_identity(tmp_path)["files"]["a.pt"] == cache.file_identity(a)  # a model directory


def test_the_prune_key_holds_the_options_of_the_stages_run_only():
    base = PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.5))
    key = cache.prune_key(base)
    assert "clip_score" not in key and "semdedup" not in key and "input" not in key
    unused = dataclasses.replace(base, clip_score=dataclasses.replace(base.clip_score, threshold=0.3),
                                 input="elsewhere", output="other")
    assert cache.prune_key(unused) == key
    assert cache.prune_key(dataclasses.replace(base, seed=1)) != key
    # an option added later, at its default, keeps every cached run; set, it counts
    Extended = dataclasses.make_dataclass("Extended", [("future_option", str, "off")], bases=(PruneConfig,))
    assert cache.prune_key(Extended(stages=["random"], select=SelectConfig(target_fraction=0.5))) == key
    assert cache.prune_key(Extended(stages=["random"], select=SelectConfig(target_fraction=0.5),
                                    future_option="on")) == {**key, "future_option": "on"}
