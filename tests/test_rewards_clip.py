"""CLIP-family rewards on a tiny random CLIP saved to disk and loaded the way users load real weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from dgpo.rewards import get_reward
from dgpo.rewards.clip import ClipEmbedder, load_linear_head, save_tiny_clip

PROMPTS = ["a red cube", "two blue spheres", "a photo of a dog", "hello world"]
NAMES = ("clip_score", "pickscore", "aesthetic")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    save_tiny_clip(path)
    torch.manual_seed(1)
    head = {"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
            "layers.2.weight": torch.randn(4, 8), "layers.2.bias": torch.randn(4),
            "layers.10.weight": torch.randn(1, 4), "layers.10.bias": torch.randn(1)}
    save_file(head, path / "head.safetensors")
    return path


def _options(name: str, path) -> dict:
    return {"clip_score": dict(model=str(path)), "pickscore": dict(model=str(path), tokenizer=str(path)),
            "aesthetic": dict(model=str(path), head=str(path / "head.safetensors"))}[name]


def _images(n: int = 4, size=(48, 40), seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, *size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shape_determinism_and_batching_invariance(tiny_clip, name):
    reward = get_reward(name, **_options(name, tiny_clip), device="cpu")
    images = _images()
    scores = reward(images, PROMPTS, [{}] * 4)
    assert isinstance(scores, np.ndarray) and scores.shape == (4,) and scores.dtype == np.float64
    assert np.isfinite(scores).all() and len(set(scores.tolist())) == 4
    np.testing.assert_array_equal(reward(images, PROMPTS, [{}] * 4), scores)
    reloaded = get_reward(name, **_options(name, tiny_clip), device="cpu")
    np.testing.assert_array_equal(reloaded(images, PROMPTS, [{}] * 4), scores)
    # float32 agrees to ~1e-7 of the scores' scale whatever the batch size, not to 1e-5 of a score near zero
    # (a pickscore of 0.0178 beside scores of 5 differed by 1.3e-6 between batch sizes on one CPU).
    atol = 1e-6 * max(1.0, float(np.abs(scores).max()))
    one_by_one = np.concatenate([reward(images[i : i + 1], PROMPTS[i : i + 1], [{}]) for i in range(4)])
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-5, atol=atol)
    chunked = get_reward(name, **_options(name, tiny_clip), device="cpu", batch_size=3)
    np.testing.assert_allclose(chunked(images, PROMPTS, [{}] * 4), scores, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_device_and_input_dtype(tiny_clip, name):
    reward = get_reward(name, **_options(name, tiny_clip), device="cpu")
    images = _images()
    expected = reward(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(reward(images.double(), PROMPTS, [{}] * 4), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reward(images.permute(0, 1, 3, 2).contiguous().transpose(2, 3), PROMPTS, [{}] * 4), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(tiny_clip, name):
    images = _images()
    cpu = get_reward(name, **_options(name, tiny_clip), device="cpu")(images, PROMPTS, [{}] * 4)
    cuda = get_reward(name, **_options(name, tiny_clip), device="cuda")(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(cuda, cpu, rtol=1e-3, atol=1e-4)


def test_text_rewards_depend_on_the_prompt_and_aesthetic_does_not(tiny_clip):
    image = _images(1).expand(4, -1, -1, -1)
    for name in ("clip_score", "pickscore"):
        scores = get_reward(name, **_options(name, tiny_clip))(image, PROMPTS, [{}] * 4)
        assert np.diff(np.sort(scores)).min() > 1e-3, (name, scores)
    scores = get_reward("aesthetic", **_options("aesthetic", tiny_clip))(image, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(scores, scores[0], rtol=1e-5)


def test_clip_score_matches_transformers_reference(tiny_clip):
    """Cosine of get_image_features / get_text_features with CLIPImageProcessor preprocessing."""
    images = (_images(3, size=(32, 32)) * 255).round() / 255  # 8-bit exact, at the model's size: no resampling
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in images], do_rescale=False, return_tensors="pt").pixel_values
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = tokenizer(PROMPTS[:3], padding=True, return_tensors="pt")
        text_emb = model.text_projection(model.text_model(**tokens).pooler_output)
    expected = torch.nn.functional.cosine_similarity(image_emb, text_emb).numpy()
    np.testing.assert_allclose(get_reward("clip_score", model=str(tiny_clip))(images, PROMPTS[:3], [{}] * 3), expected, atol=1e-5)
    pick = get_reward("pickscore", model=str(tiny_clip), tokenizer=str(tiny_clip))(images, PROMPTS[:3], [{}] * 3)
    np.testing.assert_allclose(pick, model.logit_scale.exp().item() * expected, rtol=1e-4)


def test_preprocess_matches_clip_image_processor_when_resampling(tiny_clip):
    """Down-sizing a non-square noise image: PIL's antialiased bicubic, to within its 8-bit rounding."""
    clip = ClipEmbedder("t", str(tiny_clip), None, "cpu", 8)
    images = (_images(3, size=(80, 64)) * 255).round() / 255
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(images=[(im.permute(1, 2, 0) * 255).round().byte().numpy() for im in images], return_tensors="pt").pixel_values
    difference = (clip.preprocess(images) - expected).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.1  # bilinear or no antialiasing: mean > 0.09


def test_preprocess_resizes_crops_and_normalises(tiny_clip):
    clip = ClipEmbedder("t", str(tiny_clip), None, "cpu", 8)
    grey = torch.full((2, 3, 64, 96), 0.5)
    out = clip.preprocess(grey)
    assert out.shape == (2, 3, 32, 32)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out))
    # centre crop of a wide image: a stripe on the left edge is cut away, one in the middle is kept
    wide = torch.zeros(1, 3, 32, 96)
    wide[..., :8] = 1.0
    assert clip.preprocess(wide).amax() == clip.preprocess(torch.zeros(1, 3, 32, 32)).amax()
    wide[..., 44:52] = 1.0
    assert clip.preprocess(wide).amax() > clip.preprocess(torch.zeros(1, 3, 32, 32)).amax()


def test_aesthetic_head_applies_layers_in_index_order(tiny_clip):
    from safetensors.torch import load_file

    head = load_linear_head(str(tiny_clip / "head.safetensors"))
    assert [layer.in_features for layer in head] == [16, 8, 4]  # layers.10 after layers.2
    tensors = load_file(tiny_clip / "head.safetensors")
    clip = ClipEmbedder("t", str(tiny_clip), None, "cpu", 8)
    images = _images()
    x = clip.images(images)
    for i in (0, 2, 10):
        x = x @ tensors[f"layers.{i}.weight"].T + tensors[f"layers.{i}.bias"]
    scores = get_reward("aesthetic", **_options("aesthetic", tiny_clip))(images, PROMPTS, [{}] * 4)
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_aesthetic_head_errors(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.delenv("DGPO_AESTHETIC_HEAD", raising=False)
    with pytest.raises(RuntimeError, match="DGPO_AESTHETIC_HEAD"):
        get_reward("aesthetic", model=str(tiny_clip))
    save_file({"a.weight": torch.randn(8, 16), "b.weight": torch.randn(1, 4)}, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="layer b takes 4 inputs, the previous gives 8"):
        load_linear_head(str(tmp_path / "broken.safetensors"))
    save_file({"a.weight": torch.randn(1, 32)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="takes 32-d embeddings"):
        get_reward("aesthetic", model=str(tiny_clip), head=str(tmp_path / "wide.safetensors"))


def test_model_paths_from_environment(tiny_clip, monkeypatch):
    """The trainer calls get_reward(name) with no options: the environment points it at the weights."""
    monkeypatch.setenv("DGPO_CLIP_MODEL", str(tiny_clip))
    monkeypatch.setenv("DGPO_PICKSCORE_MODEL", str(tiny_clip))
    monkeypatch.setenv("DGPO_PICKSCORE_TOKENIZER", str(tiny_clip))
    monkeypatch.setenv("DGPO_AESTHETIC_MODEL", str(tiny_clip))
    monkeypatch.setenv("DGPO_AESTHETIC_HEAD", str(tiny_clip / "head.safetensors"))
    images = _images()
    for name in NAMES:
        np.testing.assert_array_equal(get_reward(name)(images, PROMPTS, [{}] * 4),
                                      get_reward(name, **_options(name, tiny_clip))(images, PROMPTS, [{}] * 4))


def test_load_errors_name_the_reward_and_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError, match=rf"reward 'pickscore': cannot load '{missing}'"):
        get_reward("pickscore", model=missing)
    with pytest.raises(ValueError, match="reward 'clip_score': .*unexpected keyword argument 'modle'"):
        get_reward("clip_score", modle="x")
