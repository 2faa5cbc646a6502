"""Run directories are replaced whole or not at all, and have one writer at a time: a rerun
into a complete run keeps it until the new one is complete (kills included), two writers never
mix, a lock left by a dead process is taken over, and foreign directories are never replaced."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dbp_lightning import atomic
from dbp_lightning.atomic import atomic_dir, recover_dir
from dbp_lightning.lock import DirectoryBusy, directory_lock, lock_path
from dbp_lightning.synthetic import PoolSpec, write_pool_store

FILES = ("selection.parquet", "clusters.parquet", "report.json", "manifest.json")


def _prune(store, out, fraction):
    return subprocess.Popen([sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(store),
                             "--output", str(out), "--stages", "[semdedup, dbp]", "--semdedup.k", "40",
                             "--select.k", "30", "--select.target_fraction", str(fraction)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(out) -> dict:
    """The run in ``out`` as {file: sha256} of its deterministic files, plus the fraction its
    manifest says it was made with; {} when there is no run."""
    if not (out / "manifest.json").exists():
        return {}
    manifest = json.loads((out / "manifest.json").read_text())
    digests = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
               for name in ("selection.parquet", "clusters.parquet")}
    return {"fraction": manifest["config"]["select"]["target_fraction"], **digests}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small pool and, for two configs, the run each makes alone."""
    root = tmp_path_factory.mktemp("rundir")
    write_pool_store(root / "pool", PoolSpec(n=4000, dim=32, n_concepts=40), dtype="float16")
    reference = {}
    for fraction in (0.5, 0.3):
        proc = _prune(root / "pool", root / f"ref{fraction}", fraction)
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
        reference[fraction] = _run(root / f"ref{fraction}")
    assert reference[0.5]["selection.parquet"] != reference[0.3]["selection.parquet"]
    return root / "pool", reference


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_two_concurrent_prunes_into_one_directory_never_mix(tmp_path, runs):
    """20 times: two prunes with different configs start together into one directory. Each
    either finishes (exit 0) or refuses at start naming the directory and the holder (exit 1);
    the directory always holds one whole run, whose manifest matches its files."""
    pool, reference = runs
    refused = 0
    for i in range(20):
        out = tmp_path / f"run{i}"
        procs = [_prune(pool, out, fraction) for fraction in (0.5, 0.3)]
        codes = [p.wait() for p in procs]
        errors = [p.stderr.read() for p in procs]
        assert 0 in codes, errors
        for code, err in zip(codes, errors):
            assert code in (0, 1), err
            if code == 1:
                refused += 1
                line = [x for x in err.splitlines() if "error:" in x]
                assert len(line) == 1 and f"{out} is being written by pid" in line[0], err
        run = _run(out)
        assert run == reference[run["fraction"]]  # one run, whole: its files and its manifest
        assert _leftovers(tmp_path) == []  # no staging directory, no lock file
    # the two start together and a prune lasts longer than a start: they overlap
    assert refused >= 1


def _manifest_fraction(out):
    try:
        return json.loads((out / "manifest.json").read_text())["config"]["select"]["target_fraction"]
    except (OSError, ValueError):
        return None


def test_a_killed_rerun_leaves_the_old_run_or_the_new_one(tmp_path, runs):
    """A rerun with another config, killed (SIGKILL) at moments across its run and once just
    after its swap is seen: the directory holds the old complete run or the new complete run,
    never neither and never a mix, and the next run takes over the dead writer's lock and says
    so."""
    pool, reference = runs
    out = tmp_path / "run"
    assert _prune(pool, out, 0.5).wait() == 0
    started = time.perf_counter()
    assert _prune(pool, tmp_path / "timing", 0.3).wait() == 0
    seconds = time.perf_counter() - started
    seen = set()
    # Timed kills mostly land before the swap; the last waits for the swap itself, so that a
    # loaded machine (a slower rerun than the timing run) still kills one run after it.
    for fraction in (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0, 1.05, "swap"):
        other = 0.3 if _run(out)["fraction"] == 0.5 else 0.5
        proc = _prune(pool, out, other)
        if fraction == "swap":
            deadline = time.perf_counter() + 20 * seconds + 60
            while _manifest_fraction(out) != other and proc.poll() is None:
                assert time.perf_counter() < deadline, "the rerun never swapped its run in"
                time.sleep(0.005)
        else:
            time.sleep(fraction * seconds)
        proc.kill()
        proc.wait()
        run = _run(out)
        assert run, f"no complete run after a kill at {fraction} of the run"
        assert run == reference[run["fraction"]]
        seen.add(run["fraction"])
        if lock_path(out).exists():  # the kill left its lock: the next writer takes it over
            proc = _prune(pool, out, run["fraction"])
            assert proc.wait() == 0
            assert "took over the lock of pid" in proc.stderr.read()
    assert seen == {0.3, 0.5}  # some kills came before the swap, some after
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("files", [
    {"notes.txt": "mine"},
    {".ssh/id_rsa": "key", ".bashrc": "alias"},  # a home directory: hidden entries count too
    {"manifest.json": '{"mine": 1}', "plots/my_figure.png": "png"},  # run-like names, not a run
    {"manifest.json": '{"mine": 1}'},  # a manifest that is not a prune run's
    {"shards-8/notes.txt": "mine"},  # a name a run uses, holding what a run never writes
])
def test_a_directory_that_is_not_a_run_is_never_replaced(tmp_path, runs, capsys, files):
    from dbp_lightning.cli import main

    pool, reference = runs
    out = tmp_path / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    code = main(["prune", "--input", str(pool), "--output", str(out), "--stages", "[random]",
                 "--select.target_fraction", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and f"output: {out} holds " in err and "not part of a prune run" in err
    assert {name: (out / name).read_text() for name in files} == files


def test_a_run_directory_with_reshards_and_leftovers_is_replaced(tmp_path, runs):
    """What a run directory holds besides the run (DBPDataModule's reshards, a killed write's
    temporary file) does not stop a rerun from replacing it."""
    pool, reference = runs
    out = tmp_path / "run"
    assert _prune(pool, out, 0.5).wait() == 0
    (out / "shards-8").mkdir()
    (out / "shards-8" / "pruned-00000.tar").write_bytes(b"")
    (out / ".selection.parquet.abc.tmp").write_bytes(b"")
    assert _prune(pool, out, 0.3).wait() == 0
    assert _run(out) == reference[0.3] and not (out / "shards-8").exists()


def test_the_lock_names_its_holder_waits_when_asked_and_is_taken_over_when_stale(tmp_path, caplog):
    target = tmp_path / "out"
    refusals = []

    def second_writer():
        try:
            with directory_lock(target):
                pass
        except DirectoryBusy as exc:
            refusals.append(str(exc))

    with directory_lock(target) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
        with directory_lock(target):  # the holder itself, deeper in its call stack: no deadlock
            pass
        assert lock_path(target).exists()  # still held
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
    assert len(refusals) == 1 and f"{target} is being written by pid {os.getpid()} on" in refusals[0]
    assert not lock_path(target).exists()  # released: removed

    # a holder that lets go while another waits: the waiter gets it
    held = threading.Event()

    def hold():
        with directory_lock(target):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    with directory_lock(target, wait=30):
        assert json.loads(lock_path(target).read_text())["pid"] == os.getpid()
    thread.join()

    # a lock file whose holder died (nobody holds the kernel lock): taken over, with a warning
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock_path(target).write_text(json.dumps({"host": "node7", "pid": int(dead), "command": "prune"}))
    with directory_lock(target):
        pass
    assert f"took over the lock of pid {dead} on node7 (prune)" in caplog.text


def test_a_swap_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "run"
    with atomic_dir(target) as stage:
        (stage / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as stage:  # the new run fails midway
        (stage / "a").write_text("new")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "old" and _leftovers(tmp_path) == []

    # a file system that cannot exchange (NFS): two renames; cut between them, then recovered
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_dir(target) as stage:
        (stage / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    real = os.rename
    calls = []

    def cut(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old run is set aside; the process dies before the new moves in
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "rename", cut)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as stage:
        (stage / "c").write_text("newer")
    monkeypatch.setattr(os, "rename", real)
    assert not target.exists()  # the instant the exchange would have closed
    recover_dir(target)
    assert sorted(p.name for p in target.iterdir()) == ["b"] and _leftovers(tmp_path) == []


def _hold(out):
    """A process that holds ``out``'s lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dbp_lightning.lock import directory_lock\n"
         f"with directory_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_command_refuses_an_output_another_process_holds(tmp_path, capsys):
    """demo and compare lock their results directory for the whole run, embed its store until
    the manifest is written: a second one started meanwhile stops, naming the holder, before
    writing anything (demo) or any shard (embed)."""
    from dbp_lightning.cli import main
    from wds_util import write_shards

    out = tmp_path / "demo"
    holder = _hold(out)
    try:
        assert main(["demo", "--out", str(out), "--max_per_source", "10"]) == 1
        err = capsys.readouterr().err
        assert f"{out} is being written by pid {holder.pid} on" in err and "-c" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()

    store = tmp_path / "store"
    write_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    argv = ["embed", "--shards", str(tmp_path / "wds"), "--out", str(store), "--num_workers", "0",
            "--encoder.model", "tiny-clip", "--encoder.random_init", "true"]
    holder = _hold(store)
    try:
        assert main(argv) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1 and f"{store} is being written by pid {holder.pid} on" in err[0]
        assert not list(store.glob("*.npy")) and not (store / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0 and (store / "manifest.json").is_file()  # the lock died with its holder


def test_a_file_system_without_locks_is_said_not_fatal(tmp_path, monkeypatch, caplog):
    """NFSv3 without lockd answers flock with ENOLCK: the run goes on, with a warning that a
    second writer would not be refused, and leaves no lock file behind."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with directory_lock(tmp_path / "out"):
        pass
    assert "cannot lock files (No locks available); a second writer" in caplog.text
    assert not lock_path(tmp_path / "out").exists()
