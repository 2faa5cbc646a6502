"""``ProjectionCLIP``: a CLIP over frozen pretrained towers, trained on their cached features.

Both towers are locked (LiT's fully locked setting, Zhai et al. 2022): an image encoder and a
text encoder embed the pool once into embedding stores, and only one linear projection per
tower into a shared space, plus the temperature, are trained with open_clip's ``ClipLoss``.
A step costs two small matrix products, so a CPU trains a model in seconds and ``compare`` can
afford every subset at several seeds. What a subset teaches is still decided by its pairs: the
heads only see the (image, caption) pairs the pruning kept.

Data: :func:`paired_features` aligns an image store and a text store by sample key.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from .clip_module import cosine_with_warmup, no_weight_decay
from .store import EmbeddingStore


def paired_features(image_store: str | Path, text_store: str | Path
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (image, text) feature pairs of the samples both stores hold.

    Args:
        image_store, text_store: embedding stores of the same shards (different encoders).

    Returns:
        identities str (P,) (uid, else key) in the image store's order, image float32 (P, d_image), text float32
        (P, d_text). A sample one encoder skipped (no image, no caption) is in neither.
    """
    img, txt = EmbeddingStore(image_store), EmbeddingStore(text_store)
    img_keys, txt_keys = _ids(img), _ids(txt)
    txt_row = {k: i for i, k in enumerate(txt_keys)}
    rows = [(i, txt_row[k]) for i, k in enumerate(img_keys) if k in txt_row]
    if not rows:
        raise ValueError(f"{image_store} and {text_store} share no sample")
    i_rows, t_rows = (np.asarray(r, np.int64) for r in zip(*rows))
    return (img_keys[i_rows], np.asarray(img.embeddings[i_rows], np.float32),
            np.asarray(txt.embeddings[t_rows], np.float32))


def _ids(store: EmbeddingStore) -> np.ndarray:
    from .pruning.pipeline import id_column

    name = id_column(store.metadata_columns())
    return store.metadata([name]).column(name).to_numpy(zero_copy_only=False)


class ProjectionCLIP(L.LightningModule):
    """Contrastive training of one linear head per frozen tower.

    Args:
        image_dim, text_dim: widths of the cached image and text features.
        embed_dim: width of the shared space.
        lr, weight_decay: AdamW (no decay on biases and the logit scale).
        warmup_steps: linear warmup, then cosine to 0 over the trainer's steps (OpenCLIP's).
        seed: seeds the heads' initialisation.

    Batches are ``(image_features, text_features)``: float32 (B, image_dim), (B, text_dim).
    """

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 50, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if min(image_dim, text_dim, embed_dim) < 1 or lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError("image_dim, text_dim, embed_dim must be >= 1, lr > 0, "
                             "weight_decay and warmup_steps >= 0")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.image_head = nn.Linear(image_dim, embed_dim)
            self.text_head = nn.Linear(text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial 1/0.07
        self.loss = open_clip.ClipLoss()

    def setup(self, stage: str) -> None:
        # the ranks are only known once the strategy has launched the processes
        self.loss = open_clip.ClipLoss(cache_labels=True, rank=self.global_rank,
                                       world_size=self.trainer.world_size)

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        """(B, image_dim) frozen image features -> (B, embed_dim), unit norm."""
        return F.normalize(self.image_head(features), dim=-1)

    def encode_text(self, features: torch.Tensor) -> torch.Tensor:
        """(B, text_dim) frozen text features -> (B, embed_dim), unit norm."""
        return F.normalize(self.text_head(features), dim=-1)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        image, text = batch[0], batch[1]
        loss = self.loss(self.encode_image(image), self.encode_text(text), self.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))  # as OpenCLIP does

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            (no_decay if no_weight_decay(name, param) else decay).append(param)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.hparams.lr, betas=(0.9, 0.98), eps=1e-6)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, self.hparams.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
