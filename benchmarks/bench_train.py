"""Training throughput: CLIPModule under Trainer.fit against a bare PyTorch loop, same run.

Both sides train the same open_clip model (same seed), with the same ClipLoss, AdamW groups,
warmup-cosine schedule, logit-scale clamp and in-memory data, for the same steps; samples/s is
timed over the steps after a warm-up, and the table reports the median of --repeats runs.
Target: Lightning >= 0.9x the bare loop.

    python benchmarks/bench_train.py                       # tiny-clip on CPU
    python benchmarks/bench_train.py --model ViT-B-32 --batch 256 --image-size 224   # on a GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from dbp_lightning.clip_module import CLIPModule, cosine_with_warmup, no_weight_decay


def make_data(module: CLIPModule, n: int, image_size: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    context = module.tokenizer(["x"]).shape[1]
    texts = torch.randint(1, 49000, (n, context), generator=g)
    return TensorDataset(images, texts)


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


def run_lightning(args, data) -> float:
    module = CLIPModule(args.model, warmup_steps=10)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer],
                        precision="bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer.fit(module, DataLoader(data, batch_size=args.batch, shuffle=False, drop_last=True))
    return (args.steps - args.warmup) * args.batch / (timer.end - timer.start)


def run_bare(args, data) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = CLIPModule(args.model, warmup_steps=10).to(device)
    model, loss_fn = module.model, module.loss
    groups = [{"params": [p for n, p in model.named_parameters() if no_weight_decay(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if not no_weight_decay(n, p)], "weight_decay": 0.2}]
    opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, 10, args.steps))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, drop_last=True)
    step, start = 0, None
    model.train()
    while step < args.steps:
        for images, texts in loader:
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
    if device == "cuda":
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * args.batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = make_data(CLIPModule(args.model), args.batch * args.steps, args.image_size)
    lightning, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        bare.append(run_bare(args, data))
        lightning.append(run_lightning(args, data))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lm, bm = statistics.median(lightning), statistics.median(bare)
    print(f"\n{args.model}, batch {args.batch}, {args.image_size}px, {args.steps - args.warmup} timed steps, "
          f"median of {args.repeats}, {device}\n")
    print("| loop | samples/s (median) | runs | ratio |\n|---|---:|---|---:|")
    print(f"| bare PyTorch | {bm:.1f} | {', '.join(f'{v:.1f}' for v in bare)} | 1.00 |")
    print(f"| CLIPModule + Trainer.fit | {lm:.1f} | {', '.join(f'{v:.1f}' for v in lightning)} | {lm / bm:.2f} |")


if __name__ == "__main__":
    main()
