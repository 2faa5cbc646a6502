"""A minimal CLIP LightningModule for DataModule tests (the full CLIPModule is issue 4's)."""

import lightning as L
import open_clip
import torch

from dbp_lightning.encoders import open_clip_model_name


class TinyCLIP(L.LightningModule):
    def __init__(self):
        super().__init__()
        name = open_clip_model_name("tiny-clip")
        self.model, self.preprocess_train, self.preprocess_val = open_clip.create_model_and_transforms(name)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.loss = open_clip.ClipLoss()
        self.seen: list[str] = []
        self.batches = 0

    def training_step(self, batch, batch_idx):
        images, texts, ids = batch
        self.seen += list(ids)
        self.batches += 1
        image_features, text_features, logit_scale = self.model(images, texts)[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        self.log("loss", loss, batch_size=len(ids))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
