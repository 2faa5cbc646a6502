"""What exactness costs: the share of ``prune`` spent making its results independent of the
BLAS kernel and thread count (``dbp_lightning/pruning/exact.py``), and how often the fast
float32 products could not decide alone.

Prunes ``bench_scale.py``'s pool (float16, SemDeDup with two partitions of N / 1,000 cells and
eps 0.05, then DBP with k = 500 keeping 60 %) in this process, with timers around the fast
products (faiss's top-2 search, the threaded float32 matmul) and around the exact layer (exact
argmax of the undecided rows, exactly rounded similarities), and counters of the rows decided
exactly and of the values that needed ``math.fsum``. Prints one table.

    python benchmarks/bench_exact.py                 # 1M
    python benchmarks/bench_exact.py --n 300000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import DBP_K, EPS, KEEP, ROWS_PER_DEDUP_CELL, write_store  # noqa: E402


def instrument(seconds: dict, counts: dict) -> None:
    """Wrap the fast products and the exact layer where the pipeline calls them."""
    from importlib import import_module

    # import_module: ``dbp_lightning.pruning.semdedup`` is also the name of a function there
    complexity, exact, kmeans, semdedup = (import_module(f"dbp_lightning.pruning.{name}")
                                           for name in ("complexity", "exact", "kmeans", "semdedup"))

    def timed(module, name, bucket, count=None):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds[bucket] += time.perf_counter() - t
            if count is not None:
                counts[count] += count_of(name, args, out)
            return out
        setattr(module, name, wrapper)

    def count_of(name, args, out):
        if name == "search_top2":  # (index, rows)
            return len(args[1])
        return len(args[0]) if name in ("exact_argmax", "row_sims") else 1

    timed(exact, "gemm32", "fast products")
    timed(kmeans, "search_top2", "fast products", "rows searched (k-means)")
    timed(kmeans, "exact_argmax", "exact argmax", "rows decided exactly (k-means)")
    timed(semdedup, "exact_argmax", "exact argmax", "rows decided exactly (SemDeDup)")
    for module in (kmeans, semdedup, complexity):
        timed(module, "row_sims", "exactly rounded similarities", "similarities rounded")
    timed(exact, "_exact_dot", "of which math.fsum", "values needing math.fsum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/bench_scale", help="where the pool is written (shared with bench_scale.py)")
    args = parser.parse_args()
    store = Path(args.workdir) / f"pool_{args.n}"
    write_store(store, args.n)

    from dbp_lightning.config import PruneConfig, SelectConfig, SemDeDupConfig
    from dbp_lightning.pruning.pipeline import prune
    from dbp_lightning.store import EmbeddingStore

    seconds, counts = defaultdict(float), defaultdict(int)
    instrument(seconds, counts)
    config = PruneConfig(input=str(store), gpu="false", stages=["semdedup", "dbp"],
                         semdedup=SemDeDupConfig(k=args.n // ROWS_PER_DEDUP_CELL, eps=EPS,
                                                 target_fraction=None),
                         select=SelectConfig(target_fraction=KEEP, k=DBP_K))
    t = time.perf_counter()
    result = prune(EmbeddingStore(store), config)
    total = time.perf_counter() - t
    semdedup_rows = counts["rows decided exactly (SemDeDup)"]
    print(f"pool: {args.n:,} x 256 float16; prune {total:.1f} s, kept {result.report['kept']:,}\n")
    print("| part | seconds | share of prune |\n|---|---:|---:|")
    for name in ("fast products", "exact argmax", "exactly rounded similarities", "of which math.fsum"):
        print(f"| {name} | {seconds[name]:.1f} | {seconds[name] / total:.1%} |")
    print("\n| count | value |\n|---|---:|")
    for name in sorted(counts):
        print(f"| {name} | {counts[name]:,} |")
    passes = config.semdedup.passes
    print(f"| SemDeDup rows decided exactly, per row and partition | "
          f"{semdedup_rows / (args.n * passes):.2%} |")


if __name__ == "__main__":
    main()
