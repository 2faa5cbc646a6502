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
    enc = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip", modality="both"))
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
    a = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip"))
    b = build_encoder(EncoderConfig(kind="open_clip", model="tiny-clip"))
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
    (dict(kind="open_clip", model="ViT-Q-99"), "not an open_clip architecture"),
    (dict(kind="open_clip", checkpoint="/nonexistent.pt"), "no file"),
    (dict(kind="sentence_transformers", model="/nonexistent", modality="text"), "no sentence-transformers directory"),
    (dict(kind="sentence_transformers", model="minilm", modality="image"), "not available"),
])
def test_bad_encoder_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(EncoderConfig(**kwargs))
