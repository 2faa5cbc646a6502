"""Import benchmark: a DataComp-layout pool (compressed ``.npz``) imported into a store and
pruned, against the same rows given as clip-retrieval ``.npy`` parts and pruned in place.

Pool (built once, not timed, cached under ``--work`` while ``--keep-work`` keeps it): ``--n``
clustered synthetic rows (``dbp_lightning.synthetic.pool_block``: Zipf-skewed concepts, 10 %
planted near-duplicates, unit norm) x 768-d float16, written twice:

- DataComp: ``--shards`` shards, each ``<stem>.parquet`` (``uid`` 32-hex, ``url``, ``text``,
  ``clip_l14_similarity_score``, ``clip_b32_similarity_score``) + ``<stem>.npz`` written with
  ``np.savez_compressed`` (``l14_img`` the rows, ``l14_txt`` a noisy copy);
- clip-retrieval: ``img_emb/img_emb_{N}.npy`` (~8 parts) + ``metadata/metadata_{N}.parquet``
  (the same columns, the same rows in the same order).

Measured, each command in its own process (wall seconds and that process's peak RSS, from
``getrusage(RUSAGE_CHILDREN)`` in a small shim that starts it):

1. ``dbp-lightning import --input DATACOMP --out STORE`` (rows/s = n / seconds);
2. ``dbp-lightning prune --input STORE``: SemDeDup (k = n / 1,000 cells, eps 0.05, as
   bench_scale.py) -> clip_score (``clip_l14_similarity_score``, top 80 %) -> DBP (k = 500, keep
   50 % of what enters it); per-stage seconds and peak RSS from the run's ``report.json``;
3. the same ``prune`` on the clip-retrieval folder in place (no import); the two runs must keep
   the same rows (``selection.parquet``'s ``kept``), which is checked and printed.

Baseline for the import's throughput: ``np.load`` of the ``l14_img`` of a few ``.npz`` shards in
this process (pure decompression, median rows/s over the shards), measured in the same run.
Ratios: import rows/s over that, and import + prune over the in-place prune.

    python benchmarks/bench_import.py                          # 2M rows, 256 shards
    python benchmarks/bench_import.py --n 100000 --shards 16   # a quick look

Without ``--keep-work`` the whole work directory (pool, store, runs) is removed after a
successful run; with it, a rerun reuses the built pool.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM, N_CONCEPTS, SEED = 768, 2000, 0
EPS, ROWS_PER_DEDUP_CELL = 0.05, 1000           # as bench_scale.py
CLIP_COLUMN, CLIP_FRACTION = "clip_l14_similarity_score", 0.8
KEEP, DBP_K = 0.5, 500
PARTS = 8                                        # clip-retrieval parts
BASELINE_SHARDS = 8                              # .npz shards np.load'ed for the baseline
BUILD_VERSION = 1                                # bump when the pool's content changes

# Runs a command, then writes {"rc", "seconds", "peak_rss_kib"} of that one child to argv[1].
SHIM = ("import json,resource,subprocess,sys,time\n"
        "t=time.perf_counter(); rc=subprocess.call(sys.argv[2:]); s=time.perf_counter()-t\n"
        "m=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "open(sys.argv[1],'w').write(json.dumps({'rc':rc,'seconds':s,'peak_rss_kib':m}))\n")


# --------------------------------------------------------------------------- the pool
def layout(n: int, shards: int) -> tuple[int, list[int], list[list[int]]]:
    """(rows per shard block, rows of each shard, shard indices of each clip-retrieval part)."""
    block = -(-n // shards)
    count = -(-n // block)
    rows = [min(block, n - i * block) for i in range(count)]
    parts = min(PARTS, count)
    bounds = [round(p * count / parts) for p in range(parts + 1)]
    return block, rows, [list(range(bounds[p], bounds[p + 1])) for p in range(parts)]


def shard_table(start: int, concept: np.ndarray, seed: int):
    import pyarrow as pa

    rows = len(concept)
    ids = range(start, start + rows)
    rng = np.random.default_rng([seed, 3, start])
    l14 = np.clip(rng.normal(0.3, 0.05, rows), -1, 1).astype(np.float32)
    b32 = np.clip(l14 + rng.normal(0, 0.02, rows), -1, 1).astype(np.float32)
    return pa.table({
        "uid": [hashlib.md5(f"dbp-bench-import-{i}".encode()).hexdigest() for i in ids],
        "url": [f"https://images.example.com/{i % 997}/{i:010d}.jpg" for i in ids],
        "text": [f"a photo of concept {c}, sample {i}" for i, c in zip(ids, concept)],
        CLIP_COLUMN: l14,
        "clip_b32_similarity_score": b32,
    })


def build_shard(job: tuple) -> int:
    """Write DataComp shard ``i`` and its rows of clip-retrieval part ``part`` (at ``offset``)."""
    import pyarrow.parquet as pq

    from dbp_lightning.synthetic import PoolSpec, pool_block

    i, n, block, dc_dir, part_path, offset = job
    spec = PoolSpec(n=n, dim=DIM, n_concepts=N_CONCEPTS, dup_fraction=0.1, block=block, seed=SEED)
    x, concept, _ = pool_block(spec, i)
    img = x.astype(np.float16)
    rng = np.random.default_rng([SEED, 4, i])
    txt = x + 0.8 * rng.standard_normal(x.shape, dtype=np.float32) / math.sqrt(DIM)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float16)
    stem = f"{i:08d}"
    tmp = Path(dc_dir) / f".{stem}.tmp.npz"
    np.savez_compressed(tmp, l14_img=img, l14_txt=txt)
    os.replace(tmp, Path(dc_dir) / f"{stem}.npz")
    pq.write_table(shard_table(i * block, concept, SEED), Path(dc_dir) / f"{stem}.parquet")
    part = np.load(part_path, mmap_mode="r+")
    part[offset:offset + len(img)] = img
    part.flush()
    del part
    return len(img)


def build_pool(root: Path, n: int, shards: int) -> tuple[Path, Path, float]:
    """The DataComp and clip-retrieval copies under ``root`` (reused when complete); seconds spent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dc, cr = root / "datacomp", root / "clip_retrieval"
    settings = {"version": BUILD_VERSION, "n": n, "shards": shards, "dim": DIM, "seed": SEED,
                "n_concepts": N_CONCEPTS, "parts": PARTS}
    marker = root / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return dc, cr, 0.0
    shutil.rmtree(root, ignore_errors=True)
    for d in (dc, cr / "img_emb", cr / "metadata"):
        d.mkdir(parents=True)
    t = time.perf_counter()
    block, rows, parts = layout(n, shards)
    jobs = []
    for p, members in enumerate(parts):
        path = cr / "img_emb" / f"img_emb_{p}.npy"
        total = sum(rows[i] for i in members)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(total, DIM)).flush()
        offset = 0
        for i in members:
            jobs.append((i, n, block, str(dc), str(path), offset))
            offset += rows[i]
    done, shown = 0, 0
    with mp.get_context("spawn").Pool(min(2, os.cpu_count() or 1)) as workers:
        for r in workers.imap_unordered(build_shard, jobs):
            done += r
            if done * 10 // n > shown or done == n:
                shown = done * 10 // n
                print(f"build: {done:,} / {n:,} rows, {time.perf_counter() - t:.0f} s", flush=True)
    for p, members in enumerate(parts):  # one part's metadata in memory at a time
        table = pa.concat_tables([pq.read_table(dc / f"{i:08d}.parquet") for i in members])
        pq.write_table(table, cr / "metadata" / f"metadata_{p}.parquet")
    marker.write_text(json.dumps(settings))
    return dc, cr, time.perf_counter() - t


def size_gb(path: Path, pattern: str) -> float:
    return sum(f.stat().st_size for f in path.rglob(pattern)) / 1e9


# --------------------------------------------------------------------------- measuring
def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in its own process (through the shim); wall seconds and its peak RSS."""
    result = log.with_suffix(".json")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", SHIM, str(result), *cmd], stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    r = json.loads(result.read_text())
    if r["rc"] != 0:
        tail = log.read_text()[-3000:]
        sys.exit(f"FAILED (exit {r['rc']}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return {"seconds": r["seconds"], "peak_gib": r["peak_rss_kib"] / 2**20}


def prune_cmd(source: Path, out: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "dbp_lightning.cli", "prune", "--input", str(source),
            "--output", str(out), "--stages", "[semdedup, clip_score, dbp]",
            "--semdedup.k", str(max(1, n // ROWS_PER_DEDUP_CELL)), "--semdedup.eps", str(EPS),
            "--semdedup.target_fraction", "null", "--clip_score.column", CLIP_COLUMN,
            "--clip_score.fraction", str(CLIP_FRACTION), "--select.target_fraction", str(KEEP),
            "--select.k", str(DBP_K)]


def decompress_baseline(dc: Path) -> dict:
    """np.load of l14_img from a few shards spread over the pool, in this process."""
    shards = sorted(dc.glob("*.npz"))
    picks = [shards[round(j * (len(shards) - 1) / max(1, BASELINE_SHARDS - 1))]
             for j in range(min(BASELINE_SHARDS, len(shards)))]
    rates, seconds, rows = [], 0.0, 0
    for npz in dict.fromkeys(picks):
        t = time.perf_counter()
        with np.load(npz) as z:
            a = z["l14_img"]
        s = time.perf_counter() - t
        rates.append(len(a) / s)
        seconds += s
        rows += len(a)
    return {"rows_per_s": float(np.median(rates)), "seconds": seconds, "rows": rows,
            "shards": len(rates)}


def same_rows(store: Path, cr: Path) -> bool:
    """Whether the imported store holds the clip-retrieval parts' rows, value for value."""
    from dbp_lightning.store import EmbeddingStore

    a = EmbeddingStore(store).embeddings
    parts = sorted((cr / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    start = 0
    for p in parts:
        b = np.load(p, mmap_mode="r")
        for s in range(0, len(b), 65536):
            if not np.array_equal(a[start + s:start + s + min(65536, len(b) - s)], b[s:s + 65536]):
                return False
        start += len(b)
    return start == len(a)


def compare_runs(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    sa, sb = pq.read_table(a / "selection.parquet"), pq.read_table(b / "selection.parquet")
    ka = sa.column("kept").to_numpy(zero_copy_only=False)
    kb = sb.column("kept").to_numpy(zero_copy_only=False)
    out = {"kept_equal": len(ka) == len(kb) and bool(np.array_equal(ka, kb)),
           "uid_equal": sa.column("uid").equals(sb.column("uid")),
           "table_equal": sa.equals(sb), "kept_a": int(ka.sum()), "kept_b": int(kb.sum())}
    if len(ka) == len(kb):
        out["kept_differ"] = int((ka != kb).sum())
    sub_a, sub_b = a / "subset.npy", b / "subset.npy"
    out["subset_equal"] = (sub_a.is_file() and sub_b.is_file()
                           and sub_a.read_bytes() == sub_b.read_bytes())
    return out


def hardware() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cores} cores ({model}), {mem:.0f} GiB RAM, load average {load} at start, "
            f"{datetime.date.today().isoformat()}, Python {platform.python_version()}, "
            f"NumPy {np.__version__}")


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2_000_000, help="rows of the pool")
    ap.add_argument("--shards", type=int, default=256, help="DataComp shards")
    ap.add_argument("--work", default="/tmp/dbp_bench_import", help="work directory (pool cache, store, runs)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work directory (a rerun reuses the built pool)")
    args = ap.parse_args()
    started = time.perf_counter()
    hw = hardware()
    work = Path(args.work)
    pool = work / f"pool_{args.n}_{args.shards}"
    dc, cr, built = build_pool(pool, args.n, args.shards)
    n_shards = len(list(dc.glob("*.npz")))
    print(f"pool: {args.n:,} x {DIM} float16; {n_shards} DataComp shards "
          f"({size_gb(dc, '*.npz'):.2f} GB .npz, l14_img + l14_txt), "
          f"{len(list((cr / 'img_emb').glob('*.npy')))} clip-retrieval parts "
          f"({size_gb(cr / 'img_emb', '*.npy'):.2f} GB .npy); "
          + (f"built in {built:.0f} s" if built else "reused from the cache"), flush=True)

    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    store, run_store, run_cr = runs / "store", runs / "prune_store", runs / "prune_clip_retrieval"
    cli = [sys.executable, "-m", "dbp_lightning.cli"]

    imp = measure(cli + ["import", "--input", str(dc), "--out", str(store)], runs / "import.log")
    print(f"import: {imp['seconds']:.1f} s, peak RSS {imp['peak_gib']:.2f} GiB", flush=True)
    logged = re.search(r"imported ([\d,]+) rows in ([\d.]+) s", (runs / "import.log").read_text())
    loop_s = float(logged.group(2)) if logged else None
    base = decompress_baseline(dc)
    print(f"np.load baseline: {base['rows_per_s']:,.0f} rows/s (median of {base['shards']} shards)",
          flush=True)
    identical_rows = same_rows(store, cr)
    pr_store = measure(prune_cmd(store, run_store, args.n), runs / "prune_store.log")
    print(f"prune (store): {pr_store['seconds']:.1f} s, peak RSS {pr_store['peak_gib']:.2f} GiB",
          flush=True)
    pr_cr = measure(prune_cmd(cr, run_cr, args.n), runs / "prune_clip_retrieval.log")
    print(f"prune (clip-retrieval, in place): {pr_cr['seconds']:.1f} s, "
          f"peak RSS {pr_cr['peak_gib']:.2f} GiB", flush=True)
    store_gb = size_gb(store, "*.npy")
    cmp = compare_runs(run_store, run_cr)
    reports = {k: json.loads((d / "report.json").read_text()) for k, d in
               (("store", run_store), ("cr", run_cr))}

    n = args.n

    def row(step, seconds, peak, ratio="", against="", rows=n, rate=None):
        rate = rows / seconds if rate is None and seconds and rows else rate
        rate = f"{rate:,.0f}" if rate else ""
        peak_s = f"{peak:.2f}" if peak is not None else ""
        return f"| {step} | {seconds:.1f} | {rate} | {peak_s} | {ratio} | {against} |"

    lines = ["| step | seconds | rows/s | peak RSS (GiB) | ratio | ratio is |",
             "|---|---:|---:|---:|---:|---|"]
    imp_rate = n / imp["seconds"]
    lines.append(row(f"np.load l14_img, {base['shards']} shards in-process (baseline)",
                     base["seconds"], None, "1.00", "median rows/s of the shards",
                     rate=base["rows_per_s"]))
    if loop_s:
        lines.append(row("import: its part loop (the importer's own log line)", loop_s, None,
                         f"{n / loop_s / base['rows_per_s']:.2f}", "loop rows/s / baseline rows/s"))
    lines.append(row("**import** DataComp .npz -> store (command)", imp["seconds"], imp["peak_gib"],
                     f"{imp_rate / base['rows_per_s']:.2f}", "import rows/s / baseline rows/s"))
    for key, label, whole in (("store", "prune store", pr_store), ("cr", "prune clip-retrieval in place", pr_cr)):
        stages = reports[key]["stages"]
        for st in stages:
            lines.append(row(f"{label}: {st['stage']} ({st['in']:,} -> {st['out']:,})",
                             st["seconds"], st["peak_rss_mb"] / 1024, rows=st["in"]))
        other = whole["seconds"] - sum(st["seconds"] for st in stages)
        lines.append(row(f"{label}: open, validate, write run", other, None))
        lines.append(row(f"**{label}** (command)", whole["seconds"], whole["peak_gib"]))
    total = imp["seconds"] + pr_store["seconds"]
    lines.append(row("**import + prune store**", total, max(imp["peak_gib"], pr_store["peak_gib"]),
                     f"{total / pr_cr['seconds']:.2f}", "seconds / in-place prune seconds"))

    print(f"\n{hw}")
    print(f"pool: {n:,} x {DIM} float16, {n_shards} DataComp shards (compressed .npz "
          f"{size_gb(dc, '*.npz'):.2f} GB incl. l14_txt), {len(list((cr / 'img_emb').glob('*.npy')))} "
          f"clip-retrieval parts ({size_gb(cr / 'img_emb', '*.npy'):.2f} GB), store "
          f"{store_gb:.2f} GB; prune: SemDeDup k = {max(1, n // ROWS_PER_DEDUP_CELL):,} eps {EPS} "
          f"-> clip_score {CLIP_COLUMN} top {CLIP_FRACTION:.0%} -> DBP k = {DBP_K} keep {KEEP:.0%}\n")
    print("\n".join(lines))
    print(f"\nimported store rows == clip-retrieval rows (every value): {'yes' if identical_rows else 'NO'}")
    if cmp["kept_equal"] and cmp["uid_equal"]:
        print(f"kept: identical ({cmp['kept_a']:,} rows, same uids in the same order); "
              f"whole selection.parquet equal: {'yes' if cmp['table_equal'] else 'no'}; "
              f"subset.npy equal: {'yes' if cmp['subset_equal'] else 'no'}")
    else:
        print("!" * 78)
        print(f"!!! KEPT DIFFERS between the store run and the in-place clip-retrieval run: "
              f"{cmp.get('kept_differ', 'row counts differ')} rows differ; kept {cmp['kept_a']:,} "
              f"vs {cmp['kept_b']:,}; uids equal: {cmp['uid_equal']}")
        print("!" * 78)
    print(f"total wall time (build included): {time.perf_counter() - started:.0f} s")
    if args.keep_work:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
