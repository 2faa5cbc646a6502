"""Scale benchmark: ``prune`` out of core on synthetic float16 pools of growing size.

For each N, a clustered synthetic pool (Zipf-skewed concepts, 10 % planted near-duplicates) is
written as a float16 embedding store on disk (not timed), then ``dbp-lightning prune`` runs in
its own process: SemDeDup (two partitions of k = N / 1,000 cells, so a cell holds ~1,000 rows at
every N; eps 0.05) then DBP (k = 500, keep 60 %), with ``--memory_gb`` (default 1). Per stage:
wall seconds beside its FLOP floor (the stage's matrix products at the machine's measured
float32 GEMM rate), the peaks of anonymous and file-backed resident memory (RssAnon, RssFile),
and the scratch bytes SemDeDup's sort wrote. Overall: wall seconds and peak RSS of the whole
command. Fitted: time ~ N^b (least squares on log-log) and RssAnon = A + B N (bytes per
sample).

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


def run_prune(store: Path, out: Path, n: int, memory_gb: float, scratch_dir: str | None) -> dict:
    cmd = [sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(store), "--output", str(out),
           "--stages", "[semdedup, dbp]", "--semdedup.k", str(n // ROWS_PER_DEDUP_CELL),
           "--semdedup.eps", str(EPS), "--semdedup.target_fraction", "null",
           "--select.target_fraction", str(KEEP), "--select.k", str(DBP_K),
           "--memory_gb", str(memory_gb)] + (["--scratch_dir", scratch_dir] if scratch_dir else [])
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


def gemm_rate() -> float:
    """This machine's float32 GEMM rate, FLOP/s (median of 5 products of SemDeDup's cell size)."""
    a, b = np.random.default_rng(0).standard_normal((2, ROWS_PER_DEDUP_CELL, DIM)).astype(np.float32)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            a @ b.T  # two operands: NumPy computes a @ a.T as a half-cost SYRK
        times.append((time.perf_counter() - t) / 20)
    return 2 * ROWS_PER_DEDUP_CELL**2 * DIM / float(np.median(times))


def kmeans_flops(n: int, k: int, iters: int) -> float:
    """Matrix-product FLOPs of spherical k-means: ``iters`` Lloyd steps on 256 rows per centroid,
    then the assignment of all ``n`` rows."""
    return 2.0 * DIM * k * (iters * min(n, 256 * k) + n)


def stage_flops(n: int, report_stages: dict) -> dict[str, float]:
    """The FLOP floor of each stage: the products its algorithm must compute, nothing else.

    SemDeDup, per partition (two): the two-level partition's coarse and fine k-means (k1 =
    ceil(sqrt(k)) coarse cells, each split into ~k/k1) or the flat one, then every pair inside
    a cell once (n M d for cells of M rows: the lower triangle). DBP: its k-means with the
    iterations it ran."""
    from dbp_lightning.pruning.kmeans import FLAT_MAX_K

    k, niter = n // ROWS_PER_DEDUP_CELL, 10
    if k > FLAT_MAX_K:
        k1 = int(np.ceil(np.sqrt(k)))
        part = kmeans_flops(n, k1, niter) + k1 * kmeans_flops(n / k1, k / k1, niter)
    else:
        part = kmeans_flops(n, k, niter)
    dedup = 2 * (part + n * ROWS_PER_DEDUP_CELL * DIM)
    dbp = report_stages["dbp"]
    return {"semdedup": dedup, "dbp": kmeans_flops(dbp["in"], DBP_K, dbp["kmeans_iterations"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--workdir", default="/tmp/bench_scale")
    ap.add_argument("--memory_gb", type=float, default=1.0, help="prune's working memory budget")
    ap.add_argument("--scratch_dir", default=None, help="prune's scratch directory (default $TMPDIR)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rate = gemm_rate()
    print(f"float32 GEMM rate of this machine ({ROWS_PER_DEDUP_CELL} x {DIM} x {ROWS_PER_DEDUP_CELL}): "
          f"{rate / 1e9:.0f} GFLOP/s", flush=True)
    rows = []
    for n in args.sizes:
        store = work / f"pool_{n}"
        written = write_store(store, n)
        store_gb = sum(f.stat().st_size for f in store.glob("*.npy")) / 1e9
        r = run_prune(store, work / f"run_{n}", n, args.memory_gb, args.scratch_dir)
        r.update(store_gb=store_gb, write_s=written, floor=stage_flops(n, r["stages"]))
        rows.append(r)
        print(f"N={n:,}: {r['wall']:.1f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB "
              f"(store {store_gb:.2f} GB written in {written:.0f} s)", flush=True)

    print(f"\nmemory_gb {args.memory_gb}; floor = the stage's FLOPs at {rate / 1e9:.0f} GFLOP/s")
    print("| N | store (GB) | SemDeDup (s) | its floor (s) | scratch (GB) | DBP (s) | its floor (s) | "
          "prune command (s) | s per 1M | peak RSS (GiB) | RssAnon peak (GiB) | RssFile peak (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["stages"]
        print(f"| {r['n']:,} | {r['store_gb']:.2f} | {st['semdedup']['seconds']:.1f} | "
              f"{r['floor']['semdedup'] / rate:.1f} | {st['semdedup'].get('scratch_bytes', 0) / 1e9:.2f} | "
              f"{st['dbp']['seconds']:.1f} | {r['floor']['dbp'] / rate:.1f} | {r['wall']:.1f} | "
              f"{r['wall'] / r['n'] * 1e6:.1f} | {r['peak_rss_mb'] / 1024:.2f} | "
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
    # the extrapolation's exponents come from the two largest sizes: below 1,024,000 rows the
    # dedup partition is flat (its k-means costs N k d), above it two-level, the regime that scales
    b_last = {name: exponent(ns[-2:], [r["stages"][name]["seconds"] for r in rows[-2:]])
              for name in ("semdedup", "dbp")}
    print(f"between the two largest sizes: SemDeDup {b_last['semdedup']:.2f}, DBP {b_last['dbp']:.2f}")
    per_sample, fixed = np.polyfit(ns, [r["anon_mb"] * 2**20 for r in rows], 1)
    print(f"RssAnon peak = {fixed / 2**30:.2f} GiB + {per_sample:.0f} bytes x N (least squares over "
          f"{len(ns)} sizes)")
    extrapolate(rows[-1], b_last)


def extrapolate(last: dict, b: dict) -> None:
    """128M and 440M: this machine by the fitted exponents; 8 GPUs by FLOPs and bytes."""
    gpu_flops = 8 * 200e12   # sustained fp16 GEMM of 8 H100s, ~25 % of peak dense (named assumption)
    disk = 2e9               # bytes/s one node reads the store at (NVMe)
    print("\n| N | this machine, 2 cores (h) | 8 GPUs, one node (min) | store (GB) |")
    print("|---:|---:|---:|---:|")
    for n in (128_000_000, 440_000_000):
        cpu_h = sum(last["stages"][s]["seconds"] * (n / last["n"]) ** b[s] for s in ("semdedup", "dbp")) / 3600
        floor = stage_flops(n, {"dbp": {"in": int(n * last["stages"]["dbp"]["in"] / last["n"]),
                                        "kmeans_iterations": last["stages"]["dbp"]["kmeans_iterations"]}})
        flops = floor["semdedup"] + floor["dbp"]
        store = n * DIM * 2
        passes = 1 + 2 * 3 + 1  # validate; per partition: coarse assign, sort read + write; DBP
        gpu_min = (flops / gpu_flops + passes * store / disk) / 60
        print(f"| {n / 1e6:,.0f}M | {cpu_h:,.1f} | {gpu_min:,.1f} | {store / 1e9:,.0f} |")
    print("\nAssumptions: CPU time grows per stage from the largest measured N with the exponent "
          "between the two largest sizes. GPU: FLOPs of the k-means training, assignments and intra-cell similarities "
          "(stage_flops: both dedup partitions in two levels, every intra-cell pair once, DBP's "
          "k-means with the measured iterations) at 1.6 PFLOP/s sustained (8 H100, ~25 % of peak), "
          "plus 8 passes over the float16 store at 2 GB/s (validation; per partition the coarse "
          "assignment and the sort's read and write; DBP's assignment); the quota QP and the "
          "selection are O(N log N) host work, below a minute.")


if __name__ == "__main__":
    main()
