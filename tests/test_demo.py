import json

from dbp_lightning.cli import main
from test_report import Page


def test_demo_end_to_end_on_a_small_pool(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max_per_source", "40", "--passes", "2",
                 "--k", "5", "--batch_size", "16", "--num_workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| dbp-0.5 |" in printed and "report.html" in printed
    results = json.loads((out / "compare_results.json").read_text())
    runs = {r["subset"]: r for r in results["runs"]}
    full, dbp = runs["full"], runs["dbp-0.5"]
    pool = json.loads((out / "data" / "demo_data.json").read_text())["train_samples"]
    assert full["samples_seen"] == dbp["samples_seen"] >= 2 * pool - 16  # equal training budget
    assert full["train_pairs"] == pool and dbp["train_pairs"] == round(0.5 * pool)
    assert [s["stage"] for s in dbp["prune_report"]["stages"]] == ["semdedup", "dbp"]
    # a task per set of held-out data that was built: without Debian's packages, retrieval alone
    tasks_built = len(list((out / "data" / "eval").glob("wds_*")))
    for r in (full, dbp):
        assert r["available"] == f"{tasks_built}/3"
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["metrics"].values())
    html = (out / "report.html").read_text()
    page = Page()
    page.feed(html)
    assert [st["data-stage"] for st in page.stages] == ["pool", "semdedup", "dbp"]
    assert page.clusters and len(page.imgs) >= 10 and 'src="http' not in html
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
