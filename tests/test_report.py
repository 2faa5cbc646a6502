import csv
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import unit_rows
from wds_util import COLOURS, uid, write_shards

from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
from dbp_lightning.pruning.pipeline import prune
from dbp_lightning.report import write_report
from dbp_lightning.rundir import write_run

N, PER_STRIP, DUP_PAIRS = 60, 3, 8
SOURCES = [0, 0, 0, 3, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33]  # rows 45..59 copy these


class Page(HTMLParser):
    """The report's structure: images, cards (with the cluster/group they sit in), funnel rows."""

    def __init__(self):
        super().__init__()
        self.imgs, self.cards, self.stages, self.groups, self.clusters = [], [], [], [], []
        self.where, self.depth, self.text = None, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "div" and ("data-cluster" in a or "data-partner" in a):
            self.where = ("cluster", int(a["data-cluster"])) if "data-cluster" in a else ("group", a["data-partner"])
            (self.clusters if "data-cluster" in a else self.groups).append(self.where)
        if tag == "figure":
            self.cards.append({**a, "in": self.where})
        if tag == "tr" and "data-stage" in a:
            self.stages.append(a)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_shards(root / "wds", n_shards=3, per_shard=20)
    rng = np.random.default_rng(5)
    x = unit_rows(rng, N, 16)
    copies = x[SOURCES] + 0.005 * rng.standard_normal((len(SOURCES), 16)).astype(np.float32)
    x[45:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    meta = pa.table({"key": [f"{i:06d}" for i in range(N)], "uid": [uid(i) for i in range(N)]})
    config = PruneConfig(input="memory", stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=3, eps=0.01, target_fraction=None),
                         select=SelectConfig(target_fraction=0.5, k=4, num_neighbors=2))
    result = prune(x, config, metadata=meta)
    write_run(result, root / "run", config.to_dict(), "test")
    html = write_report(root / "run", str(root / "wds"), clusters_shown=3, per_strip=PER_STRIP,
                        pairs_shown=DUP_PAIRS, seed=1)
    page = Page()
    page.feed(html.read_text())
    return root / "run", html, page, result.selection.to_pandas().set_index("key")


def test_report_is_self_contained_and_has_every_thumbnail(run):
    run_dir, html, page, _ = run
    text = html.read_text()
    assert html == run_dir / "report.html"
    assert "src=\"http" not in text and "href=" not in text and "url(" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert "no image" not in text  # every shown sample was found in the shards
    # one <img> per card, plus the two plots
    assert len(page.imgs) == len(page.cards) + 2
    # every card's caption is its sample's caption from the shards
    for card in page.cards:
        i = int(card["data-key"])
        assert card["title"] == f"a {COLOURS[i % 8]} picture number {i}"


def test_funnel_numbers_are_report_json(run):
    run_dir, _, page, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    expected = [("pool", "", str(report["pool"]))] + [
        (s["stage"], str(s["in"]), str(s["out"])) for s in report["stages"]]
    assert [(s["data-stage"], s["data-in"], s["data-out"]) for s in page.stages] == expected


def test_cluster_strips_are_the_most_and_least_prototypical_members(run):
    _, _, page, sel = run
    assert len(page.clusters) == 3 and len({c for _, c in page.clusters}) == 3
    for where in page.clusters:
        keys = [c["data-key"] for c in page.cards if c["in"] == where]
        members = sel[sel["cluster"] == where[1]].sort_values("sim_to_centroid", ascending=False)
        n_top = min(PER_STRIP, len(members))
        top, rest = members.index[:n_top], members.index[n_top:]
        assert keys == list(top) + list(rest[::-1][:PER_STRIP])
        for c in page.cards:
            if c["in"] == where:  # kept marked as the selection says
                assert ("kept" in c["class"].split()) == bool(sel.loc[c["data-key"], "kept"])


def test_removed_pairs_are_real_and_match_the_csv(run):
    run_dir, _, page, sel = run
    pairs = [c for c in page.cards if "data-pair" in c]
    removed = sel[~sel["dedup_kept"]]
    assert len(removed) == len(SOURCES)  # the planted copies and nothing else
    assert len(pairs) == DUP_PAIRS
    assert [int(c["data-pair"]) for c in pairs] == list(range(1, DUP_PAIRS + 1))
    for c in pairs:
        assert not sel.loc[c["data-key"], "dedup_kept"]
        assert c["data-partner"] == sel.loc[c["data-key"], "dup_of"] == c["in"][1]
    # each group shows its partner first, then its removed samples, and groups are not split
    for n, where in enumerate(page.groups):
        cards = [c for c in page.cards if c["in"] == where]
        assert cards[0]["data-id"] == where[1] and "data-pair" not in cards[0]
        group_size = (removed["dup_of"] == where[1]).sum()
        if n < len(page.groups) - 1:  # only the last group is cut short by DUP_PAIRS
            assert len(cards) - 1 == min(PER_STRIP, group_size)
    assert len({g for g in page.groups}) == len(page.groups)
    with open(run_dir / "dedup_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["pair"]), r["removed_key"], r["removed_id"], r["partner_id"]) for r in rows] == [
        (int(c["data-pair"]), c["data-key"], c["data-id"], c["data-partner"]) for c in pairs]
    for r in rows:
        assert float(r["similarity"]) == pytest.approx(sel.loc[r["removed_key"], "dup_sim"], abs=1e-6)
        i, j = int(r["removed_key"]), int(r["partner_key"])
        assert (r["removed_caption"], r["partner_caption"]) == (
            f"a {COLOURS[i % 8]} picture number {i}", f"a {COLOURS[j % 8]} picture number {j}")
    # the planted copies' partners are their sources or other copies of them
    for r in rows:
        source = {k: SOURCES[k - 45] if k >= 45 else k for k in range(N)}
        assert source[int(r["removed_key"])] == source[int(r["partner_key"])]


def test_sections_without_their_columns_are_skipped(tmp_path):
    write_shards(tmp_path / "wds", n_shards=1, per_shard=10)
    meta = pa.table({"key": [f"{i:06d}" for i in range(10)]})
    config = PruneConfig(input="memory", stages=["random"], select=SelectConfig(target_size=4))
    write_run(prune(unit_rows(np.random.default_rng(0), 10, 8), config, metadata=meta),
              tmp_path / "run", config.to_dict(), "test")
    page = Page()
    page.feed(write_report(tmp_path / "run", str(tmp_path / "wds")).read_text())
    assert sum("Skipped" in t for t in page.text) == 4  # two plots, clusters, SemDeDup
    assert page.imgs == [] and not (tmp_path / "run" / "dedup_pairs.csv").exists()
    assert [s["data-out"] for s in page.stages] == ["10", "4"]
    assert pq.read_table(tmp_path / "run" / "selection.parquet").num_rows == 10


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH to render the page")
def test_chromium_renders_a_non_blank_page(run, tmp_path):
    _, html, _, _ = run
    script = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.py"
    proc = subprocess.run([sys.executable, str(script), str(html), "--out", str(tmp_path / "shot.png"),
                           "--window-size", "1280,2000"], check=False, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
