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
    dm = make_dm(tmp_path, num_workers=0, shuffle=False)  # in shard order: 00002 is read last
    dm.prepare_data()
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)  # the stream is open on the first shard
    (tmp_path / "wds" / "shard-00002.tar").unlink()
    with pytest.raises(RuntimeError, match=r"shard .*shard-00002\.tar: no such file .*changed since"):
        list(batches)


# ------------------------------------------------------------------ selection= / subset=
MISSING_UID = "f" * 32  # kept, in no shard


def write_selection(run, kept_indices, n=48, extra=(MISSING_UID,)):
    """A run directory made elsewhere: selection.parquet with key, uid and kept, no store."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from wds_util import uid

    run.mkdir(parents=True, exist_ok=True)
    uids = [uid(i) for i in range(n)] + list(extra)
    keys = [f"{i:06d}" for i in range(n)] + [f"x{j}" for j in range(len(extra))]
    kept = [i in kept_indices for i in range(n)] + [True] * len(extra)
    pq.write_table(pa.table({"key": keys, "uid": uids, "kept": kept}), run / "selection.parquet")
    return run


def write_subset(path, kept_indices, extra=(MISSING_UID,)):
    from dbp_lightning.rundir import datacomp_subset
    from wds_util import uid

    np.save(path, datacomp_subset([uid(i) for i in sorted(kept_indices)] + list(extra)))
    return str(path)


def selection_dm(tmp_path, source, kept_indices, **kwargs):
    if source == "selection":
        where = {"selection": str(write_selection(tmp_path / "run", kept_indices))}
    else:
        where = {"subset": write_subset(tmp_path / "subset.npy", kept_indices)}
    return DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"),
                         batch_size=kwargs.pop("batch_size", 4), num_workers=kwargs.pop("num_workers", 2),
                         **where, **kwargs)


@pytest.mark.parametrize("source", ["selection", "subset"])
@pytest.mark.parametrize("workers", [0, 2, "reshard"])
def test_a_selection_or_subset_streams_exactly_what_it_keeps(tmp_path, source, workers, caplog):
    """No embedding, no pruning: the kept samples of the shards, each once per epoch; a kept uid
    no shard holds is counted and named; a kept sample whose image does not decode is counted
    and not streamed (the epoch is not refilled with repeats)."""
    import logging

    from wds_util import uid

    write_shards(tmp_path / "wds", n_shards=4, per_shard=12, corrupt={5})
    kept_indices = {i for i in range(48) if i % 3 != 1}  # 32 kept, sample 5 among them
    expected = {uid(i) for i in kept_indices - {5}}
    resharded = workers == "reshard"
    dm = selection_dm(tmp_path, source, kept_indices, num_workers=2 if resharded else workers,
                      reshard=resharded)
    dm.prepare_data()
    with pytest.warns(UserWarning, match=rf"DBPDataModule: {source} .* keeps 33 identities; 32 are in the 4 "
                                         rf"shards, 31 samples stream each epoch \(1 kept image does not "
                                         rf"decode\); 1 kept identity is in no shard \(e\.g\. {MISSING_UID}\)"):
        dm.setup("fit")
    assert not list((tmp_path / "cache").glob("embeddings-*")) and not list((tmp_path / "cache").glob("prune-*"))
    assert dm.report["kept"] == 33 and dm.report["not_in_shards"] == 1
    assert dm.report["not_in_shards_examples"] == [MISSING_UID] and dm.report["undecodable"] == 1
    assert dm.report["streamed"] == 31 and dm.report["bytes_per_kept"] == 16
    caplog.set_level(logging.INFO, logger="dbp_lightning")
    for _ in range(2):  # two epochs, the same samples
        seen = [i for batch in dm.train_dataloader() for i in batch[2]]
        assert len(seen) == len(set(seen)) == 31 and set(seen) == expected
    assert [r.getMessage() for r in caplog.records].count(
        "DBPDataModule: the epoch streamed 31 samples, 31 expected; 1 kept identity is in no shard") == 2
    if resharded:
        assert sum(s["rows"] for s in json.loads((dm.reshard_dir / "reshard.json").read_text())["shards"]) == 31
    assert set(dm.selection.column("uid").to_pylist()) >= expected


def test_a_subset_counts_samples_without_a_uid_and_a_selection_of_keys_keeps_them(tmp_path):
    """A sample whose json has no uid cannot be in a DataComp subset (counted); a run keyed by
    WebDataset keys (no uid column) keeps samples by key."""
    import json as json_

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from wds_util import image_bytes, uid, write_sample

    (tmp_path / "wds").mkdir()
    with wds.TarWriter(str(tmp_path / "wds" / "shard-00000.tar")) as sink:
        for i in range(8):
            if i < 4:
                write_sample(sink, i)
            else:  # an older pool: json without a uid
                sink.write({"__key__": f"{i:06d}", "jpg": image_bytes(i), "txt": f"picture {i}".encode(),
                            "json": json_.dumps({"similarity": 0.3}).encode()})
    subset = write_subset(tmp_path / "subset.npy", range(8), extra=())
    dm = DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"), subset=subset,
                       batch_size=2, num_workers=0)
    with pytest.warns(UserWarning, match=r"keeps 8 identities; 4 are in the 1 shard, 4 samples stream each "
                                         r"epoch; 4 samples have no 32-hex uid in the json and cannot match; "
                                         r"4 kept identities are in no shard \(e\.g\. [0-9a-f]{32}, "):
        dm.setup("fit")
    assert dm.report["no_uid"] == 4 and dm.report["not_in_shards"] == 4 and dm.report["streamed"] == 4
    assert sorted(i for batch in dm.train_dataloader() for i in batch[2]) == sorted(uid(i) for i in range(4))

    (tmp_path / "run").mkdir()
    pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(4, 8)], "kept": [True, False, True, True]}),
                   tmp_path / "run" / "selection.parquet")
    dm = DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"), selection=str(tmp_path / "run"),
                       batch_size=2, num_workers=0)
    dm.setup("fit")
    assert sorted(i for batch in dm.train_dataloader() for i in batch[2]) == ["000004", "000006", "000007"]


def test_contradictory_sources_are_refused_in_one_line(tmp_path):
    write_shards(tmp_path / "wds", n_shards=1, per_shard=2)
    run = write_selection(tmp_path / "run", {0})
    subset = write_subset(tmp_path / "subset.npy", {0})
    cases = [({"selection": str(run), "prune": PRUNE}, "selection= and prune= both", "prune"),
             ({"subset": subset, "store": str(tmp_path)}, "subset= and store= both", "store"),
             ({"selection": str(run), "subset": subset}, "selection= and subset= both", "subset")]
    for kwargs, both, drop in cases:
        with pytest.raises(ValueError) as refused:
            DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"), **kwargs)
        assert str(refused.value) == (
            f"DBPDataModule: {both} choose the training samples; give one of selection= (a prune run "
            "directory), subset= (a DataComp subset .npy) or prune=/store= (prune at setup); on the "
            f"command line, drop one with --data.{drop} null")
    with pytest.raises(ValueError, match=rf"selection: {tmp_path} has no selection.parquet; give a prune run directory"):
        DBPDataModule(str(tmp_path / "wds"), selection=str(tmp_path))
    with pytest.raises(ValueError, match=r"subset: no file .*nothing.npy; give DataComp's subset .npy"):
        DBPDataModule(str(tmp_path / "wds"), subset=str(tmp_path / "nothing.npy"))
    assert not (tmp_path / "cache").exists()


def test_the_run_of_dbp_lightning_prune_on_a_store_trains_through_fit(tmp_path):
    """A run the DataModule did not make: `dbp-lightning embed` then `dbp-lightning prune`, then
    `dbp-lightning fit --data.selection RUN` (and the same in Python)."""
    import pyarrow.parquet as pq

    from dbp_lightning.cli import main
    from dbp_lightning.embed import embed_shards

    write_shards(tmp_path / "wds", n_shards=2, per_shard=12)
    embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), ENCODER, batch_size=8, num_workers=0)
    assert main(["prune", "--input", str(tmp_path / "emb"), "--output", str(tmp_path / "run"),
                 "--stages", "[random]", "--select.target_fraction", "0.5"]) == 0
    selection = pq.read_table(tmp_path / "run" / "selection.parquet")
    kept = set(np.asarray(selection.column("uid").to_pylist())[selection.column("kept").to_numpy()])
    dm = DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"),
                       selection=str(tmp_path / "run"), batch_size=4, num_workers=2)
    model = TinyCLIP()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == sorted(kept) and len(kept) == 12
    assert dm.report["run"]["kept"] == 12 and dm.report["not_in_shards"] == 0

    config = Path(__file__).parents[1] / "configs" / "fit" / "tiny_cpu.yaml"  # it sets data.prune
    fit = ["fit", "--config", str(config), "--data.shards", str(tmp_path / "wds"),
           "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "4",
           "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "fit"),
           "--trainer.max_epochs", "1", "--data.selection", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"selection= and prune= both choose .* --data.prune null"):
        main(fit)
    assert main(fit + ["--data.prune", "null"]) == 0
    assert not list((tmp_path / "cache").glob("embeddings-*"))  # nothing embedded, nothing pruned


SELECTION_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import lightning as L
from dbp_lightning.datamodule import DBPDataModule
from tiny_clip import TinyCLIP

dm = DBPDataModule({wds!r}, cache_dir={cache!r}, batch_size=3, num_workers=2, **{source!r})
model = TinyCLIP()
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False)
trainer.fit(model, datamodule=dm)
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"seen": model.seen, "batches": model.batches, "report": dm.report}}, f)
"""


@pytest.mark.parametrize("source", ["selection", "subset"])
def test_two_ddp_ranks_stream_a_selection_or_subset_once(tmp_path, source):
    """2 ranks x 2 workers, one shard each; 6 kept per shard = 2 full batches of 3 per worker:
    every kept sample is streamed once in the epoch, on one rank, and both ranks scanned."""
    from wds_util import uid

    write_shards(tmp_path / "wds", n_shards=4, per_shard=12)
    kept_indices = {i for i in range(48) if i % 2 == 0}
    where = ({"selection": str(write_selection(tmp_path / "run", kept_indices))} if source == "selection"
             else {"subset": write_subset(tmp_path / "subset.npy", kept_indices)})
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(SELECTION_DDP_SCRIPT.format(
        tests=str(Path(__file__).parent), wds=str(tmp_path / "wds"), cache=str(tmp_path / "cache"),
        out=str(tmp_path), source=where)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(seen) == len(set(seen)) == 24 and set(seen) == {uid(i) for i in kept_indices}
    shard_of = {uid(i): i // 12 for i in range(48)}
    for r in (0, 1):
        assert {shard_of[s] % 2 for s in ranks[r]["seen"]} == {r}  # rank r: shards r and r + 2
        assert ranks[r]["batches"] == 4 and ranks[r]["report"]["not_in_shards"] == 1
    assert "1 kept identity is in no shard" in proc.stderr
