"""Training stream: filter the kept samples out of the pool's shards, or reshard them first?

A synthetic WebDataset pool (cached under --work) of --n samples in --shards tars: 256x256
JPEGs of smooth random pictures with grain (~20-40 KB, like web images), txt captions and json
uids (32-hex). For each keep rate a seeded random selection is written as a run directory
(``selection.parquet``: key, uid, kept) and one epoch is streamed, 64 per batch, 2 workers,
open_clip's ViT-B-32 training preprocess at 224 and its tokenizer, by

- filter: ``DBPDataModule(pool, selection=RUN)``: reads every source sample, keeps the selected;
- reshard: the same with ``reshard=True``: streams new tars holding only the kept samples (the
  reshard itself is timed once, apart: it is paid once per selection);
- open_clip: ``open_clip_train.data.get_wds_dataset`` on those resharded tars (the baseline:
  open_clip's own loader on data that holds only kept samples). With webdataset 1.0 it fails
  (KeyError 'fname': its group_by_keys_nothrow meets webdataset's end-of-shard marker), so its
  module's ``tar_file_expander`` is replaced by one with ``eof_value=None``; nothing else.

All three shuffle as open_clip trains (shard order, sample buffer 5,000 / initial 1,000).
samples/s = samples yielded / wall seconds from creating the epoch's iterator to its last
batch, worker start-up included (training pays it every epoch unless workers persist); the
median of --repeats epochs, each with a fresh loader. Keep 1.0 is the full stream.

    python benchmarks/bench_stream.py                          # 20,000 samples, 32 shards
    python benchmarks/bench_stream.py --n 12000                # ~5.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import io
import json
import logging
import multiprocessing as mp
import shutil
import statistics
import time
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np

KEEPS = (0.28, 0.5, 1.0)
BATCH, WORKERS = 64, 2


def uid(i: int) -> str:
    return hashlib.md5(f"pool-{i:08d}".encode()).hexdigest()


def picture(i: int, size: int = 256) -> bytes:
    """A smooth random picture (upsampled 8x8 colours) with a few shapes and grain: JPEG ~30 KB."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(low)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(10, 120), y0 + rng.integers(10, 120)
        draw.ellipse((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(low, np.int16) + rng.normal(0, 14, (size, size, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_shard(job) -> int:
    import webdataset as wds

    path, lo, hi = job
    size = 0
    tmp = path + ".tmp"
    with wds.TarWriter(tmp) as sink:
        for i in range(lo, hi):
            jpg = picture(i)
            size += len(jpg)
            sink.write({"__key__": f"{i:08d}", "jpg": jpg,
                        "txt": f"a picture of things number {i}".encode(),
                        "json": json.dumps({"uid": uid(i)}).encode()})
    Path(tmp).rename(path)
    return size


def build_pool(work: Path, n: int, n_shards: int) -> list[str]:
    pool = work / f"pool_{n}_{n_shards}"
    done = pool / "done.json"
    per = [n // n_shards + (s < n % n_shards) for s in range(n_shards)]
    starts = np.concatenate([[0], np.cumsum(per)])
    paths = [str(pool / f"shard-{s:05d}.tar") for s in range(n_shards)]
    if not done.is_file():
        pool.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with mp.get_context("fork").Pool(2) as p:
            sizes = p.map(write_shard, [(paths[s], int(starts[s]), int(starts[s + 1])) for s in range(n_shards)])
        done.write_text(json.dumps({"n": n, "jpeg_bytes": sum(sizes), "seconds": time.perf_counter() - t}))
    info = json.loads(done.read_text())
    print(f"pool: {n:,} samples in {n_shards} shards, mean JPEG {info['jpeg_bytes'] / n / 1e3:.1f} KB "
          f"(written in {info['seconds']:.0f} s, cached at {pool})")
    return paths


def write_run(run: Path, n: int, keep: float, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run.mkdir(parents=True, exist_ok=True)
    kept = np.zeros(n, bool)
    kept[np.random.default_rng(seed).choice(n, round(keep * n), replace=False)] = True
    pq.write_table(pa.table({"key": [f"{i:08d}" for i in range(n)], "uid": [uid(i) for i in range(n)],
                             "kept": kept}), run / "selection.parquet")
    return int(kept.sum())


def time_epoch(loader, count) -> tuple[int, float, float]:
    """(samples, seconds to the last batch, seconds to the first batch), from iter()."""
    t = time.perf_counter()
    first, n = None, 0
    for batch in loader:
        n += count(batch)
        if first is None:
            first = time.perf_counter() - t
    return n, time.perf_counter() - t, first


def median_rate(runs) -> tuple[float, float, int]:
    rates = [n / s for n, s, _ in runs]
    return statistics.median(rates), statistics.median(f for _, _, f in runs), runs[0][0]


def open_clip_loader():
    """open_clip's ``get_wds_dataset``, made to run with webdataset 1.0.

    open_clip_torch 3.3's group_by_keys_nothrow reads filesample["fname"] of every item, but
    webdataset 1.0's tar_file_expander ends each shard with an EOF marker ({}): KeyError 'fname'
    in the first worker. Shim: the expander without the marker (open_clip's code otherwise as is).
    """
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    return ocd.get_wds_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dbp_bench_stream")
    args = ap.parse_args()

    import open_clip
    import torch

    get_wds_dataset = open_clip_loader()
    from dbp_lightning.datamodule import DBPDataModule

    torch.set_num_threads(1)
    logging.getLogger("dbp_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"DBPDataModule: the epoch streamed")
    wall = time.perf_counter()
    work = Path(args.work)
    shards = build_pool(work, args.n, args.shards)
    # ViT-B-32's preprocess_train (create_model_and_transforms("ViT-B-32")[1]) without building the model
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    rows = {}
    for keep in KEEPS:
        tag = f"keep_{keep:g}"
        cache = work / "cache" / tag  # fresh per run, so the reshard is timed, not found
        shutil.rmtree(cache, ignore_errors=True)
        kept = write_run(work / "runs" / tag, args.n, keep)

        def dm(reshard: bool):
            return DBPDataModule(shards, cache_dir=str(cache), selection=str(work / "runs" / tag),
                                 num_workers=WORKERS, batch_size=BATCH, image_transform=preprocess,
                                 tokenizer=tokenizer, reshard=reshard)

        t = time.perf_counter()
        filt = dm(False)
        filt.setup("fit")  # the selection's scan (cached for the reshard below)
        scan_s = time.perf_counter() - t
        t = time.perf_counter()
        resh = dm(True)
        resh.setup("fit")  # the scan is found; this is the reshard
        reshard_s = time.perf_counter() - t
        resharded = resh._train_shards

        def dbp(module):
            loader = module.train_dataloader()
            return time_epoch(loader, lambda b: len(b[2]))

        def oc(epoch):
            a = Namespace(train_data="::".join(resharded), val_data=None, dataset_resampled=False,
                          train_num_samples=kept, train_data_upsampling_factors=None, seed=0,
                          batch_size=BATCH, workers=WORKERS, world_size=1)
            info = get_wds_dataset(a, preprocess, is_train=True, epoch=epoch, tokenizer=tokenizer)
            out = time_epoch(info.dataloader, lambda b: len(b[0]))
            del info
            gc.collect()
            return out

        res = {"filter": [], "reshard": [], "open_clip": []}
        for r in range(args.repeats):  # interleaved, so drift hits all three alike
            res["filter"].append(dbp(filt))
            res["reshard"].append(dbp(resh))
            res["open_clip"].append(oc(r))
            print(f"  keep {keep:g} repeat {r + 1}: " + ", ".join(
                f"{k} {v[-1][0] / v[-1][1]:,.0f}/s (first batch {v[-1][2]:.1f} s)" for k, v in res.items()),
                flush=True)
        rows[keep] = {k: median_rate(v) for k, v in res.items()}
        rows[keep].update(kept=kept, reshard_s=reshard_s, scan_s=scan_s)

    print(f"\n{args.n:,} samples in {args.shards} shards; batch {BATCH}, {WORKERS} workers, ViT-B-32 "
          f"preprocess_train at 224 + tokenizer; samples/s from iter() to the last batch (worker start-up "
          f"included), median of {args.repeats} epochs\n")
    print("| keep | kept | filter (samples/s) | reshard stream (samples/s) | open_clip on resharded (samples/s) "
          "| reshard / open_clip | filter / reshard | filter / open_clip | reshard once (s) | reshard pays after (epochs) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for keep, r in rows.items():
        f, s, o = r["filter"][0], r["reshard"][0], r["open_clip"][0]
        saved = r["kept"] * (1 / f - 1 / s)  # seconds per epoch the reshard saves
        pays = f"{r['reshard_s'] / saved:,.1f}" if saved > 0 else "never"
        ratios.append((keep, f / s))
        print(f"| {keep:g} | {r['kept']:,} | {f:,.0f} | {s:,.0f} | {o:,.0f} | {s / o:.2f} | {f / s:.2f} | "
              f"{f / o:.2f} | {r['reshard_s']:.1f} | {pays} |")
    print("\nfirst batch after (s, median): " + "; ".join(
        f"keep {k:g}: filter {r['filter'][1]:.1f}, reshard {r['reshard'][1]:.1f}, open_clip {r['open_clip'][1]:.1f}"
        for k, r in rows.items()))
    print("selection scan (s, once per selection, both ways pay it): " + ", ".join(
        f"keep {k:g}: {r['scan_s']:.1f}" for k, r in rows.items()))

    def crossing(level: float):
        """Keep rate where filter/reshard reaches ``level``, interpolated linearly."""
        (k0, r0), rest = ratios[0], ratios[1:]
        if r0 >= level:
            return None, f"at or below {k0:g} (filter/reshard {r0:.2f} there)"
        for k1, r1 in rest:
            if r1 >= level:
                k = k0 + (level - r0) * (k1 - k0) / (r1 - r0)
                return k, f"{k:.2f}"
            k0, r0 = k1, r1
        return 1.0, f"above {k0:g} (filter/reshard {r0:.2f} there)"

    for level in (1.0, 0.95):
        print(f"crossover (filter/reshard = {level:.2f}): keep {crossing(level)[1]}")
    k95 = crossing(0.95)[0]
    if k95 is None:
        rule = (f"filtering is within 5 % of the resharded stream at every keep rate measured (down to "
                f"{ratios[0][0]:g}); reshard='auto' should reshard only below it, or when the shards are "
                "remote (bytes read, not decode, then cost the difference)")
    else:
        rule = f"reshard when keep < {k95:.2f} (filtering costs more than 5 % per epoch below it)"
    print(f"rule for reshard='auto' (local shards): {rule}")
    print(f"\ntotal wall {time.perf_counter() - wall:,.0f} s")


if __name__ == "__main__":
    main()
