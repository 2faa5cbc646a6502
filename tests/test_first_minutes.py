"""The newcomer's first minutes: help that explains every option, a cheap import, the public
names at the top, defaults checked against the pool before any work, honest averages."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dbp_lightning import config as config_module
from dbp_lightning.cli import LIGHTNING_COMMANDS, build_parser, main
from dbp_lightning.config import (EncoderConfig, PruneConfig, SelectConfig, SemDeDupConfig,
                                  check_pool_size, default_workers)
from dbp_lightning.data.shards import count_pool, count_samples
from dbp_lightning.evaluation.aggregate import aggregate, label
from dbp_lightning.evaluation.tasks import TASKS
from wds_util import write_shards

SUBCOMMANDS = ["embed", "import", "prune", "eval", "compare", "demo", "data synthetic", "data demo"]


def field_docs(cls) -> dict[str, str]:
    """Each field of the dataclass ``cls`` -> the docstring under it, read from the source."""
    tree = ast.parse(Path(config_module.__file__).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    docs = {}
    for field, doc in zip(body, body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


@pytest.mark.parametrize("cls, prefix, argv", [
    (PruneConfig, "", ["prune"]), (SemDeDupConfig, "semdedup.", ["prune"]),
    (SelectConfig, "select.", ["prune"]), (EncoderConfig, "encoder.", ["embed"]),
])
def test_every_option_has_its_explanation_in_help(capsys, cls, prefix, argv):
    docs = field_docs(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert sorted(docs) == sorted(fields), f"{cls.__name__}: fields without a docstring"
    text = help_text(capsys, argv)
    for name, doc in docs.items():
        assert f"--{prefix}{name}" in text
        assert doc in text, f"--{prefix}{name}: its docstring is not in {' '.join(argv)} --help"


@pytest.mark.parametrize("argv", [c.split() for c in SUBCOMMANDS])
def test_every_subcommand_help_explains_its_options(capsys, argv):
    text = help_text(capsys, argv).split(" options: ", 1)[1]  # past the usage line
    entries = [m for m in (re.match(r"(--[a-z_.]+) [A-Z_]+ (.*?)\(type:", chunk)
                           for chunk in re.split(r" (?=--[a-z_.]+ [A-Z_]+ )", text)) if m]
    assert len(entries) >= 3, f"{' '.join(argv)} --help lists no typed option"
    bare = [m.group(1) for m in entries if not m.group(2).strip()]
    assert not bare, f"{' '.join(argv)} --help: options without an explanation: {bare}"


def test_top_level_help_lists_every_subcommand_and_version(capsys):
    text = help_text(capsys, [])
    for command in [*LIGHTNING_COMMANDS, "embed", "import", "prune", "eval", "compare", "demo", "data"]:
        assert re.search(rf"\b{command}\b \S", text), f"{command} missing from dbp-lightning --help"
    with pytest.raises(SystemExit):
        main(["--version"])
    from dbp_lightning import __version__
    assert capsys.readouterr().out.strip() == f"dbp-lightning {__version__}"


def test_fit_help_explains_the_datamodule_options(capsys):
    text = help_text(capsys, ["fit"])
    assert text.startswith("usage: dbp-lightning [options] fit ")
    assert "--data.num_workers" in text and "dataloader workers (each streams its own shards)" in text
    assert "--data.prune.help" in text  # the nested config's options, one flag away:
    with pytest.raises(SystemExit):
        main(["fit", "--data.prune.help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data.prune.semdedup.k K cells of the dedup partition" in text


def test_import_is_cheap_and_public_names_load_lazily():
    code = ("import sys, dbp_lightning; from dbp_lightning import PruneConfig;"
            "from dbp_lightning.cli import main\n"
            "try: main(['prune', '--help'])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False", "import or prune --help loaded torch"
    import dbp_lightning

    names = {"DBPDataModule", "CLIPModule", "ZeroShotCallback", "PruneConfig", "prune"}
    assert names <= set(dir(dbp_lightning))
    from dbp_lightning import CLIPModule, DBPDataModule, ZeroShotCallback, prune  # noqa: F401
    from dbp_lightning.pruning.pipeline import prune as pipeline_prune
    assert prune is pipeline_prune
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dbp_lightning.nope  # noqa: B018


def test_shard_sample_counts_from_headers_and_img2dataset_stats(tmp_path):
    shards = write_shards(tmp_path / "pool", n_shards=3, per_shard=7)
    assert [count_samples(s) for s in shards] == [7, 7, 7]
    assert count_pool(shards) == (21, True)
    assert count_pool(shards, at_least=5) == (7, True)  # one shard told enough
    n, exact = count_pool(shards, scan=1)  # headers of one shard read, the rest estimated by bytes
    assert not exact and abs(n - 21) <= 2
    Path(shards[1]).with_name(Path(shards[1]).stem + "_stats.json").write_text(json.dumps({"successes": 5}))
    assert count_samples(shards[1]) == 5 and count_pool(shards) == (19, True)
    gz = tmp_path / "pool" / "shard-00009.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(shards[0], arcname="x.tar")
    assert count_samples(str(gz)) is None
    n, exact = count_pool([*shards, str(gz)])
    assert not exact and n >= 19  # the compressed shard estimated from the others' samples per byte


def test_pool_too_small_for_a_default_is_refused_before_embedding(tmp_path):
    from dbp_lightning.datamodule import DBPDataModule

    write_shards(tmp_path / "pool", n_shards=2, per_shard=10)
    with pytest.raises(ValueError, match=r"semdedup.k=1000 exceeds the 20 samples in the pool's 2 shards: "
                                         r"set semdedup.k to at most 20"):
        DBPDataModule(str(tmp_path / "pool"), cache_dir=str(tmp_path / "cache"),
                      prune=PruneConfig(select=SelectConfig(target_fraction=0.5, k=5, num_neighbors=2)))
    with pytest.raises(ValueError, match="select.k=500 exceeds the 20 samples"):
        DBPDataModule(str(tmp_path / "pool"), cache_dir=str(tmp_path / "cache"),
                      prune=PruneConfig(semdedup=SemDeDupConfig(k=4), select=SelectConfig(target_fraction=0.5)))
    assert not (tmp_path / "cache").exists(), "something was embedded before the check"
    dm = DBPDataModule(str(tmp_path / "pool"), cache_dir=str(tmp_path / "cache"),
                       prune=PruneConfig(semdedup=SemDeDupConfig(k=4), select=SelectConfig(target_fraction=0.5, k=5, num_neighbors=2)))
    assert 1 <= dm.num_workers <= default_workers()


def test_check_pool_size_names_what_to_set():
    config = PruneConfig(stages=["semdedup", "random"], select=SelectConfig(target_size=50))
    with pytest.raises(ValueError, match="select.target_size=50 exceeds the 40 samples in the pool: set a smaller"):
        check_pool_size(dataclasses.replace(config, semdedup=SemDeDupConfig(k=4)), 40)
    check_pool_size(dataclasses.replace(config, semdedup=SemDeDupConfig(k=4)), 50)  # random needs no k


def test_default_workers_never_exceed_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 4


def test_partial_averages_say_how_many_tasks_they_cover():
    one = aggregate({TASKS[0].name: 0.5})
    assert label("Average", one) == "Average over 1 of 38 tasks"
    full = aggregate({t.name: 0.5 for t in TASKS})
    assert label("Average", full) == "Average" and label("VTAB", full) == "VTAB"
    vtab = [t for t in TASKS if t.group == "VTAB"]
    part = aggregate({vtab[0].name: 0.1, vtab[1].name: 0.3})
    assert label("VTAB", part) == f"VTAB, 2 of {len(vtab)} tasks"
    from dbp_lightning.evaluation.run import format_table

    rows = [{"dataset": vtab[0].name, "key": vtab[0].key, "status": "ok", "metrics": {"main_metric": 0.1}}]
    table = format_table(rows, aggregate({vtab[0].name: 0.1}))
    assert "| **Average over 1 of 38 tasks** | mean | 0.1000 |" in table
    assert "**Average** |" not in table and "ImageNet**" not in table


def test_build_parser_knows_every_command():
    parser = build_parser()
    assert parser.parse_args(["data", "synthetic", "--out", "x"]).data.kind == "synthetic"


def test_chance_levels_and_a_plot_that_does_not_stretch_a_small_difference(tmp_path):
    import numpy as np

    from dbp_lightning.evaluation.features import TaskFeatures, chance_level
    from dbp_lightning.plots import accuracy_vs_cost

    classes = TaskFeatures("classification", np.zeros((8, 4), np.float32), class_text=np.zeros((10, 3, 4), np.float32))
    pairs = TaskFeatures("retrieval", np.zeros((200, 4), np.float32), text=np.zeros((200, 4), np.float32))
    assert chance_level("acc1", classes) == 0.1 and chance_level("mean_per_class_recall", classes) == 0.1
    assert chance_level("acc5", classes) == 0.5
    assert chance_level("mean_recall@1", pairs) == 1 / 200 and chance_level("image_retrieval_recall@5", pairs) == 5 / 200
    summary = [{"method": m, "train_pairs": 100, "samples_seen": 1000, "average": (v, 0.0)}
               for m, v in (("full", 0.30), ("dbp", 0.32))]
    from dbp_lightning.plots import _pyplot

    plt = _pyplot()

    captured = {}
    original = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        captured["ax"] = axes[0][0]
        return fig, axes

    plt.subplots = spy
    try:
        accuracy_vs_cost(summary, ["average"], "samples_seen", tmp_path / "compare.png", chance={"average": 0.1})
    finally:
        plt.subplots = original
    assert (tmp_path / "compare.png").stat().st_size > 1000
    lo, hi = captured["ax"].get_ylim()
    assert lo <= 0.1 and hi - lo >= 0.2  # chance in view: 0.30 vs 0.32 is not the whole axis
    assert any(line.get_linestyle() == "--" for line in captured["ax"].get_lines())


def test_demo_sets_aside_results_of_other_data_and_never_touches_a_foreign_cache(tmp_path):
    from dbp_lightning.demo import _forget_other_data

    shared = tmp_path / "shared"  # --out naming a directory whose cache serves other runs
    (shared / "cache" / "embeddings-x").mkdir(parents=True)
    _forget_other_data(shared, "aaaa")
    assert (shared / "cache" / "embeddings-x").is_dir()
    assert (shared / "data_fingerprint.txt").read_text().strip() == "aaaa"

    demo = tmp_path / "demo"
    for d in ("cache/embeddings-y", "runs/full/seed0"):
        (demo / d).mkdir(parents=True)
    (demo / "data_fingerprint.txt").write_text("aaaa\n")
    _forget_other_data(demo, "aaaa")  # same data: everything stays
    assert (demo / "cache" / "embeddings-y").is_dir()
    _forget_other_data(demo, "bbbb")  # other data: set aside, nothing deleted
    assert not (demo / "cache").exists() and not (demo / "runs").exists()
    assert (demo / "stale-aaaa" / "cache" / "embeddings-y").is_dir()
    assert (demo / "stale-aaaa" / "runs" / "full" / "seed0").is_dir()
    assert (demo / "data_fingerprint.txt").read_text().strip() == "bbbb"


@pytest.mark.parametrize("stages", [["semdedup", "dbp"], ["dbp"], ["semdedup", "random"], ["random"],
                                    ["semdedup", "ssp"], ["semdedup"]])
@pytest.mark.parametrize("select", [SelectConfig(target_fraction=0.5, k=30, num_neighbors=5),
                                    SelectConfig(target_size=70, target_fraction=None, k=30, num_neighbors=5)])
def test_pool_size_needed_is_the_smallest_pool_check_pool_size_accepts(stages, select):
    from dbp_lightning.config import pool_size_needed

    config = PruneConfig(stages=stages, semdedup=SemDeDupConfig(k=50), select=select)
    needed = pool_size_needed(config)
    check_pool_size(config, needed)  # the counting may stop there: enough
    if stages == ["random"] and select.target_size is None:
        assert needed == 0  # a fraction of any pool: nothing to check
        return
    with pytest.raises(ValueError, match="exceeds"):
        check_pool_size(config, needed - 1)
