"""Embedding throughput: ``dbp-lightning embed`` against a bare PyTorch loop doing the same work.

Both sides embed the demo pool's training shards (built under --data if missing, as
``dbp-lightning demo`` builds them) with the same encoder, built by ``build_encoder``: the
demo's EfficientNet-Lite0 at 64 px on the images and its MiniLM on the captions. The bare loop
is what a user would write without this package: a ``DataLoader`` over an ``IterableDataset``
that reads each of its worker's tars with ``tarfile``, groups members by key, decodes (PIL /
UTF-8), applies the encoder's preprocessing and batches within a shard; the main process runs
the forward pass under ``inference_mode``, unit-normalises, casts to float16 and saves one
``.npy`` and one key list per shard. Same workers, same batch size, same output.

samples/s = embedded samples / wall seconds from the call to the last file written, model load
included on both sides, after one untimed run of each on one shard (first imports); the median
of --repeats runs, each into an empty directory. The two
outputs are compared row by row (by key) so that a fast side cannot be doing less.

Stages: one more run of each side with 0 workers, every stage timed in-process: read (tar
members to bytes), decode, preprocess (transform / tokenize), forward, write (and, for embed,
"other": Lightning, id checks, manifest). The largest stage is the bottleneck named in the table.

    python benchmarks/bench_embed.py                       # the whole demo pool, ~3 minutes
    python benchmarks/bench_embed.py --max-per-source 1000 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dbp_lightning.config import EncoderConfig

TOWERS = {
    "efficientnet-lite0 64px (image)": EncoderConfig(kind="efficientnet_lite0", model="efficientnet-lite0",
                                                     image_size=64),
    "minilm (text)": EncoderConfig(kind="sentence_transformers", model="minilm", modality="text"),
}
STAGES = ("read", "decode", "preprocess", "forward", "write")


# ---- the bare loop ---------------------------------------------------------------------------

class BareShards(IterableDataset):
    """(shard, keys, batch, last, stage seconds in this worker since its last item)."""

    def __init__(self, shards: list[str], encoder, batch_size: int):
        self.shards, self.batch_size = shards, batch_size
        self.image = encoder.modality == "image"
        self.transform = encoder.image_transform if self.image else None
        self.tokenize = None if self.image else encoder.tokenize

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        clock = defaultdict(float)
        for shard in mine:
            keys, items = [], []
            for key, members in self._samples(shard, clock):
                t = time.perf_counter()
                if self.image:
                    from PIL import Image
                    import io

                    item = Image.open(io.BytesIO(members["png"])).convert("RGB")
                else:
                    item = members["txt"].decode("utf-8").strip()
                clock["decode"] += time.perf_counter() - t
                keys.append(key)
                items.append(item)
                if len(items) == self.batch_size:
                    yield self._batch(shard, keys, items, False, clock)
                    keys, items, clock = [], [], defaultdict(float)
            yield self._batch(shard, keys, items, True, clock)
            clock = defaultdict(float)

    @staticmethod
    def _samples(shard: str, clock: dict):
        t = time.perf_counter()
        with tarfile.open(shard) as tar:
            key, members = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                if stem != key and members:
                    clock["read"] += time.perf_counter() - t
                    yield key, members
                    t = time.perf_counter()
                    members = {}
                key = stem
                members[ext] = data
            clock["read"] += time.perf_counter() - t
            if members:
                yield key, members

    def _batch(self, shard, keys, items, last, clock):
        t = time.perf_counter()
        if not items:
            batch = None
        elif self.image:
            batch = torch.stack([self.transform(i) for i in items])
        else:
            batch = self.tokenize(items)
        clock["preprocess"] += time.perf_counter() - t
        return shard, keys, batch, last, dict(clock)


def bare_embed(shards: list[str], out: Path, config: EncoderConfig, batch_size: int, workers: int) -> dict:
    from dbp_lightning.encoders import build_encoder

    encoder = build_encoder(config).eval()
    embed = encoder.embed_images if encoder.modality == "image" else encoder.embed_texts
    loader = DataLoader(BareShards(shards, encoder, batch_size), batch_size=None, num_workers=workers)
    clock, rows, pending = defaultdict(float), 0, defaultdict(list)
    with torch.inference_mode():
        for shard, keys, batch, last, worker_clock in loader:
            for stage, seconds in worker_clock.items():
                clock[stage] += seconds
            t = time.perf_counter()
            if keys:
                pending[shard].append((keys, F.normalize(embed(batch).float(), dim=-1).half().numpy()))
            clock["forward"] += time.perf_counter() - t
            if last:
                t = time.perf_counter()
                parts = pending.pop(shard)
                name = Path(shard).stem
                np.save(out / f"{name}.npy", np.concatenate([e for _, e in parts]))
                (out / f"{name}.keys.json").write_text(json.dumps(sum((k for k, _ in parts), [])))
                rows += sum(len(k) for k, _ in parts)
                clock["write"] += time.perf_counter() - t
    return {"rows": rows, "clock": dict(clock)}


def bare_rows(out: Path) -> dict[str, np.ndarray]:
    rows = {}
    for npy in sorted(out.glob("*.npy")):
        keys = json.loads(npy.with_suffix(".keys.json").read_text())
        rows.update(zip(keys, np.load(npy)))
    return rows


# ---- dbp-lightning embed ---------------------------------------------------------------------

def dbp_embed(shards: list[str], out: Path, config: EncoderConfig, batch_size: int, workers: int) -> dict:
    from dbp_lightning.embed import embed_shards

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = embed_shards(shards, str(out), config, batch_size=batch_size, num_workers=workers,
                             trainer_kwargs={"accelerator": "cpu"})
    return {"rows": len(store)}


def dbp_rows(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    rows = {}
    for npy in sorted(out.glob("*.npy")):
        keys = pq.read_table(npy.with_suffix(".parquet"), columns=["key"]).column("key").to_pylist()
        rows.update(zip(keys, np.load(npy)))
    return rows


def dbp_stages(shards, out, config, batch_size) -> dict:
    """One in-process run (0 workers) of embed with its stages wrapped in timers."""
    from dbp_lightning import embed as E

    clock = defaultdict(float)

    def timed(fn, stage):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[stage] += time.perf_counter() - t
        return wrapper

    def timed_iter(fn):
        def wrapper(*args, **kwargs):
            it = fn(*args, **kwargs)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    clock["read"] += time.perf_counter() - t
                    return
                clock["read"] += time.perf_counter() - t
                yield item
        return wrapper

    def build(cfg):
        enc = saved["build_encoder"](cfg)
        if enc.image_transform is not None:
            enc.image_transform = timed(enc.image_transform, "preprocess")
        if enc.tokenize is not None:
            enc.tokenize = timed(enc.tokenize, "preprocess")
        return enc

    saved = {"iter_shard": E.iter_shard, "decode_image": E.decode_image, "decode_caption": E.decode_caption,
             "build_encoder": E.build_encoder, "predict_step": E.EmbedModule.predict_step,
             "_write_shard": E.ShardWriter._write_shard}
    E.iter_shard = timed_iter(saved["iter_shard"])
    E.decode_image = timed(saved["decode_image"], "decode")
    E.decode_caption = timed(saved["decode_caption"], "decode")
    E.build_encoder = build
    E.EmbedModule.predict_step = timed(saved["predict_step"], "forward")
    E.ShardWriter._write_shard = timed(saved["_write_shard"], "write")
    try:
        t = time.perf_counter()
        dbp_embed(shards, out, config, batch_size, 0)
        wall = time.perf_counter() - t
    finally:
        for name in ("iter_shard", "decode_image", "decode_caption", "build_encoder"):
            setattr(E, name, saved[name])
        E.EmbedModule.predict_step = saved["predict_step"]
        E.ShardWriter._write_shard = saved["_write_shard"]
    return {"clock": dict(clock), "wall": wall}


# ---- the run ---------------------------------------------------------------------------------

def timed_run(fn, shards, work: Path, config, batch_size, workers) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(dir=work))
    t = time.perf_counter()
    result = fn(shards, out, config, batch_size, workers)
    result["wall"] = time.perf_counter() - t
    result["out"] = out
    return result["rows"] / result["wall"], result


def demo_shards(data: Path, max_per_source) -> list[str]:
    from dbp_lightning.data.demo import DemoSpec, build_demo

    build_demo(data, DemoSpec(max_per_source=max_per_source), workers=2, progress=True)
    return sorted(str(p) for p in (data / "train").glob("*.tar"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="demo data directory, built if missing (default: runs/demo/data, the demo's own; "
                        "runs/demo/data-N with --max-per-source N)")
    p.add_argument("--max-per-source", type=int, default=None, help="a smaller demo pool")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--towers", default=",".join(TOWERS), help="comma-separated, of: " + ", ".join(TOWERS))
    args = p.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.data is None:
        args.data = "runs/demo/data" + (f"-{args.max_per_source}" if args.max_per_source else "")
    shards = demo_shards(Path(args.data), args.max_per_source)
    work = Path(tempfile.mkdtemp(prefix="bench_embed-"))
    print(f"{len(shards)} shards from {args.data}/train, batch {args.batch}, {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    lines = []
    try:
        for name in args.towers.split(","):
            config = TOWERS[name]
            rates = {"embed": [], "bare": []}
            last = {}
            for fn in (dbp_embed, bare_embed):  # untimed: first imports and model loads
                timed_run(fn, shards[:1], work, config, args.batch, args.workers)
            for r in range(args.repeats):
                # alternate which side goes first, so a machine that warms up favours neither
                order = (("embed", dbp_embed), ("bare", bare_embed))[:: 1 if r % 2 == 0 else -1]
                for side, fn in order:
                    rate, result = timed_run(fn, shards, work, config, args.batch, args.workers)
                    rates[side].append(rate)
                    if side in last:
                        shutil.rmtree(last[side]["out"])
                    last[side] = result
            a, b = dbp_rows(last["embed"]["out"]), bare_rows(last["bare"]["out"])
            if a.keys() != b.keys():
                raise SystemExit(f"{name}: embed wrote {len(a)} rows, the bare loop {len(b)}")
            diff = max(float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) for k in a)
            embed_rate, bare_rate = statistics.median(rates["embed"]), statistics.median(rates["bare"])
            stage_out = Path(tempfile.mkdtemp(dir=work))
            dbp_profile = dbp_stages(shards, stage_out, config, args.batch)
            _, bare_profile = timed_run(bare_embed, shards, work, config, args.batch, 0)
            lines.append((name, len(a), embed_rate, bare_rate, diff, dbp_profile, bare_profile))
            print(f"{name}: embed {embed_rate:,.0f}/s, bare {bare_rate:,.0f}/s "
                  f"(runs: {[round(x) for x in rates['embed']]} / {[round(x) for x in rates['bare']]})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("| tower | samples | embed samples/s | bare loop samples/s | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, er, br, diff, _, _ in lines:
        print(f"| {name} | {n:,} | {er:,.0f} | {br:,.0f} | {er / br:.2f}x | {diff:.1e} |")
    print()
    print("Seconds per stage, 0 workers (one process):")
    print()
    print("| tower | side | read | decode | preprocess | forward | write | other | bottleneck |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, _, _, _, _, dp, bp in lines:
        for side, profile in (("embed", dp), ("bare", bp)):
            named = {s: profile["clock"].get(s, 0.0) for s in STAGES}
            other = max(0.0, profile["wall"] - sum(named.values()))
            worst = max(named, key=named.get)
            cells = " | ".join(f"{named[s]:.1f}" for s in STAGES)
            print(f"| {name} | {side} | {cells} | {other:.1f} | {worst} |")


if __name__ == "__main__":
    main()
