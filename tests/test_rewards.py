"""Tests of the reward registry, score handling and the built-in rewards."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dgpo.rewards as rewards
from dgpo.rewards import as_scores, available_rewards, combine_rewards, get_reward, mean_score, register_reward
from dgpo.shapes import prompts as shape_prompts
from dgpo.shapes.prompts import scene_for_spec
from dgpo.shapes.world import BACKGROUND, IMAGE_SIZE, render_scene

BUILTINS = ("shapes_partial", "shapes_strict", "shapes_focused", "jpeg_compressibility", "jpeg_incompressibility")


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC renders -> float (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0 for im in images])


@pytest.fixture(scope="module")
def ground_truth():
    specs = shape_prompts.test_specs()
    rng = np.random.default_rng(0)
    images = _to_tensor([render_scene(scene_for_spec(s, rng)) for s in specs])
    return specs, images


# ----------------------------------------------------------------------------- registry


def test_registry_lists_the_builtins():
    names = available_rewards()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)
    for name in BUILTINS:
        assert callable(get_reward(name))


def test_unknown_reward_has_did_you_mean():
    with pytest.raises(ValueError) as info:
        get_reward("shapes_partal")
    message = str(info.value)
    assert "'shapes_partal'" in message and "did you mean 'shapes_partial'" in message
    assert all(name in message for name in BUILTINS)


def test_unknown_reward_without_close_match():
    with pytest.raises(ValueError) as info:
        get_reward("zzzzzz")
    assert "zzzzzz" in str(info.value) and "did you mean" not in str(info.value)


def test_register_new_reward_and_reject_duplicates(monkeypatch):
    monkeypatch.setattr(rewards.REWARDS, "_items", dict(rewards.REWARDS._items))

    @register_reward("test_constant")
    def constant():
        return lambda images, prompts, metadata: np.full(len(images), 0.25)

    assert "test_constant" in available_rewards()
    assert get_reward("test_constant")(torch.zeros(3, 3, 4, 4), ["a"] * 3, [{}] * 3).tolist() == [0.25] * 3
    with pytest.raises(ValueError, match="test_constant.*already registered"):
        register_reward("test_constant")(constant)


# ----------------------------------------------------------------------------- scores


def test_as_scores_maps_none_to_nan():
    scores = as_scores([1, None, 2.5, np.nan], 4, "r")
    assert scores.dtype == np.float64 and scores.shape == (4,)
    assert scores[0] == 1.0 and scores[2] == 2.5
    assert np.isnan(scores[1]) and np.isnan(scores[3])
    assert as_scores(np.array([0.5, 1.0], dtype=np.float32), 2, "r").tolist() == [0.5, 1.0]


@pytest.mark.parametrize("raw", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], []])
def test_as_scores_rejects_wrong_length_naming_the_reward(raw):
    with pytest.raises(ValueError) as info:
        as_scores(raw, 3, "my_reward")
    message = str(info.value)
    assert "'my_reward'" in message
    assert f"{len(raw)} scores for 3 images" in message


def test_combine_rewards_weighted_sum_and_nan_handling():
    scores = {
        "a": np.array([1.0, 2.0, np.nan, np.nan, 0.0]),
        "b": np.array([10.0, np.nan, 20.0, np.nan, 4.0]),
        "unused": np.array([100.0, 100.0, 100.0, 100.0, 100.0]),
    }
    total = combine_rewards(scores, {"a": 2.0, "b": 0.5})
    np.testing.assert_allclose(total[[0, 1, 2, 4]], [2 + 5, 4, 10, 2])
    assert np.isnan(total[3]), "no reward applies to sample 3"
    assert not np.isnan(total[[0, 1, 2, 4]]).any()


def test_combine_rewards_single_and_negative_weights():
    scores = {"a": np.array([1.0, -2.0]), "b": np.array([3.0, 1.0])}
    np.testing.assert_allclose(combine_rewards(scores, {"a": 1.0}), [1.0, -2.0])
    np.testing.assert_allclose(combine_rewards(scores, {"a": 1.0, "b": -1.0}), [-2.0, -3.0])


def test_mean_score_skips_unscored_images_and_is_nan_without_a_warning_when_none_was_scored():
    assert mean_score(np.array([1.0, np.nan, 0.0, np.nan])) == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_score(np.full(3, np.nan)))


# ----------------------------------------------------------------------------- shapes rewards


@pytest.mark.parametrize("name", ["shapes_partial", "shapes_strict", "shapes_focused"])
def test_shapes_rewards_are_one_on_ground_truth(ground_truth, name):
    specs, images = ground_truth
    scores = get_reward(name)(images, [s.prompt for s in specs], [s.to_metadata() for s in specs])
    scores = as_scores(scores, len(specs), name)
    failing = [specs[i].prompt for i in np.flatnonzero(scores != 1.0)]
    assert not failing, failing


@pytest.mark.parametrize("name", ["shapes_partial", "shapes_strict", "shapes_focused"])
def test_shapes_rewards_are_zero_on_blank_background(name):
    specs = shape_prompts.test_specs()
    blank = torch.tensor(BACKGROUND, dtype=torch.float32).div(255.0).view(1, 3, 1, 1)
    images = blank.expand(len(specs), 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()
    scores = as_scores(get_reward(name)(images, [s.prompt for s in specs], [s.to_metadata() for s in specs]), len(specs), name)
    assert (scores == 0.0).all()


def test_partial_gives_partial_credit_and_strict_does_not():
    spec = next(s for s in shape_prompts.test_specs() if s.category == "two_object")
    scene = scene_for_spec(spec, np.random.default_rng(1))
    half = _to_tensor([render_scene(scene[:1])])  # only the first of the two objects
    meta = [spec.to_metadata()]
    assert get_reward("shapes_partial")(half, [spec.prompt], meta)[0] == pytest.approx(0.5)
    assert get_reward("shapes_strict")(half, [spec.prompt], meta)[0] == 0.0


@pytest.mark.parametrize("name", ["shapes_partial", "shapes_strict", "shapes_focused"])
def test_shapes_rewards_are_nan_without_metadata(ground_truth, name):
    specs, images = ground_truth
    metadata = [{}, {"category": "colors"}, specs[2].to_metadata()]
    scores = get_reward(name)(images[:3], [s.prompt for s in specs[:3]], metadata)
    scores = as_scores(scores, 3, name)
    assert np.isnan(scores[0]) and np.isnan(scores[1])
    assert scores[2] == 1.0


def _swapped_relation(spec, seed: int):
    """A render of the spec's two shapes in the opposite relation: both shapes right, the relation wrong."""
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    wrong = type(spec)(spec.category, spec.prompt, spec.objects, opposite[spec.relation])
    return _to_tensor([render_scene(scene_for_spec(wrong, np.random.default_rng(seed)))])


def test_focused_credit_gives_the_tested_clause_its_share():
    spec = next(s for s in shape_prompts.test_specs() if s.category == "position")
    image, meta = _swapped_relation(spec, 2), [spec.to_metadata()]
    # Clauses: has A (1), has B (1), relation (0). Partial: 2/3. Focused: focus * 0 + (1 - focus) * 1.
    assert get_reward("shapes_partial")(image, [spec.prompt], meta)[0] == pytest.approx(2 / 3)
    assert get_reward("shapes_focused")(image, [spec.prompt], meta)[0] == pytest.approx(1 / 3)
    assert get_reward("shapes_focused", focus=0.9)(image, [spec.prompt], meta)[0] == pytest.approx(0.1)


def test_focused_credit_on_colour_binding_and_untested_categories():
    spec = next(s for s in shape_prompts.test_specs() if s.category == "color_attr")
    a, b = spec.objects
    swapped = type(spec)(spec.category, spec.prompt, (type(a)(a.shape, b.color), type(b)(b.shape, a.color)))
    image, meta = _to_tensor([render_scene(scene_for_spec(swapped, np.random.default_rng(3)))]), [spec.to_metadata()]
    # Both shapes found (object clauses 1, 1), both colours wrong (0, 0): partial 0.5, focused 1 - focus.
    assert get_reward("shapes_partial")(image, [spec.prompt], meta)[0] == pytest.approx(0.5)
    assert get_reward("shapes_focused", focus=0.8)(image, [spec.prompt], meta)[0] == pytest.approx(0.2)
    two = next(s for s in shape_prompts.test_specs() if s.category == "two_object")
    half = _to_tensor([render_scene(scene_for_spec(two, np.random.default_rng(1))[:1])])
    assert get_reward("shapes_focused")(half, [two.prompt], [two.to_metadata()])[0] == pytest.approx(0.5)


def test_focused_credit_rejects_a_focus_outside_zero_one():
    with pytest.raises(ValueError, match="focus"):
        get_reward("shapes_focused", focus=1.0)


# ----------------------------------------------------------------------------- JPEG rewards


def test_jpeg_rewards_order_flat_and_noise():
    flat = torch.full((1, 3, 64, 64), 0.4)
    noise = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compress = as_scores(get_reward("jpeg_compressibility")(images, ["", ""], [{}, {}]), 2, "c")
    incompress = as_scores(get_reward("jpeg_incompressibility")(images, ["", ""], [{}, {}]), 2, "i")
    assert compress[0] > compress[1]
    assert incompress[1] > incompress[0]
    np.testing.assert_allclose(compress, -incompress)
    assert (incompress > 0).all()
