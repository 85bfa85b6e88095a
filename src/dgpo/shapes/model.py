"""The ShapesEval base model: SD3's architecture in miniature, from real diffusers parts.

An ``AutoencoderKL`` maps 32x32 RGB to 8x8x8 latents (scaled and shifted as SD3 does),
an ``SD3Transformer2DModel`` (MMDiT) predicts the flow velocity on those latents, and a
small text encoder over a closed word vocabulary gives the token sequence and pooled
embedding the MMDiT expects: a fixed bidirectional ``T5EncoderModel`` (the shipped base),
or a ``CLIPTextModel`` (earlier bases, still loadable). Saved in diffusers' folder layout
(``vae/``, ``transformer/``, ``text_encoder/``, ``tokenizer.json``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..models import existing_directory, register_backend
from ..models.base import PromptEmbeddings
from ..models.description import ModelDescription, describe_components
from ..models.sd3 import MMDiTLatents
from .prompts import vocabulary

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


ROLE_HEADS = {
    "previous word": lambda offset: offset == -1,
    "words before": lambda offset: offset < 0,
    "words after": lambda offset: offset > 0,
}
"""What each attention head of the bidirectional encoder reads, by the key's offset from the query token."""
BLOCKED = -1e4


def bidirectional_text_encoder(tokenizer: WordTokenizer) -> T5EncoderModel:
    """A fixed ``T5EncoderModel`` whose every token states its word, the word before it, and the words on either side.

    SD3.5-M reads T5, a bidirectional encoder: the feature of "circle" in "a red circle left of a blue
    square" already knows it is red and that "left of" follows it. This encoder gives the denoiser the same,
    by construction and without training: one layer, no queries or keys, and relative-position biases that
    let head 1 see only the previous word, head 2 only the words before and head 3 only the words after.
    Each head copies what it sees (one-hot words) into its own block of the output, beside the token's own
    word: [word | previous word | mean of words before | mean of words after]. So "which colour goes with
    which shape", "how many" and "which side" are each linear in the token of the shape they are about.
    The pooled output (``bidirectional_features``) is the <eos> token's, whose "words before" is the prompt.
    Deterministic; never trained.
    """
    block = 1 << (tokenizer.vocab_size - 1).bit_length()
    heads = len(ROLE_HEADS)
    config = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=block * (heads + 1), d_kv=block, d_ff=4, num_layers=1, num_heads=heads,
        relative_attention_num_buckets=4 * tokenizer.max_length, relative_attention_max_distance=2 * tokenizer.max_length,
        dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
        is_encoder_decoder=False, use_cache=False,
    )
    encoder = T5EncoderModel(config)
    attention = encoder.encoder.block[0].layer[0].SelfAttention
    offsets = torch.arange(-tokenizer.max_length + 1, tokenizer.max_length)
    buckets = attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=config.relative_attention_num_buckets,
                                                  max_distance=config.relative_attention_max_distance)
    width = config.d_model
    with torch.no_grad():
        encoder.shared.weight.zero_()
        encoder.shared.weight[:, : tokenizer.vocab_size].copy_(torch.eye(tokenizer.vocab_size))
        attention.q.weight.zero_()
        attention.k.weight.zero_()
        attention.v.weight.zero_()
        attention.o.weight.zero_()
        bias = torch.full_like(attention.relative_attention_bias.weight, BLOCKED)
        for head, sees in enumerate(ROLE_HEADS.values()):
            for offset, bucket in zip(offsets.tolist(), buckets.tolist()):
                if sees(offset):
                    bias[bucket, head] = 0.0
            attention.v.weight[head * block : (head + 1) * block, :block] = torch.eye(block)
            attention.o.weight[(head + 1) * block : (head + 2) * block, head * block : (head + 1) * block] = torch.eye(block)
        attention.relative_attention_bias.weight.copy_(bias)
        # The pre-attention RMS norm would scale a one-hot word by sqrt(width); undo it so every block has unit weight.
        encoder.encoder.block[0].layer[0].layer_norm.weight.fill_(width**-0.5)
        # No feed-forward; both of its weights zero, so two builds are equal byte for byte.
        encoder.encoder.block[0].layer[1].DenseReluDense.wi.weight.zero_()
        encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.zero_()
    return encoder.eval().requires_grad_(False)


def clip_features(encoder: CLIPTextModel, token_ids: torch.Tensor, tokenizer: WordTokenizer) -> PromptEmbeddings:
    out = encoder(input_ids=token_ids)
    return out.last_hidden_state, out.pooler_output


def bidirectional_features(encoder: T5EncoderModel, token_ids: torch.Tensor, tokenizer: WordTokenizer) -> PromptEmbeddings:
    """Token features, padding left out of every head's view; pooled at <eos>."""
    hidden = encoder(input_ids=token_ids, attention_mask=(token_ids != tokenizer.pad_id).long()).last_hidden_state
    eos = (token_ids == tokenizer.eos_id).long().argmax(dim=1)
    return hidden, hidden[torch.arange(len(token_ids), device=hidden.device), eos]


TEXT_ENCODER_CLASSES = {"CLIPTextModel": (CLIPTextModel, clip_features), "T5EncoderModel": (T5EncoderModel, bidirectional_features)}
"""Text encoder architectures a saved ShapesEval model may hold (config.json's ``architectures``), and how each gives features."""


def text_encoder_architecture(path: Path) -> str:
    """The text encoder class a saved model's ``text_encoder/config.json`` names (CLIPTextModel before it recorded one)."""
    return json.loads((path / "config.json").read_text()).get("architectures", ["CLIPTextModel"])[0]


def load_text_encoder(path: Path):
    architecture = text_encoder_architecture(path)
    if architecture not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"{path}: unsupported text encoder {architecture!r}; expected one of {', '.join(TEXT_ENCODER_CLASSES)}")
    return TEXT_ENCODER_CLASSES[architecture][0].from_pretrained(path)


def with_text_width(transformer: SD3Transformer2DModel, width: int) -> SD3Transformer2DModel:
    """The same denoiser reading text features of another width: only the two layers that take them in start afresh."""
    if transformer.config.joint_attention_dim == width and transformer.config.pooled_projection_dim == width:
        return transformer
    widened = _rebuilt(transformer, joint_attention_dim=width, pooled_projection_dim=width)
    own = widened.state_dict()
    widened.load_state_dict({k: v if v.shape == own[k].shape else own[k] for k, v in transformer.state_dict().items()})
    return widened


def _rebuilt(transformer: SD3Transformer2DModel, **changes) -> SD3Transformer2DModel:
    """A freshly initialised denoiser of ``transformer``'s config with ``changes`` made to it."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    return SD3Transformer2DModel(**{**config, **changes})


def with_extra_layers(transformer: SD3Transformer2DModel, extra: int) -> SD3Transformer2DModel:
    """The same denoiser with ``extra`` more joint blocks before its last one, each starting as the identity.

    A new block's adaLN-Zero modulations (``norm1``, ``norm1_context``) start at zero, so its gates are
    zero and it passes the image and text streams through unchanged, as DiT initialises every block: the
    deeper denoiser starts out computing exactly what the shallower one did, and training opens the gates.
    The last block stays last (it alone does not update the text stream)."""
    if extra < 0:
        raise ValueError(f"extra layers must be >= 0, got {extra}")
    if extra == 0:
        return transformer
    if transformer.config.dual_attention_layers:
        raise ValueError("adding layers to a denoiser with dual-attention layers is not supported")
    last = transformer.config.num_layers - 1
    deeper = _rebuilt(transformer, num_layers=last + 1 + extra)
    state = deeper.state_dict()
    old_last, new_last = f"transformer_blocks.{last}.", f"transformer_blocks.{last + extra}."
    for key, value in transformer.state_dict().items():
        state[new_last + key[len(old_last):] if key.startswith(old_last) else key] = value
    for block in range(last, last + extra):
        for norm in ("norm1", "norm1_context"):
            for part in ("weight", "bias"):
                state[f"transformer_blocks.{block}.{norm}.linear.{part}"].zero_()
    deeper.load_state_dict(state)
    return deeper


class ShapesModel(MMDiTLatents):
    """Adapter for the ShapesEval model (see ``dgpo.models.base.FlowModelAdapter``), the ``shapes`` backend."""

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
            load_text_encoder(path / "text_encoder"),
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
        features = TEXT_ENCODER_CLASSES[type(self.text_encoder).__name__][1]
        hidden, pooled = features(self.text_encoder, token_ids.to(self.text_encoder_device), self.tokenizer)
        return hidden.to(self.device), pooled.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        with torch.no_grad():
            return self.text_features(self.tokenizer(prompts))


TINY_VAE = dict(block_out_channels=(8, 16, 16), norm_num_groups=4)
TINY_TRANSFORMER = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32)


def build_tiny_model(seed: int = 0) -> ShapesModel:
    """A randomly initialised ShapesEval model with tiny components, for tests and soak benchmarks."""
    torch.manual_seed(seed)
    return ShapesModel.from_config(vocabulary(), vae=TINY_VAE, transformer=TINY_TRANSFORMER).eval()


def resolution_problem(resolution: int) -> str | None:
    """Why the shapes backend cannot draw at ``resolution`` (it draws 32x32), or None."""
    if resolution not in (0, 32):
        return f"the shapes backend draws 32x32 images; model.resolution must be 0 or 32, got {resolution}"
    return None


def describe_shapes(path: str, resolution: int) -> ModelDescription:
    """A ShapesEval model folder ('' or 'shipped': the packaged one) as its configs describe it (``dgpo check``)."""
    directory = SHIPPED_MODEL if path in ("", "shipped") else Path(path)
    if not directory.is_dir():
        return ModelDescription(problems=(f"model.path {path}: no such directory (the shapes backend loads a ShapesEval model folder: "
                                          "vae/, transformer/, text_encoder/, tokenizer.json)",))
    encoder = directory / "text_encoder"
    specs = {"vae": ("diffusers", "AutoencoderKL"), "transformer": ("diffusers", "SD3Transformer2DModel"),
             "text_encoder": ("transformers", text_encoder_architecture(encoder) if (encoder / "config.json").is_file() else "CLIPTextModel")}
    described = describe_components(directory, specs, resolution, ShapesModel.lora_target_modules)
    extra = [resolution_problem(resolution)]
    if not (directory / "tokenizer.json").is_file():
        extra.append(f"model.path {path}: {directory} has no tokenizer.json (the ShapesEval word tokenizer)")
    return dataclasses.replace(described, problems=described.problems + tuple(p for p in extra if p))


@register_backend("shapes", describe=describe_shapes)
def load_shapes_model(path: str, resolution: int) -> ShapesModel:
    """The ``shapes`` backend: the base model shipped in the package for path '' or 'shipped', else the one saved at ``path``."""
    problem = resolution_problem(resolution)
    if problem:
        raise ValueError(problem)
    if path in ("", "shipped"):
        return ShapesModel.from_pretrained(SHIPPED_MODEL)
    return ShapesModel.from_pretrained(existing_directory(path))
