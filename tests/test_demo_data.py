import json

import webdataset as wds

from dbp_lightning.data.demo import DemoSpec, build_demo, clipart_caption, emoji_name


def test_emoji_names_come_from_unicode():
    assert emoji_name("1F44B") == "waving hand"
    assert emoji_name("1F44B-1F3FD") == "waving hand medium skin tone"
    assert emoji_name("E000") is None  # an OpenMoji extra has no Unicode name


def test_clipart_caption_uses_title_description_keywords_not_author(tmp_path):
    svg = tmp_path / "frog.svg"
    svg.write_text("""<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
      xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
      <metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>Green frog HASH(0x8a7c)</dc:title>
      <dc:description>A frog on a leaf</dc:description>
      <dc:subject><rdf:Bag><rdf:li>jane doe</rdf:li><rdf:li>animal</rdf:li><rdf:li>pond_life</rdf:li></rdf:Bag></dc:subject>
      <dc:creator><cc:Agent><dc:title>Jane Doe</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata>
      <rect width="10" height="10" fill="green"/></svg>""")
    assert clipart_caption(svg) == "Green frog : A frog on a leaf; animal, pond life"
    (tmp_path / "bare.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert clipart_caption(tmp_path / "bare.svg") is None


def test_demo_build_writes_shards_and_eval_sets(tmp_path, monkeypatch):
    import dbp_lightning.data.demo as demo

    monkeypatch.setattr(demo, "OPENCLIPART_ROOT", str(tmp_path / "no-openclipart"))
    monkeypatch.setattr(demo, "FASHION_MNIST_ROOT", str(tmp_path / "no-fmnist"))
    spec = DemoSpec(max_per_source=60, eval_fraction=0.2, shard_size=20)
    report = build_demo(tmp_path / "demo", spec, workers=1)
    assert report["left_out"] == {"openclipart": "apt-get install openclipart-svg",
                                  "fashion_mnist": "apt-get install dataset-fashion-mnist"}
    counts = report["sources"]["openmoji"]
    assert counts["train"] + counts["eval"] == 60 and 0 < counts["eval"] < 30
    tars = sorted((tmp_path / "demo" / "train").glob("*.tar"))
    assert len(tars) == report["train_shards"] == -(-counts["train"] // 20)
    samples = [s for t in tars for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)]
    assert len(samples) == counts["train"]
    meta = json.loads(samples[0]["json"])
    assert meta["source"] == "openmoji" and len(meta["uid"]) == 32 and samples[0]["png"][:4] == b"\x89PNG"
    assert all(s["txt"].decode() for s in samples)
    retrieval = tmp_path / "demo" / "eval" / "wds_demo-retrieval_test"
    assert (retrieval / "dataset_type.txt").read_text().strip() == "retrieval"
    held = [s for s in wds.WebDataset(str(retrieval / "test" / "0.tar"), shardshuffle=False, empty_check=False)]
    assert len(held) == counts["eval"] and not {s["__key__"] for s in held} & {s["__key__"] for s in samples}
    again = build_demo(tmp_path / "demo", spec, workers=1)  # a complete build is reused
    assert again == report


def test_demo_build_is_byte_identical_across_workers_and_runs(tmp_path):
    """Same spec, same bytes: tar members carry a fixed mtime, and every render starts from
    cairo's fresh state whichever worker draws it (its font cache once leaked between files)."""
    spec = DemoSpec(max_per_source=60)
    build_demo(tmp_path / "a", spec, workers=2)
    build_demo(tmp_path / "b", spec, workers=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(files) >= 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_demo_rebuild_with_another_spec_leaves_no_old_shard(tmp_path, monkeypatch):
    """A smaller build into the directory of a larger one is the smaller pool alone (the old
    shards once stayed beside it and the demo met each of their samples twice)."""
    import pytest

    import dbp_lightning.data.demo as demo

    monkeypatch.setattr(demo, "OPENCLIPART_ROOT", str(tmp_path / "no-openclipart"))
    monkeypatch.setattr(demo, "FASHION_MNIST_ROOT", str(tmp_path / "no-fmnist"))
    big = build_demo(tmp_path / "demo", DemoSpec(max_per_source=60, shard_size=10), workers=1)
    small = build_demo(tmp_path / "demo", DemoSpec(max_per_source=20, shard_size=10), workers=1)
    assert big["train_shards"] > small["train_shards"]
    tars = sorted((tmp_path / "demo" / "train").glob("*.tar"))
    assert len(tars) == small["train_shards"]
    keys = [s["__key__"] for t in tars for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)]
    assert len(keys) == small["sources"]["openmoji"]["train"] == len(set(keys))
    assert not [p.name for p in tmp_path.iterdir() if ".swap-" in p.name or ".old-" in p.name]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo build")
    with pytest.raises(ValueError, match="mine: not empty and holds no demo build"):
        build_demo(tmp_path / "mine", DemoSpec(max_per_source=20), workers=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a demo build"
