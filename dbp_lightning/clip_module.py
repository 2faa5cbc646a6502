"""``CLIPModule``: an open_clip model trained with OpenCLIP's recipe under Lightning.

The loss is open_clip's own ``ClipLoss``, which gathers features across DDP ranks so the
contrastive batch is the global batch. Optimiser and schedule follow OpenCLIP's defaults:
AdamW (lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 except on gains, biases and the
logit scale), linear warmup then cosine decay to 0 over the trainer's total steps; the logit
scale is clamped to ln(100) after each step as OpenCLIP does. Precision comes from the
Trainer (``bf16-mixed`` on GPU).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import lightning as L
import open_clip
import torch

from .encoders import open_clip_model_name


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """OpenCLIP's schedule as a factor of the base lr: linear warmup over ``warmup`` steps, then
    cosine from 1 to 0 over the remaining ``total - warmup`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """OpenCLIP's exclusion rule: gains, biases, norms and the logit scale get no decay."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


class CLIPModule(L.LightningModule):
    """Contrastive image-text training of an open_clip model.

    Args:
        model: an open_clip architecture ("ViT-B-32"), one of this package's model configs
            ("tiny-clip"), or a path to a model-config JSON.
        pretrained: local open_clip weights to start from (None: random initialisation,
            seeded). Not Lightning's ``checkpoint``: a saved CLIPModule restores without it.
        lr, betas, eps, weight_decay: AdamW, OpenCLIP defaults.
        warmup_steps: linear warmup steps (DataComp medium: 500).
        lock_image, lock_text: freeze a tower (LiT-style).
        grad_checkpointing: trade compute for activation memory.
        local_loss, gather_with_grad: ClipLoss options for large global batches under DDP.
        seed: seeds the random initialisation.

    Batches are ``(images, texts, ...)``: float (B, 3, H, W) and token ids (B, context).
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: Optional[str] = None, lr: float = 5e-4,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.2, warmup_steps: int = 10000, lock_image: bool = False,
                 lock_text: bool = False, grad_checkpointing: bool = False,
                 local_loss: bool = False, gather_with_grad: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or warmup_steps < 0 or weight_decay < 0:
            raise ValueError("lr must be > 0, warmup_steps and weight_decay >= 0")
        name = open_clip_model_name(model)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model, self.preprocess_train, self.preprocess_val = \
                open_clip.create_model_and_transforms(name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(name)
        if lock_image:
            self.model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        if lock_text:
            self.model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.loss = open_clip.ClipLoss(local_loss, gather_with_grad, cache_labels=True)
        # validation batches may differ in number across ranks: a loss that gathers would hang
        self.val_loss = open_clip.ClipLoss()
        self._step_started: Optional[float] = None

    def setup(self, stage: str) -> None:
        # the ranks are only known once the strategy has launched the processes
        self.loss = open_clip.ClipLoss(self.hparams.local_loss, self.hparams.gather_with_grad,
                                       cache_labels=True, rank=self.global_rank,
                                       world_size=self.trainer.world_size)

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        """(image_features, text_features, logit_scale), features L2-normalised."""
        out = self.model(images, texts)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"], out["logit_scale"]
        return out[0], out[1], out[2]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, texts = batch[0], batch[1]
        image_features, text_features, logit_scale = self(images, texts)
        loss = self.loss(image_features, text_features, logit_scale)
        n = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", logit_scale.detach(), batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        now = time.perf_counter()
        if self._step_started is not None:
            self.log("train/samples_per_s", n * self.trainer.world_size / (now - self._step_started),
                     batch_size=n)
        self._step_started = now
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Contrastive loss of each rank's held-out batch (``val_shards``), averaged over ranks
        at epoch end; no per-batch collective, so ranks may hold different numbers of batches."""
        images, texts = batch[0], batch[1]
        loss = self.val_loss(*self(images, texts))
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if no_weight_decay(name, param) else decay).append(param)
        optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                       {"params": decay, "weight_decay": hp.weight_decay}],
                                      lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
