"""``report.html``: one self-contained page for a human to check a prune run by eye.

It reads the run directory that :func:`dbp_lightning.rundir.write_run` wrote (report.json,
selection.parquet, clusters.parquet, plots/*.png, manifest.json) and the pool's WebDataset
shards, once, for the thumbnails and captions of the samples it shows. Everything (images,
plots, CSS) is inlined, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from collections import Counter
from html import escape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path
from .data.shards import decode_caption, decode_image, expand_shards, iter_shard, sample_id
from .pruning.pipeline import id_column

THUMB = 64  #: thumbnail side in pixels (the demo pool's images are 64 px)


def write_report(run_dir: str | os.PathLike, shards, out: str | os.PathLike | None = None,
                 clusters_shown: int = 8, per_strip: int = 8, pairs_shown: int = 50,
                 seed: int = 0, shown_as: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of a prune run (and ``dedup_pairs.csv`` beside it), atomically.

    Reads ``run_dir``'s report.json, selection.parquet, manifest.json and, when present,
    clusters.parquet and plots/*.png; reads the images and captions of the shown samples from
    ``shards`` (matched by identity: the selection's ``uid``, else ``key``) in one pass.

    Args:
        run_dir: a prune run directory.
        shards: the pool's shards (brace pattern, glob, directory or list).
        out: the HTML path; default ``run_dir/report.html``.
        clusters_shown: selector clusters shown, a seeded random sample.
        per_strip: thumbnails in each cluster's most- and least-prototypical strip, and at most
            this many removed members shown per SemDeDup group.
        pairs_shown: at most this many removed-and-partner pairs shown (and written to the CSV).
        seed: seeds the choice of clusters and of SemDeDup groups.
        shown_as: the run's path as the page names it (default ``run_dir``; a run being
            written is in a staging directory that is renamed when it is complete).

    Returns:
        The HTML path. The CSV (pair, group, removed key, partner key, similarity, both
        captions) is written only when the selection has a ``dup_of`` column.
    """
    run = Path(run_dir)
    out = Path(out) if out is not None else run / "report.html"
    shown_as = Path(shown_as) if shown_as is not None else run
    report = json.loads((run / "report.json").read_text())
    manifest_path = run / "manifest.json"
    config = json.loads(manifest_path.read_text())["config"] if manifest_path.is_file() else None
    # only the columns used, and keys as Arrow: a pool of 10^8 samples must not become 10^8
    # Python strings for a page that shows a few hundred of them
    names = pq.read_schema(run / "selection.parquet").names
    sel = pq.read_table(run / "selection.parquet", columns=[c for c in _COLUMNS if c in names])
    idcol = id_column(names)
    kept = sel.column("kept").to_numpy(zero_copy_only=False)
    clusters_path = run / "clusters.parquet"
    clusters = pq.read_table(clusters_path) if clusters_path.is_file() else None

    strips = pairs = None
    shown_rows = [np.zeros(0, np.int64)]
    if {"cluster", "sim_to_centroid"} <= set(names) and clusters is not None:
        cluster = pc.fill_null(sel.column("cluster"), -1).to_numpy()
        sim = pc.fill_null(sel.column("sim_to_centroid"), np.nan).to_numpy()
        strips = [(c, *extreme_members(cluster, sim, c, per_strip))
                  for c in sample_clusters(cluster, clusters_shown, seed)]
        shown_rows += [r for _, top, bottom in strips for r in (top, bottom)]
    if {"dup_of", "dup_sim", "dedup_kept"} <= set(names):
        dup_of, dup_sim = sel.column("dup_of"), sel.column("dup_sim").to_numpy()
        dedup_kept = sel.column("dedup_kept").to_numpy(zero_copy_only=False)
        removed = ~dedup_kept & pc.is_valid(dup_of).to_numpy(zero_copy_only=False)
        rows, group = dedup_pairs(removed, dup_of, dup_sim, pairs_shown, per_strip, seed)
        partner = partner_rows(sel.column(idcol), dup_of.take(rows).to_numpy(zero_copy_only=False))
        pairs = (rows, partner, group, dup_sim, dedup_kept)
        shown_rows += [rows, partner]

    needed = np.unique(np.concatenate(shown_rows))
    # row -> (key, identity): a card shows the tar's key and is found by the identity, which
    # is unique where keys repeat across shards
    keys = dict(zip(needed.tolist(), zip(sel.column("key").take(needed).to_pylist(),
                                         sel.column(idcol).take(needed).to_pylist())))
    samples = read_samples(shards, {ident for _, ident in keys.values()})

    body = [_header(shown_as, report, config, len(keys), len(samples)), _funnel(report),
            _plot(run / "plots" / "complexity_scatter.png", "Fig. 2: cluster complexity",
                  "d_intra against d_inter per selector cluster, coloured by the fraction kept."),
            _plot(run / "plots" / "quotas.png", "Fig. 7: quotas",
                  "How many samples DBP keeps from each cluster."),
            _clusters(strips, clusters, keys, kept, samples, per_strip),
            _dedup(pairs, keys, samples)]
    with atomic_path(out) as tmp:
        tmp.write_text(_PAGE.format(title=escape(f"prune report: {shown_as.name}"), body="\n".join(body)),
                       encoding="utf-8")
    if pairs is not None:
        _write_pairs_csv(out.with_name("dedup_pairs.csv"), pairs, keys, samples)
    else:  # a CSV left by an earlier report would no longer match this page
        out.with_name("dedup_pairs.csv").unlink(missing_ok=True)
    return out


#: the selection columns the report reads
_COLUMNS = ("key", "uid", "kept", "cluster", "sim_to_centroid", "dup_of", "dup_sim", "dedup_kept")


def sample_clusters(cluster: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted ids of ``n`` (or all, if fewer) non-empty clusters, chosen with ``seed``;
    ``cluster`` is int (N,) with -1 for samples that never reached the selector."""
    present = np.unique(cluster[cluster >= 0])
    pick = np.random.default_rng(seed).choice(len(present), min(n, len(present)), replace=False)
    return np.sort(present[pick])


def extreme_members(cluster: np.ndarray, sim: np.ndarray, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of cluster ``c``: the ``n`` most similar to the centroid (most first) and the
    ``n`` least similar (least first); disjoint, so a small cluster's strips split it."""
    rows = np.flatnonzero(cluster == c)
    rows = rows[np.lexsort((rows, -sim[rows]))]  # most prototypical first, ties by row
    top = rows[:n]
    return top, rows[len(top):][::-1][:n]


def dedup_pairs(removed: np.ndarray, dup_of: pa.ChunkedArray, dup_sim: np.ndarray, n_pairs: int,
                per_group: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Removed rows to show, whole groups (rows sharing a ``dup_of`` partner) together.

    Groups are taken in the order of a seeded random sample of the removed rows, so a group is
    picked in proportion to its size and the pairs shown stand for the removed samples; each
    group shows at most ``per_group`` members (most similar first), ``n_pairs`` rows in all.

    Args:
        removed: bool (N,), rows SemDeDup removed (each has a ``dup_of`` key).
        dup_of: (N,) the selection's ``dup_of`` column (partner keys).
        dup_sim: float (N,) duplicate similarities.

    Returns:
        (rows int64 (P,), group int64 (P,): 0, 0, 1, ... the group number of each row).
    """
    cand = np.flatnonzero(removed)
    if len(cand) == 0 or n_pairs < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    drawn = cand[np.random.default_rng(seed).choice(len(cand), min(n_pairs, len(cand)), replace=False)]
    drawn_partner = dup_of.take(drawn).to_numpy(zero_copy_only=False).astype(str)
    _, first = np.unique(drawn_partner, return_index=True)
    partners = drawn_partner[np.sort(first)]  # the groups, in the order drawn
    in_groups = pc.is_in(dup_of, value_set=pa.array(partners)).to_numpy(zero_copy_only=False)
    members = np.flatnonzero(removed & in_groups)
    gid = pc.index_in(dup_of.take(members), value_set=pa.array(partners)).to_numpy()
    members, gid = members[np.lexsort((members, -dup_sim[members], gid))], np.sort(gid)
    rows, group = [], []
    for g in range(len(partners)):
        take = members[gid == g][: min(per_group, n_pairs - len(rows))]
        rows += take.tolist()
        group += [g] * len(take)
        if len(rows) >= n_pairs:
            break
    return np.asarray(rows, np.int64), np.asarray(group, np.int64)


def partner_rows(key: pa.ChunkedArray, partner_keys: np.ndarray) -> np.ndarray:
    """int64 row in the selection's identity column ``key`` of each of ``partner_keys`` (all
    present)."""
    wanted = np.unique(partner_keys.astype(str))
    idx = pc.index_in(key, value_set=pa.array(wanted))
    hits = np.flatnonzero(idx.is_valid().to_numpy(zero_copy_only=False))
    row_of = np.full(len(wanted), -1, np.int64)
    row_of[pc.take(idx, hits).to_numpy()] = hits
    if (row_of < 0).any():
        raise ValueError(f"selection: dup_of {wanted[np.argmax(row_of < 0)]!r} is no sample's identity")
    return row_of[np.searchsorted(wanted, partner_keys.astype(str))]


def read_samples(shards, keys: set[str]) -> dict[str, tuple[str | None, str | None]]:
    """``{identity: (thumbnail data URI or None, caption or None)}`` for the samples whose
    identity (:func:`~dbp_lightning.data.shards.sample_id`: uid, else key) is in ``keys``, found
    in ``shards`` (one pass, stopping once all are found); absent ones are left out."""
    found: dict[str, tuple[str | None, str | None]] = {}
    errors: Counter = Counter()
    for path in expand_shards(shards) if keys else []:
        for sample in iter_shard(path, errors):
            key = sample_id(sample)
            if key in keys and key not in found:
                found[key] = (_thumbnail(decode_image(sample)), decode_caption(sample))
                if len(found) == len(keys):
                    return found
    return found


def _thumbnail(image) -> str | None:
    if image is None:
        return None
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: near-duplicates can differ in a few pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _card(label: tuple[str, str], samples: dict, kept: bool, note: str, **data) -> str:
    """One sample, ``label`` = (key, identity), as a thumbnail card: green when ``kept``,
    ``note`` under the caption."""
    key, ident = label
    uri, caption = samples.get(ident, (None, None))
    img = (f'<img src="{uri}" width="{THUMB}" height="{THUMB}" alt="">' if uri else
           '<div class="noimg">no image</div>')
    attrs = "".join(f' data-{k}="{escape(str(v))}"' for k, v in {"key": key, "id": ident, **data}.items())
    text = escape(caption) if caption else "<i>no caption</i>"
    return (f'<figure class="card{" kept" if kept else ""}"{attrs} title="{escape(caption or key)}">'
            f'{img}<figcaption>{text}</figcaption><span class="tag">{note}</span></figure>')


def _header(run: Path, report: dict, config: dict | None, n_needed: int, n_found: int) -> str:
    missing = (f'<p class="note">{n_needed - n_found} of the {n_needed} samples shown were not '
               f'found in the shards.</p>' if n_found < n_needed else "")
    cfg = (f"<details><summary>configuration</summary><pre>{escape(json.dumps(config, indent=2))}"
           f"</pre></details>" if config else "")
    return (f"<h1>Prune report</h1><p><code>{escape(str(run.resolve()))}</code>: kept "
            f"{report['kept']:,} of {report['pool']:,} samples.</p>{missing}{cfg}")


def _funnel(report: dict) -> str:
    pool = max(report["pool"], 1)
    rows = [("pool", None, report["pool"])] + [(s["stage"], s["in"], s["out"]) for s in report["stages"]]
    trs = "".join(
        f'<tr class="stage" data-stage="{escape(name)}" data-in="{n_in if n_in is not None else ""}" '
        f'data-out="{n_out}"><td>{escape(name)}</td><td>{"" if n_in is None else f"{n_in:,}"}</td>'
        f'<td>{n_out:,}</td><td>{"" if n_in is None else f"{n_in - n_out:,}"}</td>'
        f'<td>{100 * n_out / pool:.1f}%</td><td class="barcell"><div class="bar" '
        f'style="width:{100 * n_out / pool:.2f}%"></div></td></tr>' for name, n_in, n_out in rows)
    return ('<h2>Stage funnel</h2><table class="funnel"><tr><th>stage</th><th>in</th><th>out</th>'
            f'<th>removed</th><th>of pool</th><th></th></tr>{trs}</table>')


def _plot(path: Path, title: str, caption: str) -> str:
    if not path.is_file():
        return f'<h2>{title}</h2><p class="note">Skipped: no {path.name} (no dbp stage).</p>'
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return f'<h2>{title}</h2><p>{caption}</p><img class="plot" src="{uri}" alt="{escape(title)}">'


def _clusters(strips, clusters, keys, kept, samples, per_strip: int) -> str:
    head = "<h2>Clusters: most and least prototypical members</h2>"
    if strips is None:
        return head + '<p class="note">Skipped: no selector clusters (no dbp or ssp stage).</p>'
    stats = {name: clusters.column(name).to_numpy() for name in
             ("size", "kept", "quota", "complexity", "d_intra", "d_inter") if name in clusters.column_names}
    parts = [head, (f"<p>{len(strips)} clusters chosen at random. Each shows its {per_strip} "
                    "members closest to the centroid and its members farthest from it; DBP keeps "
                    "the farthest. Green: in the final selection.</p>")]

    def strip(label, rows):
        cards = "".join(_card(keys[r], samples, kept[r], "kept" if kept[r] else "pruned") for r in rows)
        return f'<div class="label">{label}</div><div class="strip">{cards}</div>'

    for c, top, bottom in strips:
        info = ", ".join(f"{k} {v[c]:.3g}" if v.dtype.kind == "f" else f"{k} {v[c]:,}"
                         for k, v in stats.items())
        parts.append(f'<div class="cluster" data-cluster="{c}"><h3>cluster {c} <small>{info}</small></h3>'
                     f'{strip("most prototypical", top)}{strip("least prototypical", bottom)}</div>')
    return "".join(parts)


def _dedup(pairs, keys, samples) -> str:
    head = "<h2>SemDeDup: removed samples and their partners</h2>"
    if pairs is None:
        return head + ('<p class="note">Skipped: the selection has no dup_of column (no semdedup '
                       'stage, or a run written before dup_of existed).</p>')
    rows, partner, group, dup_sim, dedup_kept = pairs
    if len(rows) == 0:
        return head + '<p class="note">SemDeDup removed nothing.</p>'
    parts = [(f"<p>{len(rows)} of the {int((~dedup_kept).sum()):,} samples SemDeDup removed, each "
             "beside the partner (first, framed) its similarity was measured to; removed samples "
             "sharing a partner are shown together, numbered as in <code>dedup_pairs.csv</code>. "
             "Green: kept by SemDeDup (a partner can be removed too, as a duplicate of another "
             "sample).</p>")]
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        p = partner[idx[0]]
        members = "".join(_card(keys[rows[i]], samples, False,
                                f"<b>#{i + 1}</b> sim {dup_sim[rows[i]]:.4f}", pair=i + 1,
                                partner=keys[partner[i]][1]) for i in idx)
        lead = _card(keys[p], samples, dedup_kept[p],
                     "partner, " + ("kept" if dedup_kept[p] else "removed"))
        parts.append(f'<div class="group" data-partner="{escape(keys[p][1])}">{lead}'
                     f'<div class="arrow">&#8592;</div>{members}</div>')
    return head + parts[0] + f'<div class="groups">{"".join(parts[1:])}</div>'


def _write_pairs_csv(path: Path, pairs, keys, samples) -> None:
    rows, partner, group, dup_sim, _ = pairs
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["pair", "group", "removed_key", "partner_key", "removed_id", "partner_id",
                    "similarity", "removed_caption", "partner_caption"])
        for i, (r, p) in enumerate(zip(rows, partner)):
            w.writerow([i + 1, int(group[i]) + 1, keys[r][0], keys[p][0], keys[r][1], keys[p][1],
                        f"{dup_sim[r]:.6f}", samples.get(keys[r][1], (None, ""))[1] or "",
                        samples.get(keys[p][1], (None, ""))[1] or ""])


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1240px; }}
h2 {{ border-bottom: 1px solid #ccc; margin-top: 32px; }}
h3 small {{ font-weight: normal; color: #666; }}
.note {{ color: #a60; }}
table.funnel {{ border-collapse: collapse; }}
.funnel td, .funnel th {{ padding: 3px 10px; text-align: right; }}
.funnel td:first-child, .funnel th:first-child {{ text-align: left; }}
.barcell {{ width: 400px; }}
.bar {{ background: #4a7; height: 14px; }}
img.plot {{ max-width: 100%; border: 1px solid #ddd; }}
.strip {{ display: flex; flex-wrap: wrap; gap: 6px; }}
.label {{ font-size: 12px; color: #666; margin: 6px 0 2px; }}
.card {{ margin: 0; width: 96px; padding: 4px; border: 2px solid #ccc; border-radius: 4px;
        font-size: 11px; background: #fff; color: #555; }}
.card.kept {{ border-color: #2a2; background: #efe; color: #222; }}
.card img, .noimg {{ display: block; margin: 0 auto; width: {thumb}px; height: {thumb}px; }}
.noimg {{ background: #eee; color: #999; text-align: center; line-height: {thumb}px; }}
.card figcaption {{ overflow: hidden; display: -webkit-box; -webkit-line-clamp: 3;
                    -webkit-box-orient: vertical; word-break: break-word; }}
.tag {{ display: block; color: #666; font-size: 10px; }}
.groups {{ display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }}
.group {{ display: flex; flex-wrap: wrap; gap: 6px; padding: 6px;
          border: 1px solid #bbb; border-radius: 6px; background: #fafafa; }}
.group > .card:first-child {{ outline: 2px solid #48c; outline-offset: 1px; }}
.arrow {{ font-size: 20px; color: #999; align-self: center; }}
</style></head><body>
{body}
</body></html>
""".replace("{thumb}", str(THUMB))
