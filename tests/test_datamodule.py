import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.datamodule import DBPDataModule
from dbp_lightning.encoders import EncoderConfig
from tiny_clip import TinyCLIP
from wds_util import write_shards

ENCODER = EncoderConfig(kind="open_clip", model="tiny-clip", modality="image", random_init=True)
PRUNE = PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.6))


def make_dm(tmp_path, prune=PRUNE, encoder=ENCODER, **kwargs):
    return DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"), encoder=encoder,
                         prune=prune, batch_size=kwargs.pop("batch_size", 4),
                         num_workers=kwargs.pop("num_workers", 2), embed_batch_size=8, **kwargs)


def kept_ids(dm):
    sel = dm.selection
    return set(np.asarray(sel.column("uid").to_pylist())[sel.column("kept").to_numpy(zero_copy_only=False)])


@pytest.mark.parametrize("encoder", [ENCODER, EncoderConfig(kind="sentence_transformers", model="minilm",
                                                             modality="text")], ids=["open_clip", "minilm"])
def test_streams_exactly_the_selection_once_with_two_workers(tmp_path, encoder):
    write_shards(tmp_path / "wds", n_shards=4, per_shard=12, corrupt={5}, no_caption={30})
    prune = PruneConfig(stages=["semdedup", "dbp"], semdedup=SemDeDupConfig(k=4, target_fraction=0.9),
                        select=SelectConfig(target_fraction=0.5, k=6, num_neighbors=3))
    dm = make_dm(tmp_path, prune=prune, encoder=encoder)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.report["kept"] == len(kept_ids(dm)) > 0
    seen = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert len(seen) == len(set(seen)) and set(seen) == kept_ids(dm)
    seen_again = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert sorted(seen_again) == sorted(seen)  # the next epoch is the same set again


def test_cache_is_reused_and_keyed_by_config(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=10)
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    store_manifest, run_manifest = dm.store_dir / "manifest.json", dm.prune_dir / "manifest.json"
    stamps = store_manifest.stat().st_mtime_ns, run_manifest.stat().st_mtime_ns
    again = make_dm(tmp_path)
    again.prepare_data()
    again.setup("fit")  # neither embeds nor prunes again
    assert (store_manifest.stat().st_mtime_ns, run_manifest.stat().st_mtime_ns) == stamps
    assert again.prune_dir == dm.prune_dir
    other = make_dm(tmp_path, prune=PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.3)))
    assert other.store_dir == dm.store_dir and other.prune_dir != dm.prune_dir


def test_trainer_fit_on_the_pruned_stream(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=16)
    dm = make_dm(tmp_path, batch_size=4, num_workers=0)
    model = TinyCLIP()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert set(model.seen) == kept_ids(dm) and len(model.seen) == len(kept_ids(dm))
    assert np.isfinite(trainer.callback_metrics["train/loss"].item())


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import lightning as L
from dbp_lightning.config import PruneConfig, SelectConfig
from dbp_lightning.datamodule import DBPDataModule
from dbp_lightning.encoders import EncoderConfig
from tiny_clip import TinyCLIP

from dbp_lightning.config import ClipScoreConfig, SemDeDupConfig
dm = DBPDataModule({wds!r}, cache_dir={cache!r},
                   encoder=EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True),
                   prune={prune!r}, batch_size=3, num_workers=2, embed_batch_size=8, reshard={reshard!r})
model = TinyCLIP()
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False)
trainer.fit(model, datamodule=dm)
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"seen": model.seen, "batches": model.batches}}, f)
"""


DDP_PRUNE = {
    "keep-all": PruneConfig(stages=[]),
    "random-half": PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.5)),
    "semdedup-dbp": PruneConfig(stages=["semdedup", "dbp"], semdedup=SemDeDupConfig(k=6, target_fraction=0.9),
                                select=SelectConfig(target_fraction=0.5, k=8, num_neighbors=3)),
}


@pytest.mark.parametrize("name", [*DDP_PRUNE, "random-half+reshard"])
def test_two_ddp_ranks_prune_together_and_split_the_selection(tmp_path, name):
    write_shards(tmp_path / "wds", n_shards=4, per_shard=12)
    prune, resharded = DDP_PRUNE[name.split("+")[0]], name.endswith("+reshard")
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), wds=str(tmp_path / "wds"), cache=str(tmp_path / "cache"),
        out=str(tmp_path), prune=prune, reshard=resharded)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    dm = make_dm(tmp_path, prune=prune, batch_size=3, reshard=resharded)
    assert json.loads((dm.prune_dir / "report.json").read_text())["processes"] == 2  # pruned by both
    # the same selection as one process pruning the same store
    from dbp_lightning.cache import ensure_pruned
    import pyarrow.parquet as pq

    alone = ensure_pruned(tmp_path / "alone", dm.store_dir, prune, progress=False)
    assert pq.read_table(alone / "selection.parquet").equals(dm.selection)
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(seen) == len(set(seen)) and set(seen) <= kept_ids(dm)  # never twice, only kept
    for r in (0, 1):
        assert len(ranks[r]["seen"]) == ranks[r]["batches"] * 3  # full batches only under DDP
    if resharded:  # 2 ranks x 2 workers: 4 tars of the 24 kept, written by both ranks
        manifest = json.loads((dm.prune_dir / "shards-4" / "reshard.json").read_text())
        assert [s["rows"] for s in manifest["shards"]] == [6] * 4
        assert ranks[0]["batches"] == ranks[1]["batches"] == 4 and set(seen) == kept_ids(dm)
        return
    dm.setup("fit")
    # rank r streams shards r and r + 2 only (sample i lives in shard i // 12)
    from wds_util import uid
    shard_of = {uid(i): i // 12 for i in range(48)}
    for r in (0, 1):
        assert {shard_of[s] % 2 for s in ranks[r]["seen"]} <= {r}
    assert ranks[0]["batches"] == ranks[1]["batches"] == min(dm.batches_per_rank(2))
    if not prune.stages:  # each worker: one shard of 12 = 4 full batches; nothing is left out
        assert len(seen) == 48 and ranks[0]["batches"] == 8


def test_reshard_streams_the_same_samples_from_balanced_shards(tmp_path):
    write_shards(tmp_path / "wds", n_shards=3, per_shard=10, corrupt={4})
    dm = make_dm(tmp_path, reshard=True, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    manifest = json.loads((dm.reshard_dir / "reshard.json").read_text())
    rows = [s["rows"] for s in manifest["shards"]]
    assert len(rows) == 4  # 3 source shards rounded up to a multiple of 2 workers
    assert sum(rows) == len(kept_ids(dm)) and max(rows) - min(rows) <= 1
    seen = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert len(seen) == len(set(seen)) and set(seen) == kept_ids(dm)


def test_cache_key_follows_shards_encoder_and_weights(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    base = make_dm(tmp_path).store_dir
    assert make_dm(tmp_path, encoder=EncoderConfig(kind="open_clip", model="tiny-clip",
                                                   modality="both", random_init=True)).store_dir != base
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    with_weights = make_dm(tmp_path, encoder=EncoderConfig(kind="timm", model="resnet10t",
                                                           checkpoint=str(weights))).store_dir
    weights.write_bytes(b"22")  # same path, new content
    assert make_dm(tmp_path, encoder=EncoderConfig(kind="timm", model="resnet10t",
                                                   checkpoint=str(weights))).store_dir != with_weights
    write_shards(tmp_path / "wds", n_shards=2, per_shard=5)  # the shards change
    assert make_dm(tmp_path).store_dir != base


def test_a_store_embedded_beforehand_is_used_as_it_is(tmp_path):
    from dbp_lightning.embed import embed_shards

    write_shards(tmp_path / "wds", n_shards=3, per_shard=8, corrupt={2})
    store = embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), ENCODER, batch_size=8, num_workers=0)
    dm = make_dm(tmp_path, store=str(tmp_path / "emb"), num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert not list((tmp_path / "cache").glob("embeddings-*"))  # nothing embedded again
    assert dm.report["pool"] == len(store) == 23
    seen = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert sorted(seen) == sorted(kept_ids(dm))
    other = make_dm(tmp_path, store=str(tmp_path / "emb"),
                    encoder=EncoderConfig(kind="open_clip", model="tiny-clip", modality="both",
                                          random_init=True))
    with pytest.raises(ValueError, match="store: .* was embedded by"):
        other.prepare_data()
    write_shards(tmp_path / "more", n_shards=4, per_shard=8)
    elsewhere = DBPDataModule(str(tmp_path / "more"), cache_dir=str(tmp_path / "cache"), encoder=ENCODER,
                              prune=PRUNE, store=str(tmp_path / "emb"))
    with pytest.raises(ValueError, match=r"does not hold these shards \(missing \['shard-00003'\]"):
        elsewhere.prepare_data()


def test_a_shard_whose_every_sample_was_skipped_streams_nothing(tmp_path):
    write_shards(tmp_path / "wds", n_shards=3, per_shard=6, corrupt=set(range(6, 12)))  # all of shard 1
    dm = make_dm(tmp_path, num_workers=0, reshard=True)
    dm.prepare_data()
    dm.setup("fit")
    assert json.loads((dm.store_dir / "manifest.json").read_text())["empty_shards"][0]["name"] == "shard-00001"
    assert dm._kept.per_shard()["shard-00001"] == 0
    seen = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert sorted(seen) == sorted(kept_ids(dm)) and len(seen) == round(0.6 * 12)
    plain = make_dm(tmp_path, num_workers=0)  # the source shards, filtered as they stream
    plain.setup("fit")
    assert sorted(i for batch in plain.train_dataloader() for i in batch[2]) == sorted(seen)


def test_a_missing_shard_is_named_when_the_datamodule_is_built(tmp_path):
    shards = write_shards(tmp_path / "wds", n_shards=3, per_shard=4)
    Path(shards[1]).unlink()
    with pytest.raises(ValueError, match=r"1 of 3 cannot be read.*shard-00001\.tar \(no such file\)"):
        DBPDataModule(str(tmp_path / "wds" / "shard-{00000..00002}.tar"), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_calls_out_of_order_say_which_call_is_missing(tmp_path):
    shards = write_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    dm = DBPDataModule(shards, cache_dir=str(tmp_path / "cache"),
                       prune=PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.5)))
    with pytest.raises(RuntimeError, match=r"train_dataloader: nothing is pruned yet; call prepare_data\(\) and setup\(\)"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"setup: no embedding store at .*; call prepare_data\(\) first"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()  # neither call started any work


def test_a_shard_that_disappears_while_streaming_is_named_not_refilled(tmp_path):
    write_shards(tmp_path / "wds", n_shards=3, per_shard=8)
    dm = make_dm(tmp_path, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)  # the stream is open on the first shard
    (tmp_path / "wds" / "shard-00002.tar").unlink()
    with pytest.raises(RuntimeError, match=r"shard .*shard-00002\.tar: no such file .*changed since"):
        list(batches)
