"""A prune killed (SIGKILL) at any point: no complete-looking partial run is left, and a rerun
gives the same bytes as an uninterrupted run."""

import hashlib
import subprocess
import sys
import time

import pytest

from dbp_lightning.synthetic import PoolSpec, write_pool_store

DETERMINISTIC = ("selection.parquet", "clusters.parquet", "subset.npy")


def _prune(store, out):
    return subprocess.Popen([sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(store),
                             "--output", str(out), "--stages", "[semdedup, dbp]", "--semdedup.k", "200",
                             "--select.k", "60", "--select.target_fraction", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _digests(run):
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
            for name in DETERMINISTIC if (run / name).exists()}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "pool"
    write_pool_store(path, PoolSpec(n=120_000, dim=64, n_concepts=300, block=20_000), dtype="float16")
    return path


def test_killed_prune_reruns_to_the_same_outputs(tmp_path, pool):
    started = time.perf_counter()
    clean = _prune(pool, tmp_path / "clean")
    assert clean.wait() == 0, clean.stderr.read()[-2000:]
    seconds = time.perf_counter() - started
    expected = _digests(tmp_path / "clean")
    assert set(expected) == set(DETERMINISTIC)

    killed, interrupted = tmp_path / "killed", 0
    for fraction in (0.3, 0.6, 0.9):
        proc = _prune(pool, killed)
        time.sleep(fraction * seconds)
        proc.kill()
        proc.wait()
        if (killed / "manifest.json").exists():  # it finished before the kill: then it is whole
            assert _digests(killed) == expected
        else:  # no run directory claims to be complete, and no artifact is half-written
            interrupted += 1
            for name in DETERMINISTIC:
                if (killed / name).exists():
                    assert _digests(killed)[name] == expected[name]
    assert interrupted >= 2
    rerun = _prune(pool, killed)
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert _digests(killed) == expected
    assert not list(killed.rglob("*.tmp"))


def test_full_disk_stops_with_one_line_and_keeps_the_old_run(tmp_path, pool, monkeypatch, capsys):
    """ENOSPC while a rerun writes: a one-line error naming the file, and the complete run that
    was there is left exactly as it was (the new one is written beside it and never swapped in)."""
    import errno

    import pyarrow.parquet as pq

    from dbp_lightning.cli import main

    out = tmp_path / "run"
    argv = ["prune", "--input", str(pool), "--output", str(out), "--stages", "[semdedup, dbp]",
            "--semdedup.k", "200", "--select.k", "60", "--select.target_fraction", "0.5"]
    assert main(argv) == 0  # an older complete run is there
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "clusters" in str(where):  # selection.parquet was written; the disk fills after
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    capsys.readouterr()
    assert main([*argv[:-1], "0.3"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not the bars
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert f"disk full while writing {out / 'clusters.parquet'} (No space" in errors[0]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging, no lock left


def _enospc_on(monkeypatch, module, name, when):
    """Make ``module.name`` (a writer) raise ENOSPC when ``when(args)`` holds."""
    import errno

    real = getattr(module, name)

    def full_disk(*args, **kwargs):
        if when(args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, full_disk)


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    return errors[0]


def test_full_disk_while_embedding_keeps_finished_shards_and_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC on the third shard: one error line naming its file, no manifest, no temp files;
    the shards written before stay complete, and a rerun resumes to a clean run's store."""
    from dbp_lightning import atomic
    from dbp_lightning.cli import main
    from wds_util import write_shards

    write_shards(tmp_path / "wds", n_shards=4, per_shard=6)

    def argv(out):
        return ["embed", "--shards", str(tmp_path / "wds"), "--out", str(out), "--encoder.kind", "open_clip",
                "--encoder.model", "tiny-clip", "--encoder.modality", "image", "--encoder.random_init", "true",
                "--num_workers", "0", "--batch_size", "4"]

    out = tmp_path / "emb"
    with monkeypatch.context() as m:
        _enospc_on(m, atomic.np, "save", lambda args: "shard-00002" in str(getattr(args[0], "name", "")))
        capsys.readouterr()
        assert main(argv(out)) == 1
        error = _one_error(capsys)
    assert str(out / "shard-00002.npy") in error  # the final name, not the temporary one
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in out.glob("*.done.json")) == ["shard-00000.done.json", "shard-00001.done.json"]
    assert not (out / "shard-00002.npy").exists()
    assert main(argv(out)) == 0 and main(argv(tmp_path / "clean")) == 0
    for shard in (tmp_path / "clean").glob("shard-*.npy"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_full_disk_while_resharding_leaves_no_partial_tar(tmp_path, monkeypatch):
    """ENOSPC inside the second resharded tar: the error names that tar, no temp file or
    manifest is left, and the rerun writes the same tars as a clean run."""
    import webdataset as wds

    from dbp_lightning.config import PruneConfig, SelectConfig
    from dbp_lightning.datamodule import DBPDataModule
    from dbp_lightning.encoders import EncoderConfig
    from wds_util import write_shards

    write_shards(tmp_path / "wds", n_shards=3, per_shard=10)

    def datamodule(cache):
        return DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / cache),
                             encoder=EncoderConfig(kind="open_clip", model="tiny-clip", modality="image",
                                                   random_init=True),
                             prune=PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.6)),
                             batch_size=4, num_workers=2, embed_batch_size=8, reshard=True)

    dm = datamodule("cache")
    dm.prepare_data()
    written = []
    with monkeypatch.context() as m:
        # 18 kept samples in 4 tars of 5, 5, 4, 4: the 8th write is inside the second
        _enospc_on(m, wds.TarWriter, "write", lambda args: written.append(1) or len(written) == 8)
        with pytest.raises(OSError, match="No space left") as exc:
            dm.setup("fit")
    assert exc.value.filename == str(dm.reshard_dir / "pruned-00001.tar")
    assert not (dm.reshard_dir / "reshard.json").exists() and not list(dm.reshard_dir.rglob("*.tmp"))
    assert not (dm.reshard_dir / "pruned-00001.tar").exists()
    dm.setup("fit")
    clean = datamodule("clean")
    clean.prepare_data()
    clean.setup("fit")
    tars = sorted(clean.reshard_dir.glob("*.tar"))
    assert len(tars) == 4 and sorted(p.name for p in dm.reshard_dir.glob("*.tar")) == [t.name for t in tars]
    for tar in tars:
        assert (dm.reshard_dir / tar.name).read_bytes() == tar.read_bytes()


def test_atomic_writes_name_the_target_but_leave_other_files_errors_alone(tmp_path):
    import errno
    import os

    from dbp_lightning.atomic import atomic_path

    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as full:
        with atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert full.value.filename == str(target)  # the file being written, not its temporary twin
    with pytest.raises(FileNotFoundError) as missing:
        with atomic_path(target):
            os.path.getsize(tmp_path / "no-such-input.tar")  # an input read inside the block
    assert missing.value.filename == str(tmp_path / "no-such-input.tar")
    assert not target.exists() and not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    from dbp_lightning import cli

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_prune", interrupted)
    assert cli.main(["prune", "--input", "x", "--stages", "[random]", "--select.target_size", "5",
                     "--select.target_fraction", "null"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dbp-lightning prune: interrupted; what had finished is kept (every artifact is "
                   "written whole or not at all) and a rerun picks up from it"]


def test_a_shard_rewritten_before_resharding_is_named_not_copied(tmp_path, monkeypatch):
    """A source shard rewritten after setup listed the pool but before the reshard reads it:
    the reshard stops naming it and writes no manifest, instead of copying other samples."""
    import os

    from dbp_lightning import cache
    from dbp_lightning.config import PruneConfig, SelectConfig
    from dbp_lightning.data.shards import ShardChanged
    from dbp_lightning.datamodule import DBPDataModule
    from dbp_lightning.encoders import EncoderConfig
    from wds_util import write_shards

    shards = write_shards(tmp_path / "wds", n_shards=2, per_shard=6)
    dm = DBPDataModule(str(tmp_path / "wds"), cache_dir=str(tmp_path / "cache"),
                       encoder=EncoderConfig(kind="open_clip", model="tiny-clip", modality="image",
                                             random_init=True),
                       prune=PruneConfig(stages=["random"], select=SelectConfig(target_fraction=0.5)),
                       batch_size=2, num_workers=0, embed_batch_size=8, reshard=True)
    dm.prepare_data()
    real = cache.ensure_pruned

    def prune_then_rewrite(*args, **kwargs):
        out = real(*args, **kwargs)
        st = os.stat(shards[0])
        os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-downloaded
        return out

    monkeypatch.setattr(cache, "ensure_pruned", prune_then_rewrite)
    with pytest.raises(ShardChanged, match=f"shard {shards[0]}: changed since the pool was listed"):
        dm.setup("fit")
    assert not (dm.reshard_dir / "reshard.json").exists()


def test_a_short_write_of_an_npy_on_a_full_disk_says_disk_full(tmp_path, monkeypatch):
    """NumPy reports a short write with no errno ("1600 requested and 248 written"): on a file
    system with no room left it is named a full disk, on the final file's name, and leaves no
    file."""
    import errno
    import os
    from collections import namedtuple

    import numpy as np

    from dbp_lightning.atomic import write_npy

    def short_write(f, array):
        f.write(b"\x93NUMPY")
        raise OSError("1600 requested and 248 written")

    full = namedtuple("statvfs", "f_bavail f_frsize")(0, 4096)
    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(OSError) as exc:
        write_npy(tmp_path / "subset.npy", np.zeros(1600, np.uint8))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / "subset.npy")
    assert "1600 requested and 248 written" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
