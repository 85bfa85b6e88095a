"""The ShapesEval base model: SD3's architecture in miniature, from real diffusers parts.

An ``AutoencoderKL`` maps 32x32 RGB to 8x8x8 latents (scaled and shifted as SD3 does),
an ``SD3Transformer2DModel`` (MMDiT) predicts the flow velocity on those latents, and a
small ``transformers.CLIPTextModel`` over a closed word vocabulary gives the token
sequence and pooled embedding the MMDiT expects. Saved in diffusers' folder layout
(``vae/``, ``transformer/``, ``text_encoder/``, ``tokenizer.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from .base import PromptEmbeddings
from .sd3 import MMDiTLatents

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
# Token order of models saved before tokenizer.json recorded its special tokens. With <eos> at id 2,
# transformers' CLIPTextModel takes the pooled output at the largest token id instead of at <eos>.
LEGACY_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
DEFAULT_MAX_TOKENS = 16
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes-base"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=8,
    norm_num_groups=8,
    sample_size=32,
    mid_block_add_attention=False,
    scaling_factor=1.0,
    shift_factor=0.0,
)
TEXT_HIDDEN = 64
TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=1,
    in_channels=8,
    out_channels=8,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_HIDDEN,
    caption_projection_dim=128,
    pooled_projection_dim=TEXT_HIDDEN,
    pos_embed_max_size=8,
)


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary: <bos> words <eos> <pad>...

    Unknown words and over-long prompts raise ``ValueError`` naming the problem, so a
    typo in a prompt file fails before any training starts.
    """

    def __init__(self, words: list[str], max_length: int = DEFAULT_MAX_TOKENS, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        self.words = list(words)
        self.max_length = max_length
        self.special_tokens = tuple(special_tokens)
        self.index = {w: i for i, w in enumerate(self.special_tokens + tuple(self.words))}
        self.pad_id, self.bos_id, self.eos_id = (self.index[t] for t in ("<pad>", "<bos>", "<eos>"))

    @property
    def vocab_size(self) -> int:
        return len(self.index)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.index or w in self.special_tokens]
            if unknown:
                raise ValueError(f"prompt {prompt!r} has words outside the text encoder's vocabulary: {unknown}")
            if len(words) + 2 > self.max_length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words; the text encoder accepts at most {self.max_length - 2}"
                )
            ids = [self.bos_id] + [self.index[w] for w in words] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def save(self, path: Path) -> None:
        data = {"words": self.words, "max_length": self.max_length, "special_tokens": list(self.special_tokens)}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        return cls(data["words"], data["max_length"], tuple(data.get("special_tokens", LEGACY_SPECIAL_TOKENS)))


def text_encoder_config(tokenizer: WordTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.max_length,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )


def orthogonal_text_encoder(tokenizer: WordTokenizer, seed: int = 0) -> CLIPTextModel:
    """A fixed ``CLIPTextModel`` that keeps every word and every position distinct by construction.

    T5 hands SD3.5-M features in which "left" and "right", "two" and "three", and each colour's
    place in the prompt are distinct; what the denoiser makes of them is learned. This encoder
    does the same for the ShapesEval grammar without any training: word and position embeddings
    are orthonormal vectors (also orthogonal to the all-ones direction, so layer norm's centring
    keeps them orthogonal), and its single layer attends uniformly to the prompt so far (zero
    queries and keys, identity values and output, no MLP). Output token i is its own word and
    position plus the mean of the prefix; the pooled output, at <eos>, is the mean of the prompt.
    It is deterministic in ``seed`` and is never trained.
    """
    config = text_encoder_config(tokenizer)
    config.num_hidden_layers = 1
    hidden, n_words, n_positions = config.hidden_size, tokenizer.vocab_size, tokenizer.max_length
    if n_words + n_positions >= hidden:
        raise ValueError(f"an orthogonal text encoder of width {hidden} holds at most {hidden - 1} words and positions, got {n_words + n_positions}")
    encoder = CLIPTextModel(config)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.cat([torch.ones(hidden, 1), torch.randn(hidden, n_words + n_positions, generator=generator)], dim=1)
    basis = torch.linalg.qr(directions)[0][:, 1:].T * hidden**0.5  # rows orthogonal, norm sqrt(hidden), zero mean
    layer = encoder.encoder.layers[0]
    with torch.no_grad():
        encoder.embeddings.token_embedding.weight.copy_(basis[:n_words])
        encoder.embeddings.position_embedding.weight.copy_(0.5 * basis[n_words:])
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.fc2):
            projection.weight.zero_()
            projection.bias.zero_()
        for projection in (layer.self_attn.v_proj, layer.self_attn.out_proj):
            projection.weight.copy_(torch.eye(hidden))
            projection.bias.zero_()
    return encoder.eval().requires_grad_(False)


class ShapesModel(MMDiTLatents):
    """Adapter for the ShapesEval model (see ``dgpo.models.base.FlowModelAdapter``)."""

    def __init__(self, vae: AutoencoderKL, transformer: SD3Transformer2DModel, text_encoder: CLIPTextModel, tokenizer: WordTokenizer):
        self.vae = vae
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @classmethod
    def from_config(
        cls, words: list[str], max_tokens: int = DEFAULT_MAX_TOKENS, vae: dict | None = None, transformer: dict | None = None
    ) -> "ShapesModel":
        """Randomly initialised components (for pretraining; tests shrink them with the override dicts)."""
        tokenizer = WordTokenizer(words, max_tokens)
        return cls(
            AutoencoderKL(**{**VAE_CONFIG, **(vae or {})}),
            SD3Transformer2DModel(**{**TRANSFORMER_CONFIG, **(transformer or {})}),
            CLIPTextModel(text_encoder_config(tokenizer)),
            tokenizer,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path = SHIPPED_MODEL) -> "ShapesModel":
        path = Path(path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"no ShapesEval model at {path} (expected vae/, transformer/, text_encoder/, tokenizer.json)")
        model = cls(
            AutoencoderKL.from_pretrained(path / "vae"),
            SD3Transformer2DModel.from_pretrained(path / "transformer"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            WordTokenizer.load(path / "tokenizer.json"),
        )
        model.eval()
        return model

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(path / "vae")
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save(path / "tokenizer.json")

    def eval(self) -> "ShapesModel":
        for module in (self.vae, self.transformer, self.text_encoder):
            module.eval().requires_grad_(False)
        return self

    def to(self, device: torch.device | str) -> "ShapesModel":
        for module in (self.vae, self.transformer, self.text_encoder):
            module.to(device)
        return self

    @property
    def latent_size(self) -> int:
        return self.transformer.config.sample_size

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder]

    def text_features(self, token_ids: torch.Tensor) -> PromptEmbeddings:
        out = self.text_encoder(input_ids=token_ids.to(self.text_encoder_device))
        return (out.last_hidden_state.to(self.device), out.pooler_output.to(self.device))

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            return self.text_features(self.tokenizer(prompts))


TINY_VAE = dict(block_out_channels=(8, 16, 16), norm_num_groups=4)
TINY_TRANSFORMER = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32)


def build_tiny_model(seed: int = 0) -> ShapesModel:
    """A randomly initialised ShapesEval model with tiny components, for tests and soak benchmarks."""
    from ..shapes.prompts import vocabulary

    torch.manual_seed(seed)
    return ShapesModel.from_config(vocabulary(), vae=TINY_VAE, transformer=TINY_TRANSFORMER).eval()
