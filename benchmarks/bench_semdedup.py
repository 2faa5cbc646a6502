"""Where one SemDeDup partition's time goes, and what the thread defaults are worth.

On a bench_scale store (``benchmarks/bench_scale.py`` writes them), times
``semdedup_passes(passes=1)``, the pipeline's SemDeDup for one partition, in a fresh process:

- with the thread defaults ``import dbp_lightning`` sets (idle OpenMP and OpenBLAS threads sleep),
  and with both pools' idle threads spinning (``OMP_WAIT_POLICY=ACTIVE``,
  ``OPENBLAS_THREAD_TIMEOUT=30``), each the median of ``--repeats``;
- with one worker for the cells (``pruning/threads.py``'s workers off: BLAS still threaded);
- once under cProfile on one worker (cProfile sees the main thread only), its time split into
  the named parts of the README's list;
- then parts alone: widening float16 (NumPy's kernel against torch's) and one fine k-means
  of a 10M pool's coarse-cell size, the RssAnon that ``import torch`` adds, a coarse cell
  widened into fresh memory and into a kept buffer, and 1 GB of scratch written and read back
  through the page cache and direct (in the store's directory).

Run at a given commit, the first row is that commit's time for one partition: the README's
per-change figures are that row at successive commits.

    python benchmarks/bench_semdedup.py --n 3000000   # the README's figures
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys

import numpy as np

#: cProfile "file:function" substrings (internal time) -> the part of the README's list
PARTS = {"exact.py:gemm32": "intra-cell matrix products",
         "backend.py:search": "k-means searches (BlasTop2's product and top two)",
         "backend.py:top2": "k-means searches (BlasTop2's product and top two)",
         "method 'argmax'": "top-two passes (argmax)",
         "kmeans.py:add": "k-means member sums", "kmeans.py:_member_sums": "k-means member sums",
         "c_einsum": "float64 row products and norms",
         "scratch.py:": "scratch and store reads and writes", "scratchfile.py:": "scratch and store reads and writes",
         "posix.preadv": "scratch and store reads and writes", "posix.pwrite": "scratch and store reads and writes",
         "store.py:_range": "scratch and store reads and writes",
         "ascontiguousarray": "float16 -> float32", "copy_": "float16 -> float32",
         "method 'acquire'": "waiting for the read-ahead or write-behind thread"}


def child(store: str, profile: bool, one_worker: bool) -> None:
    import time

    if one_worker or profile:  # one core for the cells (cProfile sees the main thread only)
        os.sched_getaffinity = lambda pid: {0}
    from dbp_lightning.pruning.embeddings import as_embeddings
    from dbp_lightning.pruning.semdedup import semdedup_passes
    from dbp_lightning.store import EmbeddingStore

    emb = as_embeddings(EmbeddingStore(store).embeddings)
    k = emb.n // 1000
    if not profile:
        t = time.perf_counter()
        semdedup_passes(emb, k, passes=1)
        print(json.dumps({"seconds": time.perf_counter() - t}))
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    semdedup_passes(emb, k, passes=1)
    prof.disable()
    stats = pstats.Stats(prof).stats
    parts, total = {}, max(v[3] for v in stats.values())
    for (path, _, name), (_, _, tottime, _, _) in stats.items():
        where = f"{os.path.basename(path)}:{name}"
        part = next((p for key, p in PARTS.items() if key in where), None)
        if part:
            parts[part] = parts.get(part, 0.0) + tottime
    parts["everything else (per-cell NumPy work, Python)"] = total - sum(parts.values())
    print(json.dumps({"total": total, "parts": parts}))


def parts_alone(store: str) -> None:
    """Two parts of a partition timed alone, medians: widening a float16 block (NumPy's kernel
    against torch's, which ``as_float32`` uses), and one fine k-means of the size a coarse cell
    has at 10M (100,000 rows, k = 100, 10 iterations); and what importing torch adds to RssAnon."""
    import time

    import torch

    from dbp_lightning.pruning import kmeans
    from dbp_lightning.pruning.embeddings import as_embeddings, as_float32
    from dbp_lightning.store import EmbeddingStore

    def median_s(f, repeats):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    emb = as_embeddings(EmbeddingStore(store).embeddings)
    raw = np.asarray(emb.x[0 : emb.block_size])
    out = np.empty(raw.shape, np.float32)
    numpy_ns = median_s(lambda: np.copyto(out, raw), 7) / raw.size * 1e9
    torch_ns = median_s(lambda: torch.from_numpy(out).copy_(torch.from_numpy(raw)), 7) / raw.size * 1e9
    rows = emb.over(emb.rows(0, min(emb.n, 100_000)))
    fine = median_s(lambda: kmeans.spherical_kmeans(rows, 100, niter=10, backend="faiss"), 3)
    probe = ("import dbp_lightning.pruning.kmeans, faiss; from dbp_lightning.memory import _status; "
             "a = _status()['RssAnon']; import torch; print(_status()['RssAnon'] - a)")
    grew = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.split()[-1])
    # a 10M pool's coarse cell (100,000 float16 rows) widened into a fresh array and into a kept one
    cell = np.asarray(emb.x[0 : min(emb.n, 100_000)])
    kept = np.empty(cell.shape, np.float32)
    fresh_ms = median_s(lambda: as_float32(cell), 5) * 1e3
    kept_ms = median_s(lambda: as_float32(cell, kept), 5) * 1e3
    print(json.dumps({"widen_numpy_ns": numpy_ns, "widen_torch_ns": torch_ns, "d": emb.d,
                      "fine_kmeans_s": fine, "torch_import_anon_mib": grew,
                      "cell_fresh_ms": fresh_ms, "cell_kept_ms": kept_ms,
                      **scratch_write_rates(os.path.dirname(store))}))


def scratch_write_rates(directory: str, gb: float = 1.0) -> dict:
    """GB/s of writing ``gb`` GB of rows to a scratch file in 8 MiB pieces, then reading them
    back, through the page cache and direct (what ``ScratchFile`` chooses where it can)."""
    import time
    from unittest import mock

    from dbp_lightning.pruning import scratchfile

    piece = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    count = int(gb * 1e9) // piece.nbytes
    out = {}
    for name, direct in (("buffered", False), ("direct", True)):
        with mock.patch.object(scratchfile, "_set_direct", lambda fd, on: False) if not direct \
                else contextlib.nullcontext(), scratchfile.ScratchFile(directory, count * piece.nbytes) as f:
            assert f.direct == direct, "this file system takes no O_DIRECT"
            t = time.perf_counter()
            for i in range(count):
                f.write(piece, i * piece.nbytes)
            out[f"{name}_write_gbs"] = count * piece.nbytes / (time.perf_counter() - t) / 1e9
            back = np.empty_like(piece)
            t = time.perf_counter()
            for i in range(count):
                f.read(back, i * piece.nbytes)
            out[f"{name}_read_gbs"] = count * piece.nbytes / (time.perf_counter() - t) / 1e9
    return out


def run(store: str, env: dict, profile: bool = False, one_worker: bool = False) -> dict:
    cmd = ([sys.executable, __file__, "--child", store] + (["--profile"] if profile else [])
           + (["--one-worker"] if one_worker else []))
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3_000_000)
    ap.add_argument("--workdir", default="/tmp/bench_scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return (parts_alone(args.child) if args.parts
                else child(args.child, args.profile, args.one_worker))
    store = f"{args.workdir}/pool_{args.n}"
    if not os.path.isfile(f"{store}/manifest.json"):
        sys.exit(f"no store {store}: run benchmarks/bench_scale.py --sizes {args.n} first")
    spinning = {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "30"}
    times = {"defaults (idle threads sleep)": [], "idle threads spin": [],
             "one worker for the cells (pruning/threads.py off)": []}
    for _ in range(args.repeats):  # alternating, so that drift hits all
        times["defaults (idle threads sleep)"].append(run(store, {})["seconds"])
        times["idle threads spin"].append(run(store, spinning)["seconds"])
        times["one worker for the cells (pruning/threads.py off)"].append(
            run(store, {}, one_worker=True)["seconds"])
    print(f"one SemDeDup partition (semdedup_passes, passes=1) on {store}, median of {args.repeats}\n")
    print("| threads | seconds | runs |\n|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")
    prof = run(store, {}, profile=True)
    print(f"\nunder cProfile, one worker (cProfile sees one thread; {prof['total']:.1f} s, "
          "internal time per part)\n")
    print("| part | seconds |\n|---|---:|")
    for part, sec in sorted(prof["parts"].items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {sec:.1f} |")
    alone = json.loads(subprocess.run([sys.executable, __file__, "--child", store, "--parts"],
                                      capture_output=True, text=True, check=True)
                       .stdout.strip().splitlines()[-1])
    print("\nparts alone (medians)\n\n| part | figure |\n|---|---:|")
    print(f"| float16 -> float32, NumPy's kernel | {alone['widen_numpy_ns']:.2f} ns a value |")
    print(f"| float16 -> float32, torch's kernel (as_float32) | {alone['widen_torch_ns']:.2f} ns a value |")
    print(f"| one fine k-means: 100,000 x {alone['d']} rows, k = 100, 10 iterations | {alone['fine_kmeans_s']:.2f} s |")
    print(f"| RssAnon added by `import torch` | {alone['torch_import_anon_mib']:.0f} MiB |")
    print(f"| one coarse cell (100,000 float16 rows) widened into a fresh array | {alone['cell_fresh_ms']:.1f} ms |")
    print(f"| the same into a kept array (as SortedRows.ranges reads) | {alone['cell_kept_ms']:.1f} ms |")
    for name in ("buffered", "direct"):
        print(f"| 1 GB of scratch, {name}: write, read back | {alone[f'{name}_write_gbs']:.2f}, "
              f"{alone[f'{name}_read_gbs']:.2f} GB/s |")


if __name__ == "__main__":
    main()
