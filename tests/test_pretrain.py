"""ShapesEval pretraining: the loose caption model, the orthogonal text encoder, and exact resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dgpo.shapes.captions import EXACT_CAPTIONS, CaptionModel, caption_scene
from dgpo.shapes.model import (
    LEGACY_SPECIAL_TOKENS,
    ShapesModel,
    WordTokenizer,
    bidirectional_features,
    bidirectional_text_encoder,
    orthogonal_text_encoder,
    with_extra_layers,
    with_text_width,
)
from dgpo.shapes.pretrain import PretrainConfig, build_pool, pretrain, snapshot
from dgpo.shapes.prompts import PromptSpec, all_specs, scene_for_spec, vocabulary
from dgpo.shapes.verifier import verify
from dgpo.shapes.world import render_scene

N_CAPTIONS = 2000


def _captions(category: str, model: CaptionModel, n: int = N_CAPTIONS, seed: int = 0) -> list[tuple[PromptSpec, str, np.ndarray]]:
    """(spec the scene was drawn for, caption, render) for n scenes of one category."""
    rng = np.random.default_rng(seed)
    specs = all_specs(category)
    out = []
    for _ in range(n):
        spec = specs[int(rng.integers(len(specs)))]
        scene = scene_for_spec(spec, rng)
        out.append((spec, caption_scene(scene, model, rng), render_scene(scene)))
    return out


def _caption_true_of(caption: str, image: np.ndarray, category: str) -> bool:
    return verify(PromptSpec.from_metadata(caption, _parse(caption, category)), image).passed


def _parse(caption: str, category: str) -> dict:
    """The clauses a caption states, read back from its words (the grammar's phrasing)."""
    words = caption.split()[3:]
    numbers = {"two": 2, "three": 3, "four": 4}
    if words[0] in numbers:
        return {"category": "counting", "objects": [{"shape": words[1].rstrip("s").replace("crosse", "cross"), "count": numbers[words[0]]}], "relation": None}
    text = " ".join(words)
    relation = next((r for r in ("left of", "right of", "above", "below") if f" {r} " in text), None)
    parts = text.split(f" {relation} ") if relation else text.split(" and ")
    objects = []
    for part in parts:
        tokens = part.split()[1:]
        objects.append({"shape": tokens[-1], "color": tokens[0] if len(tokens) == 2 else None, "count": 1})
    return {"category": category, "objects": objects, "relation": relation}


@pytest.mark.parametrize("category", ["single_object", "two_object", "counting", "colors", "position", "color_attr"])
def test_exact_captions_are_always_true_of_their_scene(category):
    for spec, caption, image in _captions(category, EXACT_CAPTIONS, n=200):
        assert _caption_true_of(caption, image, category), (spec.prompt, caption)


def test_captions_use_only_the_grammar_vocabulary():
    words = set(vocabulary())
    for category in ("counting", "position", "color_attr", "colors"):
        for _, caption, _ in _captions(category, CaptionModel(), n=300):
            assert set(caption.split()) <= words, caption


def test_loose_captions_err_at_the_configured_rates():
    model = CaptionModel(swap_relation=0.3, mention_relation=0.5, count_off_by_one=0.25, mention_count=0.8, wrong_color=0.0, swap_colors=0.0)
    relations = [(s, c, im) for s, c, im in _captions("position", model) if any(r in c for r in (" left of ", " right of ", " above ", " below "))]
    # Relations are stated only for two named objects in a clear relation.
    stated = len(relations) / N_CAPTIONS
    assert 0.3 < stated < model.mention_relation * model.name_second_object + 0.03
    wrong = sum(not _caption_true_of(c, im, "position") for _, c, im in relations) / len(relations)
    assert abs(wrong - model.swap_relation) < 0.05
    counts = [(c, im) for _, c, im in _captions("counting", model) if c.split()[3] in ("two", "three", "four")]
    assert abs(len(counts) / N_CAPTIONS - model.mention_count) < 0.04
    off = sum(not _caption_true_of(c, im, "counting") for c, im in counts) / len(counts)
    assert abs(off - model.count_off_by_one) < 0.04


def test_swapped_colours_bind_each_colour_to_the_other_object():
    model = CaptionModel(mention_color=1.0, wrong_color=0.0, swap_colors=1.0, name_second_object=1.0, mention_relation=0.0)
    for spec, caption, image in _captions("color_attr", model, n=100):
        assert not _caption_true_of(caption, image, "color_attr"), caption
        assert {w for w in caption.split()} >= {o.color for o in spec.objects}


def test_caption_probabilities_are_checked():
    with pytest.raises(ValueError, match="swap_relation"):
        CaptionModel(swap_relation=1.5)


PAIRS = [
    ("a photo of a circle left of a square", "a photo of a circle right of a square"),
    ("a photo of a circle above a square", "a photo of a circle below a square"),
    ("a photo of two circles", "a photo of three circles"),
    ("a photo of a red circle and a blue square", "a photo of a blue circle and a red square"),
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_orthogonal_text_encoder_separates_the_words_a_prompt_depends_on(a, b):
    tokenizer = WordTokenizer(vocabulary())
    encoder = orthogonal_text_encoder(tokenizer)
    ea, eb = (encoder(input_ids=tokenizer([p])).last_hidden_state[0] for p in (a, b))
    differs = [i for i, (x, y) in enumerate(zip(a.split(), b.split())) if x != y]
    for i in differs:  # +1: <bos>
        assert ((ea[i + 1] - eb[i + 1]).norm() / ea[i + 1].norm()) > 0.8
    assert not encoder.embeddings.token_embedding.weight.requires_grad
    again = orthogonal_text_encoder(tokenizer)(input_ids=tokenizer([a])).last_hidden_state[0]
    assert torch.equal(again, ea)


BLOCKS = ("word", "previous word", "words before", "words after")


def _blocks(prompt: str) -> list[dict[str, torch.Tensor]]:
    """Per token of ``prompt`` (after <bos>), its bidirectional feature split into its four blocks."""
    tokenizer = WordTokenizer(vocabulary())
    hidden, _ = bidirectional_features(bidirectional_text_encoder(tokenizer), tokenizer([prompt]), tokenizer)
    return [dict(zip(BLOCKS, row.view(len(BLOCKS), -1))) for row in hidden[0, 1 : len(prompt.split()) + 1]]


def _words(block: torch.Tensor) -> set[str]:
    tokenizer = WordTokenizer(vocabulary())
    return {word for word, i in tokenizer.index.items() if block[i] > 1e-3}


def test_bidirectional_encoder_puts_colour_count_and_side_in_the_shape_token():
    circle = _blocks("a photo of a red circle left of a blue square")[5]
    assert _words(circle["word"]) == {"circle"} and _words(circle["previous word"]) == {"red"}
    assert "left" in _words(circle["words after"]) and "left" not in _words(circle["words before"])
    square = _blocks("a photo of a red circle left of a blue square")[-1]
    assert _words(square["previous word"]) == {"blue"} and "left" in _words(square["words before"])
    assert _words(_blocks("a photo of three circles")[-1]["previous word"]) == {"three"}


@pytest.mark.parametrize("a,b", PAIRS)
def test_bidirectional_encoder_separates_the_words_a_prompt_depends_on_at_the_shapes(a, b):
    """Swapping a relation, count or binding changes the feature of every shape token, not only of the swapped word."""
    shapes = {"circle", "square", "circles"}
    for word, ta, tb in zip(a.split(), _blocks(a), _blocks(b)):
        if word in shapes:
            difference = torch.cat(list(ta.values())) - torch.cat(list(tb.values()))
            assert difference.norm() / torch.cat(list(ta.values())).norm() > 0.05


def test_bidirectional_encoder_ignores_padding_and_survives_save_and_load(tmp_path):
    tokenizer = WordTokenizer(vocabulary())
    encoder = bidirectional_text_encoder(tokenizer)
    ids = tokenizer(["a photo of a red circle"])
    longer = WordTokenizer(vocabulary(), max_length=tokenizer.max_length + 4)
    hidden, pooled = bidirectional_features(encoder, ids, tokenizer)
    padded_hidden, padded_pooled = bidirectional_features(encoder, longer(["a photo of a red circle"]), longer)
    assert torch.allclose(hidden[0, :8], padded_hidden[0, :8], atol=1e-6) and torch.allclose(pooled, padded_pooled, atol=1e-6)
    assert torch.equal(pooled[0], hidden[0, int((ids[0] == tokenizer.eos_id).nonzero())])
    encoder.save_pretrained(tmp_path)
    from dgpo.shapes.model import load_text_encoder

    assert torch.equal(bidirectional_features(load_text_encoder(tmp_path), ids, tokenizer)[0], hidden)
    # Built, not trained: a second build (after other random draws) is the same weights, so the shipped file is reproducible.
    torch.rand(100)
    again = bidirectional_text_encoder(tokenizer).state_dict()
    assert all(torch.equal(value, again[name]) for name, value in encoder.state_dict().items())


def test_a_denoiser_takes_a_new_text_width_keeping_every_other_weight(tiny_model_dir):
    transformer = ShapesModel.from_pretrained(tiny_model_dir).transformer
    widened = with_text_width(transformer, 2 * transformer.config.joint_attention_dim)
    before, after = transformer.state_dict(), widened.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape}
    assert changed and all("context_embedder" in k or "text_embedder.linear_1" in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in changed)
    assert with_text_width(widened, widened.config.joint_attention_dim) is widened


def test_a_denoiser_grown_by_identity_blocks_computes_what_it_did_and_then_learns_with_them(tiny_model_dir):
    model = ShapesModel.from_pretrained(tiny_model_dir)
    shallow = model.transformer
    layers = shallow.config.num_layers
    gen = torch.Generator().manual_seed(0)
    size = model.latent_size
    latents = torch.randn(3, shallow.config.in_channels, size, size, generator=gen)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    features = model.encode_prompts(["a photo of a red circle left of a blue square", "a photo of two crosses", ""])
    before = model.velocity(latents, sigma, features)

    model.transformer = deeper = with_extra_layers(shallow, 2)
    assert deeper.config.num_layers == layers + 2
    assert deeper.transformer_blocks[-1].context_pre_only and not deeper.transformer_blocks[layers - 1].context_pre_only
    old, new = shallow.state_dict(), deeper.state_dict()
    moved = {k.replace(f"transformer_blocks.{layers - 1}.", f"transformer_blocks.{layers + 1}.", 1): v for k, v in old.items()}
    assert all(torch.equal(new[k], v) for k, v in moved.items())
    torch.testing.assert_close(model.velocity(latents, sigma, features), before, rtol=0, atol=1e-6)

    deeper.requires_grad_(True)
    model.velocity(latents, sigma, features).square().mean().backward()
    gate = deeper.transformer_blocks[layers - 1].norm1.linear.weight.grad
    assert gate is not None and gate.abs().sum() > 0, "the new block's gates must receive gradient to open"
    assert with_extra_layers(deeper, 0) is deeper
    with pytest.raises(ValueError, match=">= 0"):
        with_extra_layers(deeper, -1)

def test_pooled_output_is_taken_at_eos_not_at_the_largest_token_id():
    tokenizer = WordTokenizer(vocabulary())
    assert tokenizer.eos_id != 2, "transformers' CLIP pools at the largest token id when eos_token_id == 2"
    encoder = orthogonal_text_encoder(tokenizer)
    ids = tokenizer(["a photo of a yellow circle"])
    out = encoder(input_ids=ids)
    eos_position = int((ids[0] == tokenizer.eos_id).nonzero())
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos_position])


def test_legacy_tokenizer_files_keep_their_token_ids(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"words": ["a", "circle"], "max_length": 6}))
    tokenizer = WordTokenizer.load(tmp_path / "tokenizer.json")
    assert tokenizer.special_tokens == LEGACY_SPECIAL_TOKENS and tokenizer.eos_id == 2
    tokenizer.save(tmp_path / "again.json")
    assert WordTokenizer.load(tmp_path / "again.json")(["a circle"]).tolist() == tokenizer(["a circle"]).tolist()


def test_pool_renders_its_scenes():
    pool = build_pool(12, seed=3)
    assert pool.pixels.shape == (12, 3, 32, 32)
    for spec, scene, pixels in zip(pool.specs, pool.scenes, pool.pixels):
        assert torch.equal(pixels, torch.from_numpy(render_scene(scene)).permute(2, 0, 1).float() / 255.0)
        assert verify(spec, pixels).passed


def _tiny_cfg(tiny_model_dir, output, **overrides) -> PretrainConfig:
    settings = dict(
        output=str(output), continue_from=str(tiny_model_dir), pool_size=48, dit_steps=6, dit_batch=4,
        warmup_steps=2, save_every=2, log_every=1, threads=1,
    )
    return PretrainConfig(**{**settings, **overrides})


class _StopAt:
    def __init__(self, message: str):
        self.message = message

    def __call__(self, line: str) -> None:
        if line.startswith(self.message):
            raise KeyboardInterrupt


def test_resumed_pretraining_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "whole"), log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "split"), log=_StopAt("dit step     3"))
    assert (tmp_path / "split" / "checkpoints").is_dir()
    ema_at_two = load_file(str(tmp_path / "split" / "checkpoints" / "step-00000002" / "ema_transformer.safetensors"))
    snapshot(tmp_path / "split", tmp_path / "snapshot", log=lambda line: None)
    at_two = ShapesModel.from_pretrained(tmp_path / "snapshot").transformer.state_dict()
    assert all(torch.equal(at_two[k], ema_at_two[k]) for k in ema_at_two)
    with pytest.raises(ValueError, match="--resume"):
        pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "split"), log=lambda line: None)
    with pytest.raises(ValueError, match="captions"):
        pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "split", resume=True, captions=EXACT_CAPTIONS), log=lambda line: None)
    # A run started before a recipe field existed (here add_layers and a caption probability) resumes as if it had its default.
    saved_recipe = tmp_path / "split" / "checkpoints" / "pretrain_config.json"
    recipe = json.loads(saved_recipe.read_text())
    del recipe["add_layers"], recipe["captions"]["swap_colors"]
    saved_recipe.write_text(json.dumps(recipe))
    lines = []
    pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "split", resume=True), log=lines.append)
    assert any("resumed the denoiser" in line and "step 2 of 6" in line for line in lines)
    assert not (tmp_path / "split" / "checkpoints").exists()
    weights = "transformer/diffusion_pytorch_model.safetensors"
    whole, split = (load_file(str(tmp_path / d / weights)) for d in ("whole", "split"))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    start = load_file(str(tiny_model_dir / weights))
    assert any(not torch.equal(whole[k], start[k]) for k in whole), "pretraining changed nothing"
    model = ShapesModel.from_pretrained(tmp_path / "split")
    assert torch.equal(model.text_encoder.shared.weight, bidirectional_text_encoder(model.tokenizer).shared.weight)
    assert json.loads((tmp_path / "split" / "pretrain_config.json").read_text())["captions"] == json.loads(json.dumps(CaptionModel().__dict__))


def test_pretraining_grows_a_continued_denoiser_and_refuses_to_grow_a_new_one(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="continue_from"):
        PretrainConfig(output=str(tmp_path / "new"), add_layers=1)
    layers = ShapesModel.from_pretrained(tiny_model_dir).transformer.config.num_layers
    pretrain(_tiny_cfg(tiny_model_dir, tmp_path / "grown", add_layers=1, dit_steps=2), log=lambda line: None)
    assert ShapesModel.from_pretrained(tmp_path / "grown").transformer.config.num_layers == layers + 1
    assert json.loads((tmp_path / "grown" / "pretrain_config.json").read_text())["add_layers"] == 1
