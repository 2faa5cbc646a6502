"""Distributed prune: one process against 2 gloo processes under torchrun, on the same pool.

The pool and the pipeline are ``bench_scale.py``'s (synthetic float16 store; SemDeDup with two
partitions of N / 1,000 cells, eps 0.05; DBP k = 500, keep 60 %). Each setting runs ``repeats``
times in its own process(es); the table gives the median wall seconds of the command and of each
stage (from ``report.json``, timed on rank 0), the peak RSS of the largest process, the ratio to
the baseline (one process on every core), and whether the selection's bytes equal the
baseline's.

    python benchmarks/bench_distributed.py                 # 1M samples, 3 repeats
    python benchmarks/bench_distributed.py --n 200000 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import DBP_K, EPS, KEEP, ROWS_PER_DEDUP_CELL, write_store  # noqa: E402

DETERMINISTIC = ("selection.parquet", "clusters.parquet", "subset.npy")


def prune_args(store: Path, out: Path, n: int) -> list[str]:
    return ["prune", "--input", str(store), "--output", str(out), "--stages", "[semdedup, dbp]",
            "--semdedup.k", str(n // ROWS_PER_DEDUP_CELL), "--semdedup.eps", str(EPS),
            "--semdedup.target_fraction", "null", "--select.target_fraction", str(KEEP),
            "--select.k", str(DBP_K)]


def run(setting: dict, store: Path, out: Path, n: int) -> dict:
    launcher = [sys.executable, "-m", "dbp_lightning.cli"]
    if setting["processes"] > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(setting["processes"]), "-m", "dbp_lightning.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(setting["threads"])}
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *launcher, *prune_args(store, out, n)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{setting['name']} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    digest = hashlib.sha256(b"".join((out / f).read_bytes() for f in DETERMINISTIC)).hexdigest()
    return {"wall": wall, "rss_gb": int(proc.stderr.strip().splitlines()[-1]) / 2**20,
            "stages": {s["stage"]: s["seconds"] for s in report["stages"]}, "digest": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench_scale")
    args = ap.parse_args()
    work = Path(args.workdir)
    store = work / f"pool_{args.n}"
    write_store(store, args.n)
    cores = os.cpu_count()
    settings = [{"name": f"1 process x {cores} threads (baseline)", "processes": 1, "threads": cores},
                {"name": "1 process x 1 thread", "processes": 1, "threads": 1},
                {"name": f"{cores} processes x 1 thread (torchrun, gloo)", "processes": cores,
                 "threads": 1}]
    rows = []
    for s in settings:
        runs = [run(s, store, work / f"dist_run_{s['processes']}x{s['threads']}", args.n)
                for _ in range(args.repeats)]
        med = {"wall": statistics.median(r["wall"] for r in runs),
               "rss_gb": statistics.median(r["rss_gb"] for r in runs),
               "stages": {k: statistics.median(r["stages"][k] for r in runs) for k in runs[0]["stages"]},
               "digests": {r["digest"] for r in runs}}
        rows.append((s, med))
        print(f"{s['name']}: {med['wall']:.1f} s", flush=True)

    base = rows[0][1]
    print(f"\nprune of {args.n:,} x 256 float16 on {cores} cores; median of {args.repeats} runs\n")
    print("| setting | wall (s) | semdedup (s) | dbp (s) | peak RSS, largest process (GiB) "
          "| wall vs baseline | selection = baseline |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for s, m in rows:
        same = "yes" if m["digests"] == base["digests"] and len(m["digests"]) == 1 else "NO"
        print(f"| {s['name']} | {m['wall']:.1f} | {m['stages']['semdedup']:.1f} | {m['stages']['dbp']:.1f} "
              f"| {m['rss_gb']:.2f} | {m['wall'] / base['wall']:.2f}x | {same} |")


if __name__ == "__main__":
    main()
