"""The paper's diagnostic figures for a prune run (matplotlib, written as PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def complexity_scatter(clusters: pa.Table, path: str | os.PathLike) -> None:
    """Paper Fig. 2 (right): d_intra against d_inter per cluster, coloured by kept fraction."""
    plt = _pyplot()
    c = clusters.to_pydict()
    size, kept = np.asarray(c["size"], float), np.asarray(c["kept"], float)
    frac = np.divide(kept, size, out=np.zeros_like(size), where=size > 0)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sc = ax.scatter(c["d_intra"], c["d_inter"], c=frac, s=12 + 60 * size / max(size.max(), 1),
                    cmap="viridis", vmin=0, vmax=1, edgecolors="none")
    fig.colorbar(sc, ax=ax, label="fraction of the cluster kept")
    ax.set_xlabel("d_intra (mean distance of members to centroid)")
    ax.set_ylabel("d_inter (mean distance to nearest centroids)")
    ax.set_title("Cluster complexity and what DBP keeps (marker area ~ size)")
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def quota_profile(clusters: pa.Table, target: int, path: str | os.PathLike) -> None:
    """Paper Fig. 7: pruned cluster size against P_j N (left) and original size (right),
    clusters sorted by pruned size."""
    plt = _pyplot()
    c = clusters.to_pydict()
    quota = np.asarray(c["quota"])
    order = np.argsort(quota, kind="stable")
    x = np.arange(len(order))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(x, np.asarray(c["p"])[order] * target, ".", ms=3, label="P_j N", zorder=3)
    axes[1].plot(x, np.asarray(c["size"])[order], "o", ms=4, mfc="none", color="tab:gray",
                 label="original size M_j", zorder=3)
    for ax in axes:
        ax.plot(x, quota[order], "-", color="tab:red", label="pruned size x_j", zorder=2)
        ax.set_xlabel("clusters, sorted by pruned size")
        ax.set_ylabel("samples")
        ax.set_yscale("log")
        ax.legend()
    axes[0].set_title("pruned size vs P_j N\n(x_j = clip(P_j N - lam, 1, M_j): one shift lam for all)",
                      fontsize=10)
    axes[1].set_title("pruned size vs original size\n(on the grey circle: the whole cluster is kept)",
                      fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def accuracy_vs_cost(summary: list[dict], metrics: list[str], budget: str, path: str | os.PathLike,
                     chance: dict[str, float] | None = None) -> None:
    """Paper Fig. 1/3: zero-shot metric against training cost, mean +- std over seeds.

    ``summary``: rows of ``compare.collect`` (metric -> (mean, std)), one panel per ``metrics``
    name, in that order. Equal samples seen: x is the subset's size, the cost being equal;
    equal epochs: x is the samples seen, the cost. ``chance``: each metric's level for a model
    that guesses, drawn as a dashed line. Every panel's y axis spans at least 0.1 and reaches
    down to chance, so that a 0.02 difference looks like one.
    """
    plt = _pyplot()
    chance = chance or {}
    xkey = "train_pairs" if budget == "samples_seen" else "samples_seen"
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for ax, metric in zip(axes[0], metrics):
        lows, highs = [], []
        for i, method in enumerate(methods):
            rows = sorted((r for r in summary if r["method"] == method and r[metric] is not None),
                          key=lambda r: r[xkey])
            if not rows:
                continue
            ax.errorbar([r[xkey] for r in rows], [r[metric][0] for r in rows],
                        yerr=[r[metric][1] for r in rows], fmt="o-" if len(rows) > 1 else "o",
                        color=f"C{i}", capsize=3, label=method)
            lows += [r[metric][0] - r[metric][1] for r in rows]
            highs += [r[metric][0] + r[metric][1] for r in rows]
        if metric in chance:
            ax.axhline(chance[metric], color="0.4", ls="--", lw=1, label="chance")
            lows.append(chance[metric])
            highs.append(chance[metric])
        if lows:
            lo, hi = min(lows), max(highs)
            pad = max(0.1 - (hi - lo), 0.0) / 2 + 0.05 * max(hi - lo, 0.1)
            ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1 else hi + pad)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("training pairs (equal samples seen)" if xkey == "train_pairs" else "samples seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("zero-shot (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
