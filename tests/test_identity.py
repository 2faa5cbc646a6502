"""One identity rule from shards to report: WebDataset keys restart in every shard (img2dataset
names samples by their index within the shard), uids do not. A pool whose keys repeat across
shards but whose uids are unique embeds, prunes, and shows its duplicates by uid."""

import csv
import json

import pyarrow.parquet as pq
import webdataset as wds

from dbp_lightning.cli import main
from wds_util import image_bytes

PER_SHARD = 10


def _uid(shard: int, i: int) -> str:
    return f"{shard:016x}{i:016x}"


def test_keys_repeating_across_shards_embed_prune_and_report_by_uid(tmp_path, capsys):
    root = tmp_path / "wds"
    root.mkdir()
    for shard in range(2):  # shard 1 re-crawled shard 0: the same pictures under the same keys
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                sink.write({"__key__": f"{i:09d}", "jpg": image_bytes(i),
                            "txt": f"picture {i} of shard {shard}".encode(),
                            "json": json.dumps({"uid": _uid(shard, i)}).encode()})
    store, run = tmp_path / "store", tmp_path / "run"
    assert main(["embed", "--shards", str(root), "--out", str(store), "--num_workers", "0",
                 "--encoder.model", "tiny-clip", "--encoder.random_init", "true"]) == 0
    assert main(["prune", "--input", str(store), "--output", str(run), "--stages", "[semdedup, random]",
                 "--semdedup.k", "2", "--semdedup.eps", "0.001", "--semdedup.target_fraction", "null",
                 "--select.target_fraction", "0.4"]) == 0, capsys.readouterr().err

    sel = pq.read_table(run / "selection.parquet").to_pylist()
    assert len(sel) == 2 * PER_SHARD and len({r["uid"] for r in sel}) == 2 * PER_SHARD
    assert len({r["key"] for r in sel}) == PER_SHARD
    removed = [r for r in sel if not r["dedup_kept"]]
    assert len(removed) == PER_SHARD  # one of each cross-shard pair
    for r in removed:  # its partner: the same key in the other shard, named by its uid
        shard, i = int(r["uid"][:16], 16), int(r["uid"][16:], 16)
        assert r["dup_of"] == _uid(1 - shard, i) and r["key"] == f"{i:09d}"

    with open(run / "dedup_pairs.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == PER_SHARD
    for p in pairs:  # the report found each sample of a pair by uid, not the first same key
        shard, i = int(p["removed_id"][:16], 16), int(p["removed_id"][16:], 16)
        assert p["removed_caption"] == f"picture {i} of shard {shard}"
        assert p["partner_caption"] == f"picture {i} of shard {1 - shard}"
        assert p["removed_key"] == p["partner_key"] == f"{i:09d}"
