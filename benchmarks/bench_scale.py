"""Scale benchmark: ``prune`` out of core on synthetic float16 pools of growing size.

For each N, a clustered synthetic pool (Zipf-skewed concepts, 10 % planted near-duplicates) is
written as a float16 embedding store on disk (not timed), then ``dbp-lightning prune`` runs in
its own process: SemDeDup (two partitions of k = N / 1,000 cells, so a cell holds ~1,000 rows at
every N; eps 0.05) then DBP (k = 500, keep 60 %). Per stage: wall seconds and the process's
peak RSS, from ``report.json``; overall: wall seconds and peak RSS of the whole command. The
growth exponent b of time ~ N^b is fitted by least squares on log-log.

Last, an extrapolation to 128M and 440M samples, from the measured per-stage rates and the
fitted exponents (one node like this one) and from FLOP and byte counts (8 GPUs), with the
assumptions printed beside it.

    python benchmarks/bench_scale.py                       # 1M, 3M, 10M (the README's table)
    python benchmarks/bench_scale.py --sizes 200000 600000 # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM, KEEP, DBP_K, EPS, ROWS_PER_DEDUP_CELL = 256, 0.6, 500, 0.05, 1000


def write_store(path: Path, n: int) -> float:
    from dbp_lightning.synthetic import PoolSpec, write_pool_store

    if (path / "manifest.json").is_file():
        return 0.0
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    write_pool_store(path, PoolSpec(n=n, dim=DIM, n_concepts=2000, dup_fraction=0.1, seed=0),
                     dtype="float16", progress=True)
    return time.perf_counter() - t


def run_prune(store: Path, out: Path, n: int) -> dict:
    cmd = [sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(store), "--output", str(out),
           "--stages", "[semdedup, dbp]", "--semdedup.k", str(n // ROWS_PER_DEDUP_CELL),
           "--semdedup.eps", str(EPS), "--semdedup.target_fraction", "null",
           "--select.target_fraction", str(KEEP), "--select.k", str(DBP_K)]
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"prune failed at N={n}:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"n": n, "wall": wall, "peak_rss_mb": int(proc.stderr.strip().splitlines()[-1]) / 1024,
            "stages": {s["stage"]: s for s in report["stages"]}, "kept": report["kept"],
            "anon_mb": report.get("rss_anon_peak_mb") or 0.0, "file_mb": report.get("rss_file_peak_mb") or 0.0}


def exponent(ns, ts) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--workdir", default="/tmp/bench_scale")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        store = work / f"pool_{n}"
        written = write_store(store, n)
        store_gb = sum(f.stat().st_size for f in store.glob("*.npy")) / 1e9
        r = run_prune(store, work / f"run_{n}", n)
        r.update(store_gb=store_gb, write_s=written)
        rows.append(r)
        print(f"N={n:,}: {r['wall']:.1f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB "
              f"(store {store_gb:.2f} GB written in {written:.0f} s)", flush=True)

    print("\n| N | store (GB) | SemDeDup (s) | DBP (s) | prune command (s) | s per 1M | peak RSS (GiB) | "
          "peak RSS / store | RssAnon peak (GiB) | RssFile peak (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['store_gb']:.2f} | {r['stages']['semdedup']['seconds']:.1f} | "
              f"{r['stages']['dbp']['seconds']:.1f} | {r['wall']:.1f} | {r['wall'] / r['n'] * 1e6:.1f} | "
              f"{r['peak_rss_mb'] / 1024:.2f} | {r['peak_rss_mb'] / 1024 / (r['store_gb'] / 1.073741824):.2f} | "
              f"{r['anon_mb'] / 1024:.2f} | {r['file_mb'] / 1024:.2f} |")
    if len(rows) < 2:
        return
    ns = [r["n"] for r in rows]
    b = {name: exponent(ns, [r["stages"][name]["seconds"] for r in rows]) for name in ("semdedup", "dbp")}
    b["total"] = exponent(ns, [r["wall"] for r in rows])
    b_rss = exponent(ns, [r["peak_rss_mb"] for r in rows])
    print(f"\ngrowth exponents (time ~ N^b): SemDeDup {b['semdedup']:.2f}, DBP {b['dbp']:.2f}, "
          f"whole command {b['total']:.2f}; peak RSS ~ N^{b_rss:.2f}  (N log N over this range: "
          f"{exponent(ns, [n * np.log(n) for n in ns]):.2f})")
    extrapolate(rows[-1], b)


def extrapolate(last: dict, b: dict) -> None:
    """128M and 440M: this machine by the fitted exponents; 8 GPUs by FLOPs and bytes."""
    gpu_flops = 8 * 200e12   # sustained fp16 GEMM of 8 H100s, ~25 % of peak dense (named assumption)
    disk = 2e9               # bytes/s one node reads the store at (NVMe)
    print("\n| N | this machine, 2 cores (h) | 8 GPUs, one node (min) | store (GB) |")
    print("|---:|---:|---:|---:|")
    for n in (128_000_000, 440_000_000):
        cpu_h = sum(last["stages"][s]["seconds"] * (n / last["n"]) ** b[s] for s in ("semdedup", "dbp")) / 3600
        k_dedup = n // ROWS_PER_DEDUP_CELL
        flops = (2 * 2 * 10 * 256 * k_dedup * DIM          # dedup k-means: 2 passes x 10 iter on 256/centroid
                 + 2 * 2 * n * k_dedup * DIM                # dedup assignment of all rows, 2 passes
                 + 2 * 2 * n * ROWS_PER_DEDUP_CELL * DIM / 2  # intra-cell pairs, 2 passes
                 + 2 * 100 * 256 * DBP_K * DIM              # DBP k-means on its sample
                 + 2 * n * DBP_K * DIM)                     # DBP assignment
        store = n * DIM * 2
        passes = 2 + 2 + 1 + 1  # validate, assign x2, dedup reads, DBP assign
        gpu_min = (flops / gpu_flops + passes * store / disk) / 60
        print(f"| {n / 1e6:,.0f}M | {cpu_h:,.1f} | {gpu_min:,.1f} | {store / 1e9:,.0f} |")
    print("\nAssumptions: CPU time grows per stage with the exponent fitted above from the largest "
          "measured N. GPU: FLOPs of the k-means training, assignments and intra-cell similarities "
          "at 1.6 PFLOP/s sustained (8 H100, fp16, ~25 % of peak), plus 6 passes over the float16 "
          "store at 2 GB/s; the quota QP and selection are O(N log N) host work, below a minute.")


if __name__ == "__main__":
    main()
