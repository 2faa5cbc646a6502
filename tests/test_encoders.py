import math

import numpy as np
import pytest
import torch
from PIL import Image

from dbp_lightning.encoders import EncoderConfig, build_encoder


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))


def test_open_clip_both_concatenates_and_scores():
    enc = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", modality="both", random_init=True))
    images = torch.stack([enc.image_transform(picture(i)) for i in range(3)])
    texts = enc.tokenize(["a red cat", "a blue car", "noise"])
    emb, score = enc(images, texts)
    assert emb.shape == (3, 128) and enc.dim == 128
    img = torch.nn.functional.normalize(enc.model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(enc.model.encode_text(texts), dim=-1)
    torch.testing.assert_close(emb[:, :64] * math.sqrt(2), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[:, 64:] * math.sqrt(2), txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(score, (img * txt).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_random_weights_are_the_same_in_every_build():
    a = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True))
    b = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True))
    for pa_, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa_, pb)


def test_timm_backbone_from_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    torch.save(reference.state_dict(), tmp_path / "r10.pth")
    enc = build_encoder(EncoderConfig(kind="timm", model="resnet10t", checkpoint=str(tmp_path / "r10.pth")))
    x = torch.stack([enc.image_transform(picture(i)) for i in range(2)])
    emb, score = enc(x)
    assert score is None and emb.shape == (2, reference.num_features)
    with torch.no_grad():
        torch.testing.assert_close(emb, torch.nn.functional.normalize(reference(x), dim=-1))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weights of resnet10t are missing"):
        build_encoder(EncoderConfig(kind="timm", model="resnet10t", checkpoint=str(tmp_path / "bad.pth")))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="clip"), "encoder.kind"),
    (dict(kind="open_clip", model="ViT-Q-99", random_init=True), "not an open_clip architecture"),
    (dict(kind="open_clip", checkpoint="/nonexistent.pt"), "no file"),
    (dict(kind="sentence_transformers", model="/nonexistent", modality="text"), "no sentence-transformers directory"),
    (dict(kind="sentence_transformers", model="minilm", modality="image"), "not available"),
])
def test_bad_encoder_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(EncoderConfig(**kwargs))


NO_WEIGHTS = ("encoder.checkpoint: open_clip model 'ViT-B-32' has no weights; give a local weights file "
              "(encoder.checkpoint=...) or set encoder.random_init=true for random weights (tests and "
              "smoke runs only)")


def test_an_encoder_with_no_weights_is_refused_unless_random_init_says_so(tmp_path):
    """open_clip and timm without a checkpoint would embed (and score) with random weights: the
    config is refused, one line naming the option, unless random_init=true asks for it."""
    import re

    with pytest.raises(ValueError, match=f"^{re.escape(NO_WEIGHTS)}$"):
        EncoderConfig().validate()  # the defaults: open_clip ViT-B-32, no checkpoint
    with pytest.raises(ValueError, match="^encoder.checkpoint: timm model 'resnet10t' has no weights"):
        EncoderConfig(kind="timm", model="resnet10t").validate()
    EncoderConfig(kind="timm", model="resnet10t", random_init=True).validate()
    EncoderConfig(kind="open_clip", model="tiny-clip", random_init=True).validate()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    with pytest.raises(ValueError, match="^encoder.random_init: true contradicts encoder.checkpoint="):
        EncoderConfig(kind="open_clip", checkpoint=str(weights), random_init=True).validate()
    for kind, model, modality in [("efficientnet_lite0", "efficientnet-lite0", "image"),
                                  ("sentence_transformers", "minilm", "text")]:
        EncoderConfig(kind=kind, model=model, modality=modality).validate()  # weights of their own
        with pytest.raises(ValueError, match=f"^encoder.random_init: kind '{kind}' always loads"):
            EncoderConfig(kind=kind, model=model, modality=modality, random_init=True).validate()


def test_identity_leaves_random_init_out_when_false():
    """What store keys, embed.json and manifests record: the fields stores had before
    random_init existed, and random_init only when it is true."""
    assert EncoderConfig().identity() == {"kind": "open_clip", "model": "ViT-B-32", "checkpoint": None,
                                          "modality": "image", "image_size": None}
    assert EncoderConfig(random_init=True).identity()["random_init"] is True
