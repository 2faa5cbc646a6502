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


def test_full_disk_stops_with_one_line_and_no_partial_run(tmp_path, pool, monkeypatch, capsys):
    """ENOSPC while writing the run directory: a one-line error, no manifest, no temp files,
    and no artifact of the old run left to be mistaken for the new one."""
    import errno

    import pyarrow.parquet as pq

    from dbp_lightning.cli import main

    out = tmp_path / "run"
    argv = ["prune", "--input", str(pool), "--output", str(out), "--stages", "[semdedup, dbp]",
            "--semdedup.k", "200", "--select.k", "60", "--select.target_fraction", "0.5"]
    assert main(argv) == 0  # an older complete run is there
    real = pq.write_table

    def full_disk(table, where, *args, **kwargs):
        if "clusters" in str(where):  # selection.parquet was written; the disk fills after
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    capsys.readouterr()
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not the bars
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert errors[0].split("(")[-1].startswith(str(out / "clusters.parquet"))
    assert not (out / "manifest.json").exists()  # the run does not claim to be complete
    assert not (out / "clusters.parquet").exists() and not list(out.rglob("*.tmp"))
