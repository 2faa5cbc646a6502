"""Memory of the training stream's keep test: a set of every kept id against ``KeptSamples``.

A synthetic store of N samples (32-hex uids, shards of 10,000) is pruned at random to keep 60 %;
then, each in a fresh process, the old way (a Python set of every kept uid, built from the
selection as ``DBPDataModule`` used to) and ``KeptSamples`` after it has answered one sample of
every shard. Reported: the growth of the process's RSS over the same process after imports and
the lookups per second over one shard's samples. Median of ``repeats`` fresh processes each.
Both answer every lookup alike (checked).

    python benchmarks/bench_keep.py                 # 2M samples
    python benchmarks/bench_keep.py --n 200000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SHARD = 10_000

CHILD = r"""
import json, os, sys, time
import numpy as np, pyarrow.parquet as pq
from dbp_lightning.data.keep import KeptSamples

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

store, run, way = sys.argv[1:]
names = [s["name"] for s in json.loads(open(f"{store}/manifest.json").read())["shards"]]
probe = pq.read_table(f"{store}/{names[-1]}.parquet", columns=["uid"]).column("uid").to_pylist()
base = rss()
if way == "set":
    sel = pq.read_table(f"{run}/selection.parquet", columns=["uid", "kept"])
    ids = np.asarray(sel.column("uid").to_pylist(), dtype=object)
    keep_set = set(ids[sel.column("kept").to_numpy()])
    del sel, ids
    test = lambda uid: uid in keep_set
else:
    kept = KeptSamples(store, run)
    for name in names:  # one shard at a time, as a stream reads them
        kept({"__url__": f"/pool/{name}.tar", "__id__": ""})
    test = lambda uid: kept({"__url__": f"/pool/{names[-1]}.tar", "__id__": uid})
grown = rss() - base
t = time.perf_counter()
hits = sum(test(u) for u in probe)
rate = len(probe) / (time.perf_counter() - t)
print(json.dumps({"bytes": grown, "rate": rate, "hits": hits}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench_keep")
    args = ap.parse_args()

    from dbp_lightning.cache import ensure_pruned
    from dbp_lightning.config import PruneConfig, SelectConfig
    from dbp_lightning.synthetic import PoolSpec, write_pool_store

    work = Path(args.workdir)
    store = work / f"pool_{args.n}"
    if not (store / "manifest.json").is_file():
        write_pool_store(store, PoolSpec(n=args.n, dim=8, n_concepts=10, block=SHARD), dtype="float16")
    run = ensure_pruned(work / "cache", store, PruneConfig(stages=["random"],
                                                           select=SelectConfig(target_fraction=0.6)),
                        progress=False)
    kept = round(0.6 * args.n)
    rows = {}
    for way in ("set", "KeptSamples"):
        out = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(store), str(run), way],
                                         capture_output=True, text=True, check=True).stdout)
               for _ in range(args.repeats)]
        assert len({o["hits"] for o in out}) == 1
        rows[way] = {"bytes": statistics.median(o["bytes"] for o in out),
                     "rate": statistics.median(o["rate"] for o in out), "hits": out[0]["hits"]}
    assert rows["set"]["hits"] == rows["KeptSamples"]["hits"]  # the same answers

    print(f"\n{args.n:,} samples, {kept:,} kept, shards of {SHARD:,}; median of {args.repeats} processes\n")
    print("| keep test | RSS growth (MB) | lookups/s |")
    print("|---|---:|---:|")
    for way, r in rows.items():
        print(f"| {way} | {r['bytes'] / 1e6:,.1f} | {r['rate']:,.0f} |")
    per = rows["set"]["bytes"] / kept
    print(f"\nset: {per:,.0f} bytes per kept id, {per * 1e8 / 1e9:,.1f} GB per process at 10^8 kept. "
          f"KeptSamples holds the kept column (1 byte per sample: {args.n / 1e6:,.1f} MB here, 0.1 GB "
          f"at 10^8) and one shard's ids; the rest of its growth is pyarrow's reader. "
          f"Ratio here: {rows['set']['bytes'] / max(rows['KeptSamples']['bytes'], 1):,.0f}x")

if __name__ == "__main__":
    main()
