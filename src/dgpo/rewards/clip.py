"""CLIP-family rewards through ``transformers``: CLIP score, PickScore and a LAION-style aesthetic head.

Each factory takes ``model=`` (a local directory or a hub id; a directory works offline), with
the default read from an environment variable so a recipe naming only the reward can be pointed
at local weights. Preprocessing is done with torch ops on the (B, 3, H, W) tensor instead of
``CLIPProcessor`` so images stay on the device: resize the short side to the model's image size
(bicubic, antialiased), centre-crop, normalise with CLIP's mean/std - what CLIPImageProcessor does.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..requirements import Setting
from .base import register_reward

CLIP_MODEL = Setting("model", "DGPO_CLIP_MODEL", "openai/clip-vit-large-patch14", kind="model")
PICKSCORE_MODEL = Setting("model", "DGPO_PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1", kind="model")
# The PickScore checkpoint ships without tokenizer files; its reference code tokenizes with
# the CLIP-H processor it was fine-tuned from.
PICKSCORE_TOKENIZER = Setting("tokenizer", "DGPO_PICKSCORE_TOKENIZER", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", kind="model")
AESTHETIC_MODEL = Setting("model", "DGPO_AESTHETIC_MODEL", "openai/clip-vit-large-patch14", kind="model")
AESTHETIC_HEAD = Setting("head", "DGPO_AESTHETIC_HEAD", kind="file")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEmbedder:
    """Unit-norm CLIP image and text embeddings, computed in chunks of ``batch_size``."""

    def __init__(self, reward: str, model: str, tokenizer: str | None, device: str | None, batch_size: int):
        from transformers import CLIPModel, CLIPTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(batch_size)
        try:
            self.model = CLIPModel.from_pretrained(model).eval().requires_grad_(False).to(self.device)
            self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer) if tokenizer else None
        except OSError as exc:
            raise UserError(f"reward {reward!r}: cannot load {model!r} (a local directory or a hub id): {exc}") from exc
        self.image_size = self.model.config.vision_config.image_size
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        images = images[..., top : top + self.image_size, left : left + self.image_size]
        return (images - self.mean) / self.std

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        chunks = []
        for chunk in images.split(self.batch_size):
            pooled = self.model.vision_model(pixel_values=self.preprocess(chunk)).pooler_output
            chunks.append(F.normalize(self.model.visual_projection(pooled), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                prompts[start : start + self.batch_size], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            ).to(self.device)
            pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
            chunks.append(F.normalize(self.model.text_projection(pooled), dim=-1))
        return torch.cat(chunks)


def _scores(values: torch.Tensor) -> np.ndarray:
    return values.double().cpu().numpy()


@register_reward("clip_score", requires=(CLIP_MODEL,))
def clip_score(model: str | None = None, device: str | None = None, batch_size: int = 32):
    """Prompt-image alignment: cosine of CLIP image and text embeddings (model: $DGPO_CLIP_MODEL)."""
    model = CLIP_MODEL.value(model)
    clip = ClipEmbedder("clip_score", model, model, device, batch_size)
    return lambda images, prompts, metadata: _scores((clip.images(images) * clip.texts(prompts)).sum(-1))


@register_reward("pickscore", requires=(PICKSCORE_MODEL, PICKSCORE_TOKENIZER))
def pickscore(model: str | None = None, tokenizer: str | None = None, device: str | None = None, batch_size: int = 32):
    """Human preference: PickScore = exp(logit_scale) * cos(image, text) (model: $DGPO_PICKSCORE_MODEL)."""
    clip = ClipEmbedder("pickscore", PICKSCORE_MODEL.value(model), PICKSCORE_TOKENIZER.value(tokenizer), device, batch_size)
    logit_scale = clip.model.logit_scale.exp()
    return lambda images, prompts, metadata: _scores(logit_scale * (clip.images(images) * clip.texts(prompts)).sum(-1))


def _natural_order(name: str) -> list:
    """Sort key putting ``layers.10`` after ``layers.2``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_linear_head(path: str) -> torch.nn.Sequential:
    """A stack of Linear layers from safetensors (``<prefix>.<i>.weight/bias``, applied in index order).

    LAION's improved aesthetic predictor is exactly this: Linear layers with dropout between
    them and no nonlinearity, so its ``.pth`` converts with ``safetensors.torch.save_file``.
    """
    from safetensors.torch import load_file

    tensors = load_file(path)
    layers = []
    for prefix in sorted({key.rsplit(".", 1)[0] for key in tensors}, key=_natural_order):
        weight = tensors[f"{prefix}.weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"{prefix}.bias" in tensors)
        layer.load_state_dict({k: tensors[f"{prefix}.{k}"] for k in layer.state_dict()})
        if layers and layers[-1].out_features != layer.in_features:
            raise ValueError(f"aesthetic head {path}: layer {prefix} takes {layer.in_features} inputs, the previous gives {layers[-1].out_features}")
        layers.append(layer)
    if not layers or layers[-1].out_features != 1:
        raise ValueError(f"aesthetic head {path}: expected Linear layers ending in one output")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


@register_reward("aesthetic", requires=(AESTHETIC_MODEL, AESTHETIC_HEAD))
def aesthetic(model: str | None = None, head: str | None = None, device: str | None = None, batch_size: int = 32):
    """Aesthetics: a linear head on the unit CLIP image embedding ($DGPO_AESTHETIC_MODEL, $DGPO_AESTHETIC_HEAD)."""
    model, head = AESTHETIC_MODEL.value(model), AESTHETIC_HEAD.value(head)
    if not head:
        raise UserError("reward 'aesthetic' needs a head: set DGPO_AESTHETIC_HEAD to a .safetensors file (or pass head=)")
    clip = ClipEmbedder("aesthetic", model, None, device, batch_size)
    mlp = load_linear_head(head).to(clip.device)
    if mlp[0].in_features != clip.model.config.projection_dim:
        raise ValueError(f"aesthetic head {head} takes {mlp[0].in_features}-d embeddings, {model!r} gives {clip.model.config.projection_dim}")
    return lambda images, prompts, metadata: _scores(mlp(clip.images(images)).squeeze(-1))


def save_tiny_clip(path, seed: int = 0, image_size: int = 32) -> None:
    """Save a tiny randomly initialised CLIP and tokenizer: an offline stand-in for tests and benchmarks."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\""
    vocab = {token: i for i, token in enumerate(specials + list(chars) + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tokenizer.save_pretrained(path)
