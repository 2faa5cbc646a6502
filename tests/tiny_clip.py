"""CLIPModule on the tiny-clip config, recording which samples it was fed (for stream tests)."""

from dbp_lightning.clip_module import CLIPModule


class TinyCLIP(CLIPModule):
    def __init__(self):
        super().__init__("tiny-clip", lr=1e-3, warmup_steps=1)
        self.seen: list[str] = []
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.seen += list(batch[2])
        self.batches += 1
        return super().training_step(batch, batch_idx)
