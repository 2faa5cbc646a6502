"""Training throughput: CLIPModule under Trainer.fit fed by DBPDataModule, against a bare loop
fed by open_clip's own loader, same run.

A synthetic WebDataset pool (bench_stream.py's: 256 px JPEGs, txt captions, json uids; cached
under --work) is pruned to --keep by a seeded random selection written as a prune run, and the
kept samples are resharded once (``DBPDataModule(reshard=True)``, untimed). Then, interleaved
--repeats times:

- Lightning: ``Trainer.fit(CLIPModule(model), datamodule=DBPDataModule(pool, selection=RUN,
  reshard=True))``: the shuffled stream (shard order, sample buffer 5,000 / initial 1,000);
- bare: the same open_clip model, ClipLoss, AdamW groups, warmup-cosine schedule and
  logit-scale clamp, written out as a plain PyTorch loop over
  ``open_clip_train.data.get_wds_dataset`` on the same resharded tars (shuffled the same way;
  the webdataset 1.0 shim of bench_stream.py), a new loader per epoch as open_clip's main does.

Both use the model's ``preprocess_train`` and tokenizer, the same batch size and workers, and
run the same steps; samples/s is timed over the steps after --warmup (epoch boundaries, worker
start-up included), the table reports medians. Target: Lightning >= 0.9x the bare loop.

    python benchmarks/bench_train.py                       # tiny-clip on CPU, ~1 minute
    python benchmarks/bench_train.py --model ViT-B-32 --batch 256   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings
from argparse import Namespace
from pathlib import Path

import lightning as L
import torch

from bench_stream import build_pool, open_clip_loader, write_run
from dbp_lightning.clip_module import CLIPModule, cosine_with_warmup, no_weight_decay
from dbp_lightning.datamodule import DBPDataModule


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def datamodule(args, pool) -> DBPDataModule:
    return DBPDataModule(pool["shards"], cache_dir=str(pool["cache"]), selection=str(pool["run"]),
                         reshard=True, batch_size=args.batch, num_workers=args.workers, seed=0)


def run_lightning(args, pool) -> float:
    module = CLIPModule(args.model, warmup_steps=10)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
                        precision="bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer.fit(module, datamodule=datamodule(args, pool))
    return (args.steps - args.warmup) * args.batch / (timer.end - timer.start)


def run_bare(args, pool) -> float:
    get_wds_dataset = open_clip_loader()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = CLIPModule(args.model, warmup_steps=10).to(device)
    model, loss_fn = module.model, module.loss
    groups = [{"params": [p for n, p in model.named_parameters() if no_weight_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if not no_weight_decay(n, p)], "weight_decay": 0.2}]
    opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, 10, args.steps))
    data_args = Namespace(train_data="::".join(pool["resharded"]), val_data=None, dataset_resampled=False,
                          train_num_samples=pool["kept"], train_data_upsampling_factors=None, seed=0,
                          batch_size=args.batch, workers=args.workers, world_size=1)
    step, epoch, start = 0, 0, None
    model.train()
    while step < args.steps:
        data = get_wds_dataset(data_args, module.preprocess_train, is_train=True, epoch=epoch,
                               tokenizer=module.tokenizer)
        for images, texts in data.dataloader:
            if step == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images, texts = images.to(device), texts.to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                out = model(images, texts)
                loss = loss_fn(out[0], out[1], out[2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            if step == args.steps:
                break
        epoch += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * args.batch / (time.perf_counter() - start)


def prepare(args) -> dict:
    """The pool, the prune run keeping --keep of it, and its resharded tars."""
    work = Path(args.work)
    shards = build_pool(work, args.n, args.shards)
    run = work / "runs" / f"keep_{args.keep:g}"
    kept = write_run(run, args.n, args.keep)
    pool = {"shards": shards, "run": run, "kept": kept, "cache": work / "cache"}
    t = time.perf_counter()
    dm = datamodule(args, pool)
    dm.setup("fit")  # the reshard (found in the cache by every later run)
    pool["resharded"] = dm._train_shards
    print(f"kept {kept:,} of {args.n:,} in {len(pool['resharded'])} resharded tars "
          f"(reshard and scan: {time.perf_counter() - t:.1f} s, once)")
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=6000, help="pool samples")
    ap.add_argument("--shards", type=int, default=16, help="pool shards")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of the pool the selection keeps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/dbp_bench_train")
    args = ap.parse_args()
    logging.getLogger("dbp_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"DBPDataModule: the epoch streamed")  # cut by max_steps
    pool = prepare(args)
    lightning, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        bare.append(run_bare(args, pool))
        lightning.append(run_lightning(args, pool))
        print(f"  bare {bare[-1]:.1f}/s, Lightning {lightning[-1]:.1f}/s", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lm, bm = statistics.median(lightning), statistics.median(bare)
    per_epoch = pool["kept"] // args.batch
    print(f"\n{args.model}, batch {args.batch}, {args.workers} workers, {args.steps - args.warmup} timed steps "
          f"({per_epoch} per epoch of {pool['kept']:,} kept samples), median of {args.repeats}, {device}\n")
    print("| loop | samples/s (median) | runs | ratio |\n|---|---:|---|---:|")
    print(f"| bare PyTorch + open_clip get_wds_dataset | {bm:.1f} | {', '.join(f'{v:.1f}' for v in bare)} | 1.00 |")
    print(f"| CLIPModule + Trainer.fit + DBPDataModule | {lm:.1f} | {', '.join(f'{v:.1f}' for v in lightning)} "
          f"| {lm / bm:.2f} |")


if __name__ == "__main__":
    main()
