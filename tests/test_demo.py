import json

from dbp_lightning.cli import main


def test_demo_end_to_end_on_a_small_pool(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max_per_source", "40", "--samples_seen", "256",
                 "--k", "5", "--batch_size", "32", "--num_workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| dbp |" in printed
    summary = json.loads((out / "demo_results.json").read_text())
    full, dbp = summary["results"]
    assert full["samples_seen"] == dbp["samples_seen"] == 256  # equal training budget
    assert dbp["train_samples"] < full["train_samples"] == summary["data"]["train_samples"]
    stages = [s["stage"] for s in dbp["prune_report"]["stages"]]
    assert stages == ["semdedup", "dbp"]
    for r in (full, dbp):
        assert r["available"] == "3/3" or r["available"] == "2/3"  # clip art needs Debian's package
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["metrics"].values())
