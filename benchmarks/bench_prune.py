"""Prune benchmark: dbp_lightning against the public approach, in one run, on one pool.

Pool: synthetic, clustered (Zipf-skewed concept sizes, varied spreads), 10% of rows planted
as near-duplicates of another row, written as a float32 embedding store on disk.

Pipeline measured for both: SemDeDup (eps fixed, so removals are comparable) then DBP
(k = 500, keep --keep of the survivors). Each side runs in its own process so that peak RSS
(ru_maxrss) is its own.

- ours: ``dbp_lightning.pruning``'s building blocks as ``prune`` runs them: SemDeDup through
  ``semdedup_passes`` over two dedup partitions (k-means on a sample for few iterations,
  different seeds, in two levels above 1,024 cells) of as many cells as the baseline's, exact
  similarities. In two levels each coarse cell's duplicates are searched while the partition
  holds its rows, so one sort serves both: the "dedup k-means" row is the partitions with that
  sort, the "semdedup" row the search alone (timed call by call; the first partition's is also
  shown alone, the public definition's one search, outside the total). Then DBP k-means
  stopping at convergence (tol), exact quotas.
- baseline: the paper's / SemDeDup's public recipe: faiss spherical k-means, 100 iterations,
  ~3,000 clusters for dedup and k = 500 for DBP (faiss's default training subsample of 256
  points per centroid, as their code gets it), a per-cluster scan of the whole assignment
  table, a full M x M similarity matrix per cluster, OSQP + ``np.rint`` quotas.

SemDeDup runs ``--dedup-repeats`` times on each side (ours with its partitions, which hold the
search): its rows, and ours' dedup k-means, are medians; the other stages run once.

Also times ``dbp_quotas`` (exact) against qpsolvers/OSQP at k = 500 and 50,000 (median of
--repeats), OSQP both as the paper's code calls it (default tolerances) and at tolerance 1e-9
with polishing (``solver: osqp`` here), each rounded with ``np.rint``.

    python benchmarks/bench_prune.py --n 1000000          # the README's table
    python benchmarks/bench_prune.py --n 100000 --dedup-k-baseline 300   # a quick look
    python benchmarks/bench_prune.py --quotas-only                        # the solver table alone
    python benchmarks/bench_prune.py --backend torch     # also ours on the PyTorch backend
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EPS = 0.05           # planted copies have cosine ~0.98-0.99 to their group; natural pairs < 0.8
DBP_K, DBP_NITER, TEMPERATURE, NEIGHBORS = 500, 100, 0.1, 20


def rss_mb() -> float:
    from dbp_lightning.memory import peak_rss_mb

    return peak_rss_mb()


# --------------------------------------------------------------------------- workers
def worker_ours(store_path: str, out: str, keep: float, dedup_k: int, dedup_niter: int,
                passes: int, backend: str = "faiss", repeats: int = 1) -> dict:
    import importlib

    from dbp_lightning.pruning import cluster_complexity, dbp_quotas, dbp_select, spherical_kmeans
    from dbp_lightning.pruning import kmeans
    from dbp_lightning.pruning.embeddings import as_embeddings
    from dbp_lightning.store import EmbeddingStore

    stages, t = {}, time.perf_counter()
    emb = as_embeddings(EmbeddingStore(store_path).embeddings)
    stages["load+validate"] = (time.perf_counter() - t, rss_mb())
    # SemDeDup as prune runs it (semdedup_passes): each partition's search runs while the
    # partition holds its rows (two levels) or from its own sort (flat); the seconds spent in
    # the search, per partition, are told apart from the clustering's by timing its calls
    semdedup = importlib.import_module("dbp_lightning.pruning.semdedup")  # not the function
    searched: list[list[float]] = []  # per partition, the seconds of each search call
    partition = kmeans.partition_kmeans

    def new_partition(*args, **kwargs):
        searched.append([])
        return partition(*args, **kwargs)

    def timed(search):
        def run(*args, **kwargs):
            t = time.perf_counter()
            found = search(*args, **kwargs)
            searched[-1].append(time.perf_counter() - t)
            return found
        return run

    kmeans.partition_kmeans = new_partition
    semdedup.group_duplicates = timed(semdedup.group_duplicates)
    semdedup.duplicate_similarity = timed(semdedup.duplicate_similarity)
    rest, search, one_partition, dup_sim = [], [], [], None
    for _ in range(repeats):  # medians; every run must give the same bytes
        searched.clear()
        t = time.perf_counter()
        _, found, _ = semdedup.semdedup_passes(emb, dedup_k, passes=passes, niter=dedup_niter,
                                               backend=backend)
        whole = time.perf_counter() - t
        search.append(sum(map(sum, searched)))
        rest.append(whole - search[-1])
        one_partition.append(sum(searched[0]))  # the public definition searches one
        if dup_sim is not None and found.tobytes() != dup_sim.tobytes():
            raise AssertionError("semdedup_passes gave other bytes on a repeat")
        dup_sim = found
    dedup_keep = dup_sim <= 1 - EPS
    stages["dedup k-means"] = (float(np.median(rest)), rss_mb())
    stages["semdedup"] = (float(np.median(search)), rss_mb())
    one_partition = float(np.median(one_partition))
    rows = np.flatnonzero(dedup_keep)
    sub = emb.subset(rows)
    target = round(keep * len(rows))
    t = time.perf_counter()
    km2 = spherical_kmeans(sub, DBP_K, niter=DBP_NITER, seed=0, tol=1e-4, backend=backend)
    stages["dbp k-means"] = (time.perf_counter() - t, rss_mb())
    t = time.perf_counter()
    cc = cluster_complexity(sub, km2.centroids, km2.assignment, NEIGHBORS, similarity=km2.similarity)
    quotas = dbp_quotas(cc.complexity, cc.sizes, target, TEMPERATURE)
    selected = dbp_select(km2.similarity, km2.assignment, quotas)
    stages["dbp quotas+select"] = (time.perf_counter() - t, rss_mb())
    np.savez(out, dedup_keep=dedup_keep, quotas=quotas, sizes=cc.sizes, rows=rows,
             assignment=km2.assignment, centroids=km2.centroids, selected=selected)
    return {"stages": stages, "dbp_iterations": km2.n_iter, "target": target,
            "semdedup_one_partition": one_partition}


def worker_baseline(store_path: str, out: str, keep: float, dedup_k: int, repeats: int = 1) -> dict:
    import faiss

    from dbp_lightning.store import EmbeddingStore

    stages, t = {}, time.perf_counter()
    x = np.ascontiguousarray(EmbeddingStore(store_path).embeddings[:], dtype=np.float32)
    stages["load+validate"] = (time.perf_counter() - t, rss_mb())

    def kmeans(data, k):
        km = faiss.Kmeans(data.shape[1], k, niter=100, seed=0, spherical=True, verbose=False)
        km.train(data)
        sims, ids = km.index.search(data, 1)
        return km.centroids, ids[:, 0], sims[:, 0]

    t = time.perf_counter()
    _, assignment, sims = kmeans(x, dedup_k)
    stages["dedup k-means"] = (time.perf_counter() - t, rss_mb())
    seconds = []
    for _ in range(repeats):  # a median, as ours
        t = time.perf_counter()
        dedup_keep = np.ones(len(x), bool)
        for c in range(dedup_k):
            members = np.where(assignment == c)[0]           # scan of the whole table
            members = members[np.argsort(sims[members])]     # farthest from the centroid first
            block = x[members]
            triu = np.triu(block @ block.T, k=1)             # full M x M
            dedup_keep[members[triu.max(axis=0, initial=-1.0) > 1 - EPS]] = False
        seconds.append(time.perf_counter() - t)
    stages["semdedup"] = (float(np.median(seconds)), rss_mb())
    rows = np.flatnonzero(dedup_keep)
    xs = x[rows]
    target = round(keep * len(rows))
    t = time.perf_counter()
    centroids, assignment2, sims2 = kmeans(xs, DBP_K)
    stages["dbp k-means"] = (time.perf_counter() - t, rss_mb())
    t = time.perf_counter()
    sizes = np.array([(assignment2 == c).sum() for c in range(DBP_K)])
    d_intra = np.array([(1 - sims2[assignment2 == c]).mean() for c in range(DBP_K)])
    csim = centroids @ centroids.T
    np.fill_diagonal(csim, -np.inf)
    d_inter = np.array([(1 - np.sort(row)[::-1][:NEIGHBORS]).mean() for row in csim])
    z = d_intra * d_inter / TEMPERATURE
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    quotas = np.rint(paper_call(p * target, np.ones(DBP_K), sizes, target)).astype(np.int64)
    selected = np.zeros(len(rows), bool)
    for c in range(DBP_K):
        members = np.where(assignment2 == c)[0]
        selected[members[np.argsort(sims2[members])[: max(quotas[c], 0)]]] = True
    stages["dbp quotas+select"] = (time.perf_counter() - t, rss_mb())
    np.savez(out, dedup_keep=dedup_keep, quotas=quotas, sizes=sizes, rows=rows,
             assignment=assignment2, centroids=centroids, selected=selected)
    return {"stages": stages, "dbp_iterations": 100, "target": target}


# --------------------------------------------------------------------------- comparison
def objective(store_path: str, rows: np.ndarray, assignment: np.ndarray, centroids: np.ndarray) -> float:
    """Mean cosine of every DBP input row to its assigned centroid (k-means objective)."""
    from dbp_lightning.pruning.embeddings import as_embeddings
    from dbp_lightning.store import EmbeddingStore

    sub = as_embeddings(EmbeddingStore(store_path).embeddings).subset(rows)
    total = 0.0
    for start, block in sub.blocks():
        total += float(np.einsum("ij,ij->i", block, centroids[assignment[start:start + len(block)]]).sum())
    return total / len(rows)


def group_survivors(keep: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    in_group = group >= 0
    ids, inverse, size = np.unique(group[in_group], return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=keep[in_group], minlength=len(ids)).astype(int), size


def paper_call(t: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: int) -> np.ndarray | None:
    """The quota QP as the paper's code solves it: qpsolvers + OSQP at its default settings;
    None where OSQP stops without a solution (qpsolvers warns and returns None)."""
    import warnings

    import scipy.sparse as sp
    from qpsolvers import solve_qp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return solve_qp(P=sp.identity(len(t), format="csc") * 2.0, q=-2.0 * t,
                        A=sp.csc_matrix(np.ones((1, len(t)))), b=np.array([float(total)]),
                        lb=lower.astype(float), ub=upper.astype(float), solver="osqp")


def quota_timing(repeats: int) -> list[dict]:
    from dbp_lightning.pruning.quotas import _solve_osqp, dbp_quotas, quota_bounds, softmax_probabilities

    rows = []
    for k in (500, 50_000):
        rng = np.random.default_rng(k)
        sizes = rng.zipf(1.6, k).clip(1, 200_000)
        complexity = rng.uniform(0.05, 0.4, k)
        target = int(sizes.sum() * 0.4)
        t_exact, t_osqp, t_paper = [], [], []
        for _ in range(repeats):
            t = time.perf_counter(); q = dbp_quotas(complexity, sizes, target); t_exact.append(time.perf_counter() - t)
            lower, upper = quota_bounds(sizes, target)
            tt = softmax_probabilities(complexity, sizes, 0.1) * target
            t = time.perf_counter(); x = _solve_osqp(tt, lower, upper, target); t_osqp.append(time.perf_counter() - t)
            t = time.perf_counter(); xp = paper_call(tt, lower, upper, target)
            t_paper.append(time.perf_counter() - t)
        row = {"k": k, "exact_s": float(np.median(t_exact)), "osqp_s": float(np.median(t_osqp)),
               "paper_s": float(np.median(t_paper)), "exact_sum_ok": int(q.sum()) == target}
        for name, sol in (("tight", x), ("paper", xp)):
            if sol is None:  # OSQP stopped at its iteration limit: qpsolvers returns no solution
                row[f"{name}_sum_off"] = row[f"{name}_violations"] = row[f"{name}_l1"] = None
                continue
            rint = np.rint(sol).astype(int)
            row[f"{name}_sum_off"] = int(rint.sum()) - target
            row[f"{name}_violations"] = int(((rint < lower) | (rint > upper)).sum())
            row[f"{name}_l1"] = int(np.abs(rint - q).sum())  # quotas moved against the exact ones
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.6, help="DBP keeps this fraction of the dedup survivors")
    ap.add_argument("--dedup-k", type=int, default=None,
                    help="ours: dedup cells (default: --dedup-k-baseline, cells of the same size)")
    ap.add_argument("--dedup-niter", type=int, default=10, help="ours: dedup k-means iterations")
    ap.add_argument("--dedup-passes", type=int, default=2, help="ours: dedup partitions (seeds)")
    ap.add_argument("--dedup-k-baseline", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the quota timing")
    ap.add_argument("--dedup-repeats", type=int, default=3,
                    help="runs of SemDeDup on each side (ours: the partitions too), medians")
    ap.add_argument("--workdir", default="/tmp/dbp_bench_prune")
    ap.add_argument("--quotas-only", action="store_true", help="only the quota solver table")
    ap.add_argument("--backend", choices=["faiss", "torch"], default="faiss",
                    help="torch: also run ours on the PyTorch backend (CPU here) beside faiss")
    ap.add_argument("--worker", choices=["ours", "ours-torch", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dedup_k = args.dedup_k or args.dedup_k_baseline
    if args.quotas_only:
        print_quota_table(args.repeats)
        return
    work = Path(args.workdir)
    store = work / f"pool_{args.n}_{args.dim}"

    if args.worker:  # child process: one side, JSON on stdout
        out = str(work / f"{args.worker}.npz")
        if args.worker.startswith("ours"):
            res = worker_ours(str(store), out, args.keep, args.dedup_k, args.dedup_niter, args.dedup_passes,
                              backend="torch" if args.worker == "ours-torch" else "faiss",
                              repeats=args.dedup_repeats)
        else:
            res = worker_baseline(str(store), out, args.keep, args.dedup_k_baseline, args.dedup_repeats)
        print("RESULT " + json.dumps(res))
        return

    from dbp_lightning.store import EmbeddingStore
    from dbp_lightning.synthetic import PoolSpec, write_pool_store

    if not (store / "manifest.json").exists():
        write_pool_store(store, PoolSpec(n=args.n, dim=args.dim, n_concepts=2000), progress=True)
    results = {}
    for side in ("ours", "baseline") + (("ours-torch",) if args.backend == "torch" else ()):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", side],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][7:])
        results[side]["wall"] = time.perf_counter() - t
        print(f"{side}: {results[side]['wall']:.1f} s", flush=True)

    group = EmbeddingStore(store).metadata(["dup_group"]).column("dup_group").to_numpy()
    saved = {s: np.load(work / f"{s}.npz") for s in ("ours", "baseline")}
    emb_mb = args.n * args.dim * 4 / 2**20

    print(f"\npool: {args.n:,} x {args.dim} float32 ({emb_mb:.0f} MiB), "
          f"{int((group >= 0).sum()):,} rows in planted near-duplicate groups; eps = {EPS}, "
          f"DBP k = {DBP_K} keeps {args.keep:.0%} of the dedup survivors\n")
    print(f"SemDeDup rows and ours' dedup k-means: medians of {args.dedup_repeats} runs\n")
    print("| stage | ours s | baseline s | speed-up | ours peak RSS MiB | baseline peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in results["ours"]["stages"]:
        (to, ro), (tb, rb) = results["ours"]["stages"][stage], results["baseline"]["stages"][stage]
        print(f"| {stage} | {to:.1f} | {tb:.1f} | {tb / max(to, 1e-9):.1f}x | {ro:.0f} | {rb:.0f} |")
    tot_o = sum(v[0] for v in results["ours"]["stages"].values())
    tot_b = sum(v[0] for v in results["baseline"]["stages"].values())
    peak_o = max(v[1] for v in results["ours"]["stages"].values())
    peak_b = max(v[1] for v in results["baseline"]["stages"].values())
    print(f"| **total** | **{tot_o:.1f}** | **{tot_b:.1f}** | **{tot_b / tot_o:.1f}x** | {peak_o:.0f} | {peak_b:.0f} |")
    one, tb = results["ours"]["semdedup_one_partition"], results["baseline"]["stages"]["semdedup"][0]
    print(f"| semdedup, one partition (`passes: 1`; not in the total) | {one:.1f} | {tb:.1f} | "
          f"{tb / max(one, 1e-9):.1f}x | | |")

    surv = {s: group_survivors(saved[s]["dedup_keep"], group) for s in saved}
    size = surv["ours"][1]
    removed = {s: size - surv[s][0] for s in saved}
    agree = np.minimum(removed["ours"], removed["baseline"]).sum() / max(np.maximum(removed["ours"], removed["baseline"]).sum(), 1)
    print("\n| quality | ours | baseline |\n|---|---:|---:|")
    print(f"| planted duplicates removed (of {int((size - 1).sum()):,}) | "
          f"{int(removed['ours'].sum()):,} | {int(removed['baseline'].sum()):,} |")
    print(f"| planted groups left with exactly one member | {(surv['ours'][0] == 1).mean():.4f} | "
          f"{(surv['baseline'][0] == 1).mean():.4f} |")
    for s in saved:
        results[s]["false"] = int((~saved[s]["dedup_keep"][group < 0]).sum())
    print(f"| rows removed outside planted groups | {results['ours']['false']:,} | {results['baseline']['false']:,} |")
    covered = np.minimum(removed["ours"], removed["baseline"]).sum() / max(removed["baseline"].sum(), 1)
    print(f"| share of the baseline's planted removals that ours also makes | {covered:.4f} | 1 |")
    print(f"| agreement on planted removals (sum of min / sum of max, per group) | {agree:.4f} | |")
    obj = {s: objective(str(store), saved[s]["rows"], saved[s]["assignment"], saved[s]["centroids"]) for s in saved}
    print(f"| DBP k-means objective (mean cosine to centroid) | {obj['ours']:.5f} ({results['ours']['dbp_iterations']} it) | "
          f"{obj['baseline']:.5f} (100 it) |")
    print(f"| objective relative to baseline | {obj['ours'] / obj['baseline']:.4f} | 1 |")
    for s in saved:
        q, sz = saved[s]["quotas"], saved[s]["sizes"]
        results[s]["qsum"] = int(q.sum()) - results[s]["target"]
        results[s]["qviol"] = int(((q < np.minimum(sz, 1)) | (q > sz)).sum())
    print(f"| quotas: sum - target | {results['ours']['qsum']} | {results['baseline']['qsum']} |")
    print(f"| quotas outside 1 <= x_j <= M_j | {results['ours']['qviol']} | {results['baseline']['qviol']} |")
    print(f"| peak RSS / embedding bytes | {peak_o / emb_mb:.2f} | {peak_b / emb_mb:.2f} |")

    if "ours-torch" in results:
        print_backend_table(results, work)
    print_quota_table(args.repeats)


def print_backend_table(results: dict, work: Path) -> None:
    """ours on faiss against ours on the PyTorch backend (this machine's CPU): seconds per
    stage, and whether the two wrote the same arrays."""
    a, b = np.load(work / "ours.npz"), np.load(work / "ours-torch.npz")
    same = all(np.array_equal(a[name], b[name]) for name in a.files)
    print("\n| stage | ours, faiss s | ours, torch (CPU) s | torch / faiss |\n|---|---:|---:|---:|")
    for stage, (tf, _) in results["ours"]["stages"].items():
        tt = results["ours-torch"]["stages"][stage][0]
        print(f"| {stage} | {tf:.1f} | {tt:.1f} | {tt / max(tf, 1e-9):.2f}x |")
    print(f"| whole run (wall) | {results['ours']['wall']:.1f} | {results['ours-torch']['wall']:.1f} | "
          f"{results['ours-torch']['wall'] / results['ours']['wall']:.2f}x |")
    print(f"\nsame arrays on both backends (dedup keep, DBP clusters, quotas, selection): {same}")


def print_quota_table(repeats: int) -> None:
    print(f"\nquota solvers, median of {repeats}: exact (ours: integer quotas summing to the target); "
          "OSQP as the paper's code calls it (default tolerances 1e-3), then np.rint; OSQP at "
          "tolerance 1e-9 with polishing (our solver='osqp', before its rounding repair), then np.rint\n")
    print("| k | exact s | OSQP paper's call s | OSQP 1e-9 + polish s | paper's call / exact | "
          "1e-9 / exact | exact sum = target | paper's call + rint: sum - target, bounds broken, "
          "sum abs diff to exact | 1e-9 + rint: the same |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in quota_timing(repeats):
        print(f"| {r['k']:,} | {r['exact_s']:.4f} | {r['paper_s']:.4f} | {r['osqp_s']:.4f} | "
              f"{r['paper_s'] / r['exact_s']:.0f}x | {r['osqp_s'] / r['exact_s']:.0f}x | {r['exact_sum_ok']} | "
              f"{_rounded(r, 'paper')} | {_rounded(r, 'tight')} |")


def _rounded(row: dict, name: str) -> str:
    if row[f"{name}_sum_off"] is None:
        return "no solution (OSQP's iteration limit)"
    return f"{row[f'{name}_sum_off']}, {row[f'{name}_violations']}, {row[f'{name}_l1']:,}"

if __name__ == "__main__":
    main()
