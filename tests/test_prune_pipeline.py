import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import unit_rows
from dbp_lightning.cli import main
from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.synthetic import PoolSpec, write_pool_store


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "store"
    write_pool_store(path, PoolSpec(n=6000, dim=32, n_concepts=60, block=2500, seed=3))
    return path


def write_config(tmp_path, pool, **overrides):
    cfg = {"input": str(pool), "output": str(tmp_path / "run"),
           "stages": ["semdedup", "clip_score", "dbp"],
           "semdedup": {"k": 20, "eps": 0.05, "target_fraction": None},
           "clip_score": {"fraction": 0.9},
           "select": {"target_fraction": 0.5, "k": 30, "num_neighbors": 5}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prune_cli_writes_a_complete_run_directory(tmp_path, pool):
    assert main(["prune", "--config", str(write_config(tmp_path, pool))]) == 0
    run = tmp_path / "run"
    sel = pq.read_table(run / "selection.parquet")
    clusters = pq.read_table(run / "clusters.parquet")
    report = json.loads((run / "report.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert sel.num_rows == 6000
    for col in ("key", "uid", "dedup_cluster", "dup_sim", "dedup_kept", "clip_score", "clip_kept",
                "cluster", "sim_to_centroid", "dbp_kept", "kept"):
        assert col in sel.column_names
    kept = np.asarray(sel.column("kept"))
    # stage counts chain: dedup -> clip (exactly 90%) -> dbp (exactly 50%)
    counts = [st["out"] for st in report["stages"]]
    assert counts[1] == round(0.9 * counts[0]) and counts[2] == round(0.5 * counts[1]) == kept.sum()
    assert report["kept"] == kept.sum()
    # the planted near-duplicates are what SemDeDup removed: each planted group keeps one
    group = np.concatenate([pq.read_table(p).column("dup_group").to_numpy() for p in sorted(pool.glob("*.parquet"))])
    dedup = np.asarray(sel.column("dedup_kept"))
    assert dedup[group < 0].all()
    survivors = np.bincount(np.unique(group[group >= 0], return_inverse=True)[1], weights=dedup[group >= 0])
    assert (survivors == 1).mean() > 0.97
    # clusters table and quotas agree with the selection
    assert np.asarray(clusters.column("quota")).sum() == kept.sum()
    assert np.array_equal(np.asarray(clusters.column("kept")), np.asarray(clusters.column("quota")))
    # subset.npy in DataComp's format: sorted u8,u8 of the kept uids
    subset = np.load(run / "subset.npy")
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == kept.sum()
    pairs = subset.tolist()
    assert pairs == sorted(pairs)
    uid = sel.filter(sel.column("kept")).column("uid")[0].as_py()
    assert (int(uid[:16], 16), int(uid[16:], 16)) in set(pairs)
    assert (run / "plots" / "complexity_scatter.png").stat().st_size > 1000
    assert manifest["config"]["select"]["k"] == 30 and "faiss-cpu" in manifest["versions"]


def test_same_config_same_selection(tmp_path, pool):
    a = tmp_path / "a"; b = tmp_path / "b"
    for out in (a, b):
        assert main(["prune", "--config", str(write_config(tmp_path, pool, output=str(out)))]) == 0
    assert pq.read_table(a / "selection.parquet").equals(pq.read_table(b / "selection.parquet"))
    assert pq.read_table(a / "clusters.parquet").equals(pq.read_table(b / "clusters.parquet"))


@pytest.mark.parametrize("selector", ["ssp", "random"])
def test_other_selectors_keep_the_target(selector, pool, tmp_path):
    config = PruneConfig(input=str(pool), stages=[selector], select=SelectConfig(target_size=1234, k=25))
    from dbp_lightning.store import EmbeddingStore
    result = prune(EmbeddingStore(pool), config)
    assert result.kept.sum() == 1234


def test_in_memory_array_and_non_normalised_rows_warn(rng):
    x = unit_rows(rng, 500, 16) * 3.0
    config = PruneConfig(input="memory", stages=["dbp"], select=SelectConfig(target_size=100, k=10, num_neighbors=3))
    with pytest.warns(UserWarning, match="not L2-normalised"):
        result = prune(x, config)
    assert result.kept.sum() == 100 and result.selection.column("key")[0].as_py() == "0"


@pytest.mark.parametrize("overrides, message", [
    ({"select.target_size": 10**6, "select.target_fraction": None}, "exceeds the 6,000 samples in the pool"),
    ({"select.k": 7000}, "select.k=7000 exceeds the 6,000 samples in the pool: set select.k"),
    ({"semdedup.k": 6001}, "semdedup.k=6001"),
    ({"select.temperature": 0.0}, "select.temperature must be > 0"),
    ({"stages": ["semdedup", "dpb"]}, "unknown stage 'dpb'"),
    ({"stages": ["dbp", "semdedup"]}, "order must be"),
    ({"clip_score.column": "nope"}, "no column 'nope'"),
    ({"semdedup.eps": None, "semdedup.target_fraction": None}, "exactly one of eps"),
])
def test_bad_config_refused_before_any_work(tmp_path, pool, capsys, overrides, message):
    assert main(["prune", "--config", str(write_config(tmp_path, pool, **overrides))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_nan_embeddings_and_duplicate_keys_refused(tmp_path, rng, capsys):
    x = unit_rows(rng, 100, 8)
    x[17, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    cfg = ["prune", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "run"),
           "--stages", "[dbp]", "--select.target_size", "10", "--select.k", "5", "--select.num_neighbors", "2"]
    assert main(cfg) == 2
    assert "row 17 has NaN" in capsys.readouterr().err
    x[17, 3] = 0.5
    np.save(tmp_path / "x.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    pq.write_table(pa.table({"key": ["a"] * 2 + [f"k{i}" for i in range(98)]}), tmp_path / "meta.parquet")
    assert main(cfg + ["--metadata", str(tmp_path / "meta.parquet")]) == 2
    assert "key 'a' occurs 2 times" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(cfg) == 0 and (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run" / "subset.npy").exists()  # no uids, no DataComp subset


def test_console_script_runs(tmp_path, pool):
    out = subprocess.run([sys.executable, "-m", "dbp_lightning.cli", "prune", "--config",
                          str(write_config(tmp_path, pool))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kept" in out.stdout


@pytest.mark.parametrize("preset", ["demo", "laion_dedup_280m", "datacomp_medium"])
def test_presets_parse_and_hold_the_papers_settings(preset):
    from pathlib import Path

    from dbp_lightning.cli import build_parser, prune_config

    parser = build_parser()
    path = Path(__file__).parents[1] / "configs" / "prune" / f"{preset}.yaml"
    config = prune_config(parser, parser.parse_args(["prune", "--config", str(path)])).validate()
    s = config.select
    assert (s.temperature, s.num_neighbors, s.balance_ratio) == (0.1, 20, 0.0)
    if preset == "laion_dedup_280m":
        assert s.k == 500 and config.semdedup.target_fraction == 0.63 and config.stages == ["semdedup", "dbp"]
    if preset == "datacomp_medium":
        assert s.k == 100 and config.semdedup.target_fraction == 0.8
        assert config.clip_score.column == "clip_l14_similarity_score" and 0.4 <= config.clip_score.fraction <= 0.5


def test_refusals_come_before_any_clustering(tmp_path, pool, capsys, monkeypatch):
    import dbp_lightning.pruning.pipeline as P

    def no_work(*args, **kwargs):
        raise AssertionError("k-means ran before the config was refused")

    monkeypatch.setattr(P, "spherical_kmeans", no_work)
    for overrides, message in [({"select.k": 7000}, "select.k=7000"),
                               ({"select.temperature": -1.0}, "temperature"),
                               ({"clip_score.column": "nope"}, "no column 'nope'")]:
        assert main(["prune", "--config", str(write_config(tmp_path, pool, **overrides))]) == 2
        assert message in capsys.readouterr().err


def test_selector_checks_name_the_survivors(pool):
    from dbp_lightning.store import EmbeddingStore

    config = PruneConfig(input="-", stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=20, eps=0.05, target_fraction=None),
                         select=SelectConfig(target_size=10, k=30, num_neighbors=5, min_per_cluster=1))
    with pytest.raises(ValueError, match=r"select.min_per_cluster=1 x select.k=30 exceeds the target of 10"):
        prune(EmbeddingStore(pool), config)


def test_input_array_is_not_modified_and_read_only_memmaps_work(tmp_path, rng):
    x = unit_rows(rng, 300, 8) * 2.0
    np.save(tmp_path / "x.npy", x)
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    config = PruneConfig(input="-", stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=5, target_fraction=0.9),
                         select=SelectConfig(target_size=100, k=8, num_neighbors=3))
    before = x.copy()
    with pytest.warns(UserWarning):
        a = prune(x, config)
    with pytest.warns(UserWarning):
        b = prune(ro, config)
    assert np.array_equal(x, before)
    assert a.selection.equals(b.selection)


def test_target_fraction_one_keeps_exact_duplicates(rng):
    from dbp_lightning.pruning import semdedup

    x = np.repeat(unit_rows(rng, 50, 16), 3, axis=0)
    keep = semdedup(x, np.zeros(150, int), rng.uniform(0, 1, 150), target_fraction=1.0)
    assert keep.all()


def test_non_datacomp_uids_skip_subset_with_a_reason(tmp_path, rng):
    from dbp_lightning.rundir import write_run

    x = unit_rows(rng, 200, 8)
    meta = pa.table({"key": [f"k{i}" for i in range(200)], "uid": [f"laion-{i}" for i in range(200)]})
    config = PruneConfig(input="-", stages=["random"], select=SelectConfig(target_size=50))
    result = prune(x, config, metadata=meta)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "subset.npy").write_bytes(b"stale")
    write_run(result, tmp_path / "run", config.to_dict(), "test")
    assert not (tmp_path / "run" / "subset.npy").exists()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "32 hex" in report["subset_npy"] and report["kept"] == 50
    assert (tmp_path / "run" / "selection.parquet").stat().st_mode & 0o044  # readable by others


def test_prune_on_an_array_needs_no_input_and_the_command_does(rng, capsys):
    result = prune(unit_rows(rng, 200, 8), PruneConfig(stages=["random"], select=SelectConfig(target_size=50)))
    assert result.report["kept"] == 50 and int(result.kept.sum()) == 50
    assert main(["prune", "--stages", "[random]", "--select.target_size", "50",
                 "--select.target_fraction", "null"]) == 2
    assert "input: give the pool: an embedding store, a .npy, or a DataComp" in capsys.readouterr().err


def test_identity_is_the_uid_when_keys_repeat_across_shards(rng):
    """WebDataset keys restart in every shard; uids do not. Prune checks the uid for
    uniqueness, points dup_of at uids, and refuses a repeated uid naming it."""
    x = unit_rows(rng, 60, 8)
    x[30:] = x[:30]  # every row of the second half duplicates one of the first
    keys = [f"{i % 30:06d}" for i in range(60)]  # two shards, the same keys in each
    uids = [f"{i:032x}" for i in range(60)]
    config = PruneConfig(input="memory", stages=["semdedup"],
                         semdedup=SemDeDupConfig(k=2, eps=0.001, target_fraction=None))
    sel = prune(x, config, metadata=pa.table({"key": keys, "uid": uids})).selection
    removed = sel.filter(pc.invert(sel.column("dedup_kept")))
    assert removed.num_rows == 30
    partners = removed.column("dup_of").to_pylist()
    assert set(partners) <= set(uids) and not set(partners) & set(removed.column("uid").to_pylist())
    for uid, partner in zip(removed.column("uid").to_pylist(), partners):
        assert abs(int(uid, 16) - int(partner, 16)) == 30  # the same row of the other shard
    with pytest.raises(ValueError, match=f"uid '{uids[0]}' occurs 2 times; the uid column"):
        prune(x, config, metadata=pa.table({"key": [str(i) for i in range(60)],
                                             "uid": [uids[0], *uids[:59]]}))
