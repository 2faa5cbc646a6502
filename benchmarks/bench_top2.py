"""The k-means estimate on CPU: faiss's flat search against a BLAS matmul and a top two.

Every k-means assignment (training iterations, the final pass, both levels of the dedup
partition, DBP's k-means) asks for each row's two most similar centroids; ``.exact`` decides
the close calls, so any estimate within the float32 error bound gives the same bytes. This
times the three estimates the code can use on the shapes the pipeline asks for (d = 256):

- faiss: ``IndexFlatIP(d).search(rows, 2)`` (faiss-cpu; what the faiss backend used on CPU),
- blas: :class:`~dbp_lightning.pruning.backend.BlasTop2` (what it uses now),
- torch: :class:`~dbp_lightning.pruning.backend.TorchTop2` on CPU (the torch backend).

Prints one table of median milliseconds over ``--repeats`` and faiss's time over blas's.

    python benchmarks/bench_top2.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dbp_lightning.pruning.backend import BlasTop2, TorchTop2

#: (what asks, rows searched at once, centroids)
SHAPES = [
    ("fine split of a 1M pool's coarse cell (k=3000)", 18_000, 55),
    ("coarse assignment at 10M (k=10000)", 65_536, 100),
    ("DBP k-means (k=500)", 65_536, 500),
    ("flat dedup partition (k=1000)", 65_536, 1_000),
]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--d", type=int, default=256)
    args = ap.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"median of {args.repeats}, d = {args.d}\n")
    print("| search | rows | k | faiss ms | blas ms | torch (CPU) ms | faiss / blas |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rows, k in SHAPES:
        x = rng.standard_normal((rows, args.d)).astype(np.float32)
        c = rng.standard_normal((k, args.d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(args.d)
        index.add(c)
        blas, torch_top = BlasTop2(c), TorchTop2(c, "cpu")
        _, ids_f = index.search(x, 2)
        _, ids_b = blas.search(x, 2)
        assert (ids_f[:, 0] == ids_b[:, 0]).mean() > 0.999  # near-ties may swap
        tf = median_ms(lambda: index.search(x, 2), args.repeats)
        tb = median_ms(lambda: blas.search(x, 2), args.repeats)
        tt = median_ms(lambda: torch_top.search(x, 2), args.repeats)
        print(f"| {name} | {rows:,} | {k:,} | {tf:.1f} | {tb:.1f} | {tt:.1f} | {tf / tb:.2f} |")


if __name__ == "__main__":
    main()
