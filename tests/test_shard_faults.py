"""Bad shards, named and counted (issue 12): unreadable shards left out on request (exit 3),
samples lost to a cut or a corrupt header counted from img2dataset's own record, members of one
sample that are not adjacent read as one sample, one id in two shards found as soon as the
second is embedded, and a shard that changes under DBPDataModule named instead of read."""

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from test_embed import TINY
from wds_util import COLOURS, image_bytes, uid, write_shards

from dbp_lightning.data.shards import iter_shard
from dbp_lightning.embed import embed_shards

EFFICIENTNET = ["--encoder.kind", "efficientnet_lite0", "--encoder.model", "efficientnet-lite0"]


def _ids(store) -> list[str]:
    return store.metadata(columns=["uid"]).column("uid").to_pylist()


# ---------------------------------------------------------------- unreadable shards, skipped
def test_skip_bad_shards_embeds_the_rest_names_them_and_exits_3(tmp_path, capsys):
    from dbp_lightning.cli import main
    from dbp_lightning.store import EmbeddingStore

    shards = write_shards(tmp_path / "wds", n_shards=5, per_shard=3)
    whole = {p: Path(p).read_bytes() for p in shards}
    Path(shards[1]).unlink()
    Path(shards[2]).write_bytes(b"")
    Path(shards[3]).write_text("<html>503</html>")
    out = tmp_path / "emb"
    argv = ["embed", "--shards", str(tmp_path / "wds" / "shard-{00000..00004}.tar"), "--out", str(out),
            *EFFICIENTNET, "--num_workers", "0", "--batch_size", "4"]
    assert main(argv) == 2 and not out.exists()  # without the option: refused, as before
    assert "set skip_bad_shards to leave them out" in capsys.readouterr().err

    assert main([*argv, "--skip_bad_shards", "true"]) == 3
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert lines[0].startswith("read 6 samples, embedded 6; nothing skipped; unreadable shards left "
                               "out: 3 (shard-00001, shard-00002, shard-00003)")
    assert lines[1] == (f"left out 3 unreadable shards: {shards[1]} (no such file); {shards[2]} "
                        f"(empty file); {shards[3]} (not a tar archive: starts with b'<html>503</html>')")
    manifest = EmbeddingStore(out).manifest
    assert manifest["skipped_shards"] == [{"path": shards[1], "why": "no such file"},
                                          {"path": shards[2], "why": "empty file"},
                                          {"path": shards[3], "why": "not a tar archive: starts with "
                                                                     "b'<html>503</html>'"}]
    assert manifest["source_shards"] == [shards[0], shards[4]]  # what the store was made from
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00004"]
    assert _ids(EmbeddingStore(out)) == [uid(i) for i in (0, 1, 2, 12, 13, 14)]

    # a rerun checks again: the shard fixed since is embedded, the list is current
    Path(shards[2]).write_bytes(whole[shards[2]])
    assert main([*argv, "--skip_bad_shards", "true"]) == 3
    manifest = EmbeddingStore(out).manifest
    assert [s["path"] for s in manifest["skipped_shards"]] == [shards[1], shards[3]]
    assert manifest["source_shards"] == [shards[0], shards[2], shards[4]]
    assert len(EmbeddingStore(out)) == 9
    for p in (shards[1], shards[3]):
        Path(p).write_bytes(whole[p])
    capsys.readouterr()
    assert main([*argv, "--skip_bad_shards", "true"]) == 0  # nothing left out: a plain success
    out_lines = capsys.readouterr().out.strip().splitlines()
    assert out_lines[-1].startswith("read 15 samples, embedded 15; nothing skipped (")
    manifest = EmbeddingStore(out).manifest
    assert manifest["skipped_shards"] == [] and manifest["source_shards"] == shards
    assert _ids(EmbeddingStore(out)) == [uid(i) for i in range(15)]

    for p in shards:
        Path(p).write_bytes(b"")
    with pytest.raises(ValueError, match="shards: none of 5 can be read"):
        embed_shards(shards, tmp_path / "none", TINY, skip_bad_shards=True)


# ---------------------------------------------------------------- damage: what it cost
def _member_offsets(path) -> list[tuple[str, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.offset) for m in tar.getmembers()]


def _cut_before(path, key: str) -> None:
    """Truncate the tar just inside the first member of sample ``key`` (its header kept)."""
    offset = next(o for name, o in _member_offsets(path) if name.startswith(f"{key}."))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: offset + 512 + 100])


def _corrupt_header(path, key: str) -> None:
    """Spoil the header checksum of the first member of sample ``key``."""
    offset = next(o for name, o in _member_offsets(path) if name.startswith(f"{key}."))
    data = bytearray(Path(path).read_bytes())
    data[offset + 148 : offset + 156] = b"0000000\0"
    Path(path).write_bytes(bytes(data))


def _write_img2dataset_record(path, sidecar: str, successes: int, failures: int = 3) -> None:
    stem = str(path)[: -len(".tar")]
    if sidecar == "stats":
        Path(f"{stem}_stats.json").write_text(json.dumps({"count": successes + failures,
                                                          "successes": successes}))
    elif sidecar == "parquet":
        status = ["success"] * successes + ["failed_to_download"] * failures
        pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(len(status))], "status": status}),
                       f"{stem}.parquet")


@pytest.mark.parametrize("sidecar", ["stats", "parquet", None])
@pytest.mark.parametrize("damage", ["cut", "corrupt_header"])
def test_samples_lost_to_damage_are_counted_from_img2dataset_records(tmp_path, sidecar, damage):
    """A tar cut inside the first member of sample 5 of 8, or with a corrupt header there:
    samples 0-4 are read (4 is whole: all its members come before the damage). With
    img2dataset's stats or parquet beside the tar, lost = 8 - 5; without, only sample 5 is
    known to be lost and the shard is marked."""
    paths = write_shards(tmp_path / "wds", n_shards=2, per_shard=8)
    (_cut_before if damage == "cut" else _corrupt_header)(paths[1], "000013")
    _write_img2dataset_record(paths[1], sidecar, successes=8)
    errors, notes = Counter(), {}
    samples = list(iter_shard(paths[1], errors, notes))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(8, 13)]
    flag = "truncated" if damage == "cut" else "corrupt_header"
    if sidecar:
        assert errors == {flag: 1, "lost_to_truncation": 3} and notes["expected"] == 8
    else:
        assert errors == {flag: 1, "lost_to_truncation": 1, "lost_to_truncation_unknown": 1}
    assert ("corrupt tar header at byte" if damage == "corrupt_header" else "inside a member") \
        in notes["damage"]

    store = embed_shards(paths, tmp_path / "emb", TINY, batch_size=4, num_workers=0)
    assert len(store) == 13
    entry = store.manifest["shards"][1]
    assert entry["counts"][flag] == 1 and notes["damage"] == entry["damage"]
    from dbp_lightning.embed import skip_summary

    line = skip_summary(store.manifest)
    assert f"{flag} 1 (shard-00001)" in line
    if sidecar:
        assert "lost_to_truncation 3 (shard-00001)" in line and "unknown" not in line
    else:
        assert ("lost_to_truncation 1 (shard-00001; samples after the cut unknown in shard-00001: "
                "no img2dataset stats beside the tar)") in line


def test_a_corrupt_header_used_to_end_the_shard_silently(tmp_path):
    """What webdataset's reader does with a corrupt header in the middle: it stops, as if the
    shard had ended, with no error to count; iter_shard names it."""
    paths = write_shards(tmp_path / "wds", n_shards=1, per_shard=8)
    _corrupt_header(paths[0], "000005")
    seen = [s["__key__"] for s in wds.WebDataset(paths[0], shardshuffle=False, empty_check=False)]
    assert seen == [f"{i:06d}" for i in range(5)]  # silently short
    errors = Counter()
    # sample 4 is whole (its members all precede the damage); what lies there began sample 5
    assert len(list(iter_shard(paths[0], errors))) == 5 and errors["corrupt_header"] == 1
    assert errors["lost_to_truncation"] == 1 and errors["lost_to_truncation_unknown"] == 1


# ---------------------------------------------------------------- members out of place
def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _members(i: int) -> dict[str, bytes]:
    return {"jpg": image_bytes(i), "txt": f"a {COLOURS[i % 8]} picture number {i}".encode(),
            "json": json.dumps({"uid": uid(i)}).encode()}


def test_members_not_adjacent_are_read_as_one_sample(tmp_path):
    """``a.jpg b.* a.txt a.json``: webdataset gives ``a`` twice, an image without a caption and a
    caption without an image (counted as undecodable_image and no_caption before); read here as
    one sample under its json uid, counted once. A member after its sample was used (``c.json``)
    is dropped and counted; a member name repeated within a sample keeps the first."""
    path = tmp_path / "wds" / "shard-00000.tar"
    path.parent.mkdir()
    a, b, c, d = (_members(i) for i in range(4))
    with tarfile.open(path, "w") as tar:
        _member(tar, "000000.jpg", a["jpg"])
        for ext in ("jpg", "txt", "json"):
            _member(tar, f"000001.{ext}", b[ext])
        _member(tar, "000000.txt", a["txt"])
        _member(tar, "000000.json", a["json"])
        _member(tar, "000002.jpg", c["jpg"])
        _member(tar, "000002.txt", c["txt"])
        _member(tar, "000003.jpg", d["jpg"])
        _member(tar, "000003.jpg", image_bytes(99))  # the same name twice
        _member(tar, "000003.txt", d["txt"])
        _member(tar, "000003.json", d["json"])
        _member(tar, "000002.json", c["json"])  # too late: 000002 was complete and given out
    theirs = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False,
                                                    handler=wds.warn_and_continue)]
    assert theirs[:3] == ["000000", "000001", "000000"]  # webdataset's grouping: split in two

    errors, notes = Counter(), {}
    samples = list(iter_shard(str(path), errors, notes))
    assert [s["__key__"] for s in samples] == ["000001", "000000", "000002", "000003"]
    assert samples[1]["jpg"] == a["jpg"] and samples[1]["json"] == a["json"]
    assert samples[3]["jpg"] == d["jpg"]  # the first of the two
    assert errors == {"members_not_adjacent": 2, "duplicate_member": 1}
    assert notes == {"members_not_adjacent": ["000000", "000002"], "duplicate_member": ["000003"]}

    from dbp_lightning.embed import skip_summary

    store = embed_shards(str(path.parent), tmp_path / "emb", TINY, batch_size=4, num_workers=0)
    assert sorted(_ids(store)) == sorted([uid(0), uid(1), "000002", uid(3)])  # 000002: no json read
    assert store.manifest["counts"] == {"read": 4, "members_not_adjacent": 2, "duplicate_member": 1}
    assert store.manifest["shards"][0]["members_not_adjacent"] == ["000000", "000002"]
    assert skip_summary(store.manifest) == (
        "read 4 samples, embedded 4; nothing skipped; noted (samples used): "
        "duplicate_member 1 (shard-00000); members_not_adjacent 2 (shard-00000)")


def test_held_samples_are_bounded(tmp_path, monkeypatch):
    """Samples without a caption wait for one only up to HOLD_BYTES: past it the oldest goes on
    as it is (to be skipped as no_caption), so a shard of captionless samples is not held whole
    in memory."""
    from dbp_lightning.data import shards

    write_shards(tmp_path / "wds", n_shards=1, per_shard=10, no_caption=set(range(10)))
    path = str(tmp_path / "wds" / "shard-00000.tar")
    sizes = [len(s["jpg"] if "jpg" in s else s["png"]) + len(s["json"])
             for s in iter_shard(path, Counter())]
    monkeypatch.setattr(shards, "HOLD_BYTES", sum(sizes[:3]))
    members_read, given = [], []
    real = shards._tar_members

    def counting(*args):
        for member in real(*args):
            members_read.append(member[0])
            yield member

    monkeypatch.setattr(shards, "_tar_members", counting)
    errors = Counter()
    for sample in iter_shard(path, errors):
        given.append((sample["__key__"], len(members_read)))
    assert [k for k, _ in given] == [f"{i:06d}" for i in range(10)]  # the oldest goes first
    assert given[0][1] <= 2 * 5  # out before the shard's 20 members were read
    assert not errors


# ---------------------------------------------------------------- one identity in two shards
def test_a_repeated_id_stops_the_run_when_the_second_shard_arrives(tmp_path):
    """Shard 1 repeats sample 0's uid: the run stops at shard 1, naming both shards, before any
    file of shard 1 is written and before shard 2 is embedded; resuming with shard 0 finished
    earlier finds it the same way (its ids are loaded when the run starts)."""
    paths = write_shards(tmp_path / "wds", n_shards=3, per_shard=4, duplicate_key_in=1)
    out = tmp_path / "emb"
    with pytest.raises(ValueError, match=rf"sample '{uid(0)}' occurs in shard .*shard-00000\.tar and "
                                         r"in shard .*shard-00001\.tar"):
        embed_shards(paths, out, TINY, batch_size=4, num_workers=0)
    assert (out / "shard-00000.done.json").is_file()
    assert not list(out.glob("shard-00001*")) and not list(out.glob("shard-00002*"))
    assert not (out / "manifest.json").exists()

    resumed = tmp_path / "resumed"
    embed_shards(paths[:1], resumed, TINY, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"occurs in shard .*shard-00000\.tar and in shard .*shard-00001"):
        embed_shards(paths, resumed, TINY, batch_size=4, num_workers=0)


def test_a_hash_collision_is_no_error_and_the_final_check_names_shards_of_two_ranks(tmp_path, monkeypatch):
    """Every id hashed alike: no false error (hits are checked on the ids); two writers (two
    ranks) each see one of the shards, and the manifest's check names both."""
    import dbp_lightning.embed as E

    monkeypatch.setattr(E, "id_hashes", lambda ids: np.zeros(len(ids), np.int64))
    paths = write_shards(tmp_path / "wds", n_shards=3, per_shard=4)
    store = embed_shards(paths, tmp_path / "emb", TINY, batch_size=4, num_workers=0, dtype="float32")
    assert _ids(store) == [uid(i) for i in range(12)]

    def chunk(shard, ids):
        return {"shard": shard, "last": True, "keys": ids, "uids": ids, "fields": {},
                "embeddings": np.eye(len(ids), 4, dtype=np.float32), "clip_score": None,
                "counts": {"read": len(ids)}}

    names = ["shard-00000.tar", "shard-00001.tar"]
    (tmp_path / "two").mkdir()
    (tmp_path / "three").mkdir()
    for rank, ids in enumerate((["a", "b"], ["c", "a"])):
        E.ShardWriter(str(tmp_path / "two"), names, "float32", {})._write_shard([chunk(f"shard-0000{rank}", ids)])
    with pytest.raises(ValueError, match=r"sample 'a' occurs in shard shard-00000\.tar and in shard "
                                         r"shard-00001\.tar"):
        E.write_manifest(tmp_path / "two", names, "float32", {})
    writer = E.ShardWriter(str(tmp_path / "three"), ["shard-00002.tar"], "float32", {})
    with pytest.raises(ValueError, match=r"sample 'x' occurs twice in shard shard-00002\.tar"):
        writer._write_shard([chunk("shard-00002", ["x", "y", "x"])])
    assert not (tmp_path / "three" / "shard-00002.npy").exists()


def test_keys_that_repeat_across_shards_embed_when_uids_are_unique(tmp_path):
    """Two shards whose samples are keyed 000000..000003 alike but carry distinct json uids: the
    identity is the uid, so the store holds all eight."""
    root = tmp_path / "wds"
    root.mkdir()
    for s in range(2):
        with wds.TarWriter(str(root / f"shard-{s:05d}.tar")) as sink:
            for j in range(4):
                sink.write({"__key__": f"{j:06d}", "jpg": image_bytes(10 * s + j),
                            "txt": f"picture {s} {j}".encode(),
                            "json": json.dumps({"uid": uid(10 * s + j)}).encode()})
    store = embed_shards(str(root), tmp_path / "emb", TINY, batch_size=4, num_workers=0)
    meta = store.metadata()
    assert meta.column("uid").to_pylist() == [uid(i) for i in (0, 1, 2, 3, 10, 11, 12, 13)]
    assert meta.column("key").to_pylist() == [f"{j:06d}" for j in range(4)] * 2


# ---------------------------------------------------------------- DBPDataModule
def _dm(tmp_path, **kwargs):
    from test_datamodule import ENCODER

    from dbp_lightning.config import PruneConfig, SelectConfig
    from dbp_lightning.datamodule import DBPDataModule

    return DBPDataModule(kwargs.pop("shards", str(tmp_path / "wds")), cache_dir=str(tmp_path / "cache"),
                         encoder=ENCODER,
                         prune=PruneConfig(stages=["random"],
                                           select=SelectConfig(target_fraction=kwargs.pop("keep", 0.6))),
                         batch_size=4, num_workers=0, embed_batch_size=8, **kwargs)


def _kept(dm) -> set[str]:
    sel = dm.selection
    return set(np.asarray(sel.column("uid").to_pylist())[sel.column("kept").to_numpy(zero_copy_only=False)])


def test_a_shard_that_changes_after_setup_is_named_when_it_is_streamed(tmp_path):
    write_shards(tmp_path / "wds", n_shards=3, per_shard=8)
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert sorted(i for b in dm.train_dataloader() for i in b[2]) == sorted(_kept(dm))
    shard = tmp_path / "wds" / "shard-00002.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten, same size
    with pytest.raises(RuntimeError, match=r"shard .*shard-00002\.tar: changed since the pool was listed "
                                           r".*mtime_ns .* while streaming it"):
        list(dm.train_dataloader())
    with open(shard, "ab") as f:  # grown
        f.write(bytes(1024))
    with pytest.raises(RuntimeError, match=r"shard-00002\.tar: changed .* bytes then, "):
        list(dm.train_dataloader())


def test_a_shard_that_changed_since_it_was_embedded_is_named_at_setup(tmp_path):
    """Between prepare_data (which embeds) and setup, or after `dbp-lightning embed` wrote the
    store a DataModule is given: setup names a shard of another size, before pruning or streaming
    anything. A shard whose mtime alone changed (a copy, a touch) is taken as the same file."""
    write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    dm = _dm(tmp_path)
    dm.prepare_data()
    shard = tmp_path / "wds" / "shard-00001.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    dm.setup("fit")  # the same size: the same file
    assert len([i for batch in dm.train_dataloader() for i in batch[2]]) == round(0.6 * 12)
    with open(shard, "ab") as f:
        f.write(bytes(1024))
    again = _dm(tmp_path, store=str(dm.store_dir))
    with pytest.raises(RuntimeError, match=r"shard .*shard-00001\.tar: changed since it was embedded into "
                                           r".*embeddings-.* \(.* bytes then, .* now\); embed it again"):
        again.setup("fit")
    shutil.rmtree(tmp_path / "cache")
    dm = _dm(tmp_path)
    dm.prepare_data()
    with open(shard, "ab") as f:
        f.write(bytes(1024))
    with pytest.raises(RuntimeError, match=r"shard .*shard-00001\.tar: changed since it was embedded into "
                                           r".*embeddings-.* \(.* bytes then, .* now\); embed it again"):
        dm.setup("fit")
    assert not list((tmp_path / "cache").glob("prune-*"))  # nothing pruned
    with pytest.raises(RuntimeError, match=r"setup: no embedding store at .*; call prepare_data\(\) first"):
        _dm(tmp_path).setup("fit")  # the cache is keyed by the shards' sizes: another entry
    embed_shards(str(tmp_path / "wds"), tmp_path / "emb", dm.encoder, batch_size=4, num_workers=0)
    with open(shard, "ab") as f:
        f.write(bytes(1024))
    given = _dm(tmp_path, store=str(tmp_path / "emb"))
    given.prepare_data()
    with pytest.raises(RuntimeError, match=r"shard-00001\.tar: changed since it was embedded into .*emb "
                                           r"\(.* bytes then, .* now"):
        given.setup("fit")


def test_the_datamodule_skips_bad_shards_when_asked_and_streams_what_the_store_holds(tmp_path):
    """An empty shard is left out with a warning naming it; a shard whose sample is split in the
    tar streams that sample whole, as it was embedded."""
    write_shards(tmp_path / "wds", n_shards=3, per_shard=6)
    (tmp_path / "wds" / "shard-00001.tar").write_bytes(b"")
    a, b = _members(100), _members(101)
    with tarfile.open(tmp_path / "wds" / "shard-00003.tar", "w") as tar:
        _member(tar, "000100.jpg", a["jpg"])
        for ext in ("jpg", "txt", "json"):
            _member(tar, f"000101.{ext}", b[ext])
        _member(tar, "000100.txt", a["txt"])
        _member(tar, "000100.json", a["json"])
    with pytest.raises(ValueError, match=r"1 of 4 cannot be read.*shard-00001\.tar \(empty file\)"):
        _dm(tmp_path)
    with pytest.warns(UserWarning, match=r"leaving out 1 unreadable shard \(skip_bad_shards\): "
                                         r".*shard-00001\.tar \(empty file\)"):
        dm = _dm(tmp_path, skip_bad_shards=True, keep=1.0)
    assert [Path(p).name for p, _ in dm.skipped_shards] == ["shard-00001.tar"]
    dm.prepare_data()
    dm.setup("fit")
    seen = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert sorted(seen) == sorted(_kept(dm)) and len(seen) == 14 and uid(100) in seen
    manifest = json.loads((dm.store_dir / "manifest.json").read_text())
    assert manifest["counts"]["members_not_adjacent"] == 1

    # a store that `embed --skip_bad_shards true` wrote is taken for the readable shards
    embed_shards(str(tmp_path / "wds"), tmp_path / "emb", dm.encoder, batch_size=4, num_workers=0,
                 skip_bad_shards=True)
    with pytest.warns(UserWarning, match="leaving out 1"):
        given = _dm(tmp_path, skip_bad_shards=True, store=str(tmp_path / "emb"))
    given.prepare_data()
    given.setup("fit")
    seen = [i for batch in given.train_dataloader() for i in batch[2]]
    assert sorted(seen) == sorted(_kept(given)) and 0 < len(seen) < 14


def _member_cut(path, name: str, into: int) -> None:
    """Truncate the tar ``into`` bytes after the start of member ``name``'s header."""
    offset = next(o for n, o in _member_offsets(path) if n == name)
    Path(path).write_bytes(Path(path).read_bytes()[: offset + into])


@pytest.mark.parametrize("where, read, lost, flag", [
    # inside the data of the second member of sample 5: sample 5 was being read, it is dropped
    ("000005.json", 100 + 512, 1, "truncated"),
    # exactly between samples 4 and 5: nothing was being read, sample 4 is whole
    ("000005.jpg", 0, 0, "truncated"),
    # inside sample 5's first header: no name to tell, sample 4 has every member 3 had; what
    # lies at the cut began sample 5
    ("000005.jpg", 200, 1, "truncated"),
])
def test_a_whole_sample_before_the_damage_is_kept(tmp_path, where, read, lost, flag):
    """Only a sample the damage may have cut is dropped (a fresh-user walkthrough found the
    whole sample before a cut dropped too)."""
    paths = write_shards(tmp_path / "wds", n_shards=1, per_shard=8)
    _member_cut(paths[0], where, read)
    errors, notes = Counter(), {}
    keys = [s["__key__"] for s in iter_shard(paths[0], errors, notes)]
    assert keys == [f"{i:06d}" for i in range(5)]
    assert errors[flag] == 1 and errors["lost_to_truncation"] == lost
    assert errors["lost_to_truncation_unknown"] == 1
