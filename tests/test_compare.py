"""``dbp-lightning compare`` end to end on a small real pool, and its config checks."""

import csv
import json
import os

import pytest
import yaml

from dbp_lightning.cli import main
from dbp_lightning.compare import CompareConfig, RecipeConfig, SubsetSpec, _steps


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from dbp_lightning.data.demo import DemoSpec, build_demo

    out = tmp_path_factory.mktemp("demo_data")
    built = build_demo(out, DemoSpec(max_per_source=40), workers=1)
    return out, built["train_samples"]


def _config(tmp_path, data, **overrides) -> str:
    cfg = {"pool": str(data / "train"), "eval_root": str(data / "eval"), "tasks": ["demo"],
           "out": str(tmp_path / "cmp"), "cache_dir": str(tmp_path / "cache"),
           "image_encoder": {"kind": "efficientnet_lite0", "model": "efficientnet-lite0", "image_size": 64},
           "text_encoder": {"kind": "sentence_transformers", "model": "minilm", "modality": "text"},
           "filters": ["semdedup"],
           "prune": {"semdedup": {"k": 4, "target_fraction": 0.9}, "select": {"k": 4, "num_neighbors": 2}},
           "subsets": ["full", "random-0.5", "dbp-0.5"],
           "recipe": {"batch_size": 8, "samples_seen": 64, "warmup_steps": 2},
           "seeds": [0, 1], "num_workers": 1, **overrides}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_compare_end_to_end(tmp_path, demo_data, capsys):
    data, pool = demo_data
    config = _config(tmp_path, data)
    assert main(["compare", "--config", config]) == 0
    assert "6/6 runs finished" in capsys.readouterr().out
    out = tmp_path / "cmp"
    runs = {(r["subset"], r["seed"]): r for r in json.loads((out / "compare_results.json").read_text())["runs"]}
    assert set(runs) == {(s, seed) for s in ("full", "random-0.5", "dbp-0.5") for seed in (0, 1)}
    assert {r["samples_seen"] for r in runs.values()} == {64}  # the same budget for every model
    assert runs["full", 0]["train_pairs"] == pool
    for method in ("random", "dbp"):
        r = runs[f"{method}-0.5", 0]
        assert r["train_pairs"] == round(0.5 * pool)
        assert [s["stage"] for s in r["prune_report"]["stages"]] == ["semdedup", method]
        assert all(v is None or 0 <= v <= 1 for v in r["metrics"].values())
    rows = list(csv.DictReader(open(out / "compare_results.csv")))
    assert len(rows) == 6 and rows[0]["average"]
    table = (out / "compare_results.md").read_text()
    assert table.count("\n") == 2 + 3 and "±" in table
    assert (out / "compare.png").stat().st_size > 10_000

    # a rerun reuses every finished run; a deleted one comes back identical (deterministic)
    done = out / "runs" / "dbp-0.5" / "seed1" / "result.json"
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/result.json")}
    before = json.loads(done.read_text())
    done.unlink()
    assert main(["compare", "--config", config, "--only", "[dbp-0.5]"]) == 0
    assert json.loads(done.read_text())["metrics"] == before["metrics"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != done)
    # new held-out data makes the results stale: the runs are redone
    tar = data / "eval" / "wds_demo-retrieval_test" / "test" / "0.tar"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 1))
    random_done = out / "runs" / "random-0.5" / "seed0" / "result.json"
    assert main(["compare", "--config", config, "--only", "[random-0.5]"]) == 0
    assert random_done.stat().st_mtime_ns != stamps[random_done]
    # so does a file beside the split (class names, dataset type): clip_benchmark reads them
    # there, not inside the split. Without Debian's data the demo has only its retrieval task.
    beside = sorted((data / "eval").glob("*/*.txt"), key=lambda p: p.name != "classnames.txt")[0]
    os.utime(beside, ns=(beside.stat().st_atime_ns, beside.stat().st_mtime_ns + 1))
    refreshed = random_done.stat().st_mtime_ns
    assert main(["compare", "--config", config, "--only", "[random-0.5]"]) == 0
    assert random_done.stat().st_mtime_ns != refreshed
    # --collect runs nothing and reports what has finished
    (out / "runs" / "full" / "seed0" / "result.json").unlink()
    assert main(["compare", "--config", config, "--collect", "true"]) == 0
    assert "5/6 runs finished" in capsys.readouterr().out


def test_compare_refuses_bad_input(tmp_path, demo_data, capsys):
    data, pool = demo_data
    assert main(["compare", "--config", _config(tmp_path, data), "--only", "[dbp-0.3]"]) == 2
    assert "--only: no subset 'dbp-0.3'" in capsys.readouterr().err
    assert main(["compare", "--config", _config(tmp_path, data, subsets=["dbp"])]) == 2
    assert "subsets: 'dbp' is not" in capsys.readouterr().err
    assert main(["compare", "--config", _config(tmp_path, data, tasks=["nope"])]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    # scored on cached features: classification and retrieval only, refused before any training
    assert main(["compare", "--config", _config(tmp_path, data, tasks=["demo", "wilds/iwildcam"])]) == 2
    assert "tasks: wilds/iwildcam need the full evaluation" in capsys.readouterr().err
    # a subset smaller than one batch is refused before training, naming it
    config = _config(tmp_path, data, subsets=["random-0.5"], recipe={"batch_size": pool})
    assert main(["compare", "--config", config]) == 2
    assert "random-0.5 keeps" in capsys.readouterr().err


@pytest.mark.parametrize("name,method,fraction", [("full", "full", 1.0), ("dbp-0.5", "dbp", 0.5),
                                                   ("semdedup-0.85", "semdedup", 0.85)])
def test_subset_names_round_trip(name, method, fraction):
    spec = SubsetSpec.parse(name)
    assert (spec.method, spec.fraction, spec.name) == (method, fraction, name)


@pytest.mark.parametrize("bad", ["full-0.5", "dbp-0", "dbp-1.5", "kmeans-0.5", "dbp-x"])
def test_subset_names_refused(bad):
    with pytest.raises(ValueError, match="subsets"):
        SubsetSpec.parse(bad)


def test_budget_steps():
    assert _steps(RecipeConfig(batch_size=10, samples_seen=1000), pool_size=500, subset_size=100) == 100
    assert _steps(RecipeConfig(batch_size=10), pool_size=500, subset_size=100) == 500  # 10 passes over the pool
    assert _steps(RecipeConfig(batch_size=10, budget="epochs", epochs=3), pool_size=500, subset_size=100) == 30
    with pytest.raises(ValueError, match="recipe.budget"):
        CompareConfig(pool="p", eval_root="e", recipe=RecipeConfig(budget="flops")).validate()


def test_compare_clip_score_subset(tmp_path, demo_data):
    """With a CLIP image encoder the store carries scores, so the clip_score subset runs."""
    data, pool = demo_data
    config = _config(tmp_path, data, subsets=["clip_score-0.5"], seeds=[0],
                     image_encoder={"kind": "open_clip", "model": "tiny-clip", "modality": "image",
                                    "random_init": True})
    assert main(["compare", "--config", config]) == 0
    run = json.loads((tmp_path / "cmp" / "runs" / "clip_score-0.5" / "seed0" / "result.json").read_text())
    assert [s["stage"] for s in run["prune_report"]["stages"]] == ["clip_score"]
    assert run["train_pairs"] == round(0.5 * pool)
