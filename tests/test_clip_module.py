import os

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from dbp_lightning.clip_module import CLIPModule, cosine_with_warmup

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def toy_pairs(module, n=16):
    """n distinct pictures (colour x stripe orientation) and captions naming both."""
    images, texts = [], []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        if i % 2:
            arr[::8] = 255 - arr[::8]
        else:
            arr[:, ::8] = 255 - arr[:, ::8]
        images.append(module.preprocess_val(Image.fromarray(arr)))
        texts.append(f"{COLOURS[i % 8]} {'horizontal' if i % 2 else 'vertical'} stripes {i}")
    return torch.stack(images), module.tokenizer(texts)


def trainer(**kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_loss_falls_on_a_learnable_pairing():
    module = CLIPModule("tiny-clip", lr=2e-3, warmup_steps=2, weight_decay=0.0)
    images, texts = toy_pairs(module)
    with torch.no_grad():
        start = module.loss(*module(images, texts)).item()
    data = DataLoader(TensorDataset(images, texts), batch_size=16)
    trainer(max_epochs=60, enable_checkpointing=False).fit(module, data)
    with torch.no_grad():
        end = module.loss(*module(images, texts)).item()
    assert start > 2.0 and end < 0.5 * start


def test_optimiser_groups_and_schedule():
    module = CLIPModule("tiny-clip", warmup_steps=3)
    images, texts = toy_pairs(module, 4)
    t = trainer(max_steps=1, enable_checkpointing=False)
    t.fit(module, DataLoader(TensorDataset(images, texts), batch_size=4))
    no_decay, decay = t.optimizers[0].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert t.optimizers[0].defaults["betas"] == (0.9, 0.98) and t.optimizers[0].defaults["eps"] == 1e-6
    assert [cosine_with_warmup(s, 3, 10) for s in (0, 2)] == [1 / 3, 1.0]
    assert cosine_with_warmup(3, 3, 10) == 1.0 and cosine_with_warmup(10, 3, 10) == pytest.approx(0.0)
    assert cosine_with_warmup(6, 3, 9) == pytest.approx(0.5)


def test_lock_image_tower_freezes_it():
    module = CLIPModule("tiny-clip", lock_image=True)
    assert not any(p.requires_grad for p in module.model.visual.parameters())
    assert any(p.requires_grad for n, p in module.model.named_parameters() if not n.startswith("visual"))


def _gathered_loss(rank, world, path, images, texts, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=path)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from types import SimpleNamespace

    module = CLIPModule("tiny-clip")
    module._trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what setup reads
    module.setup("fit")
    half = len(images) // world
    with torch.no_grad():
        loss = module.loss(*module(images[rank * half:(rank + 1) * half], texts[rank * half:(rank + 1) * half]))
    out[rank] = loss.item()
    dist.destroy_process_group()


def test_clip_loss_gathers_across_two_gloo_ranks():
    module = CLIPModule("tiny-clip")
    images, texts = toy_pairs(module, 8)
    with torch.no_grad():
        full = module.loss(*module(images, texts)).item()
    out = mp.Manager().dict()
    port = str(29500 + os.getpid() % 1000)
    mp.spawn(_gathered_loss, args=(2, port, images, texts, out), nprocs=2, join=True)
    # with gathering, each rank's loss is the loss of the global batch
    assert out[0] == pytest.approx(full, rel=1e-5) and out[1] == pytest.approx(full, rel=1e-5)


def test_checkpoint_resume_continues_exactly(tmp_path):
    module = CLIPModule("tiny-clip", lr=1e-3, warmup_steps=2)
    images, texts = toy_pairs(module, 16)
    data = DataLoader(TensorDataset(images, texts), batch_size=4)

    straight = CLIPModule("tiny-clip", lr=1e-3, warmup_steps=2)
    trainer(max_steps=10, enable_checkpointing=False).fit(straight, data)

    class StopAt(L.Callback):  # a run cut short at the end of epoch 2 (4 steps per epoch)
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 8:
                trainer.should_stop = True

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    first = CLIPModule("tiny-clip", lr=1e-3, warmup_steps=2)
    trainer(max_steps=10, callbacks=[ckpt, StopAt()]).fit(first, data)
    path = next(tmp_path.glob("*step=8*.ckpt"))
    resumed = CLIPModule("tiny-clip", lr=1e-3, warmup_steps=2)
    t = trainer(max_steps=10, enable_checkpointing=False)
    t.fit(resumed, data, ckpt_path=str(path))
    assert t.global_step == 10
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * cosine_with_warmup(10, 2, 10))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
