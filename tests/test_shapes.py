"""Tests of the ShapesEval world: renderer, prompt grammar, verifier and quality metrics."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dgpo.shapes import metrics, prompts, verifier, world
from dgpo.shapes.prompts import CATEGORIES, ObjectClause, PromptSpec
from dgpo.shapes.world import BACKGROUND, MIN_GAP, PALETTE, SHAPES, SceneObject, render_scene

BG = np.asarray(BACKGROUND, dtype=np.uint8)


def _random_scenes(n: int, seed: int, max_objects: int = 4) -> list[list[SceneObject]]:
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        items = [(SHAPES[int(rng.integers(len(SHAPES)))], world.COLORS[int(rng.integers(len(world.COLORS)))]) for _ in range(k)]
        scenes.append(world.place_objects(items, rng))
    return scenes


def _outside_boxes(objects, size: int, grow_bottom_right: int = 0) -> np.ndarray:
    outside = np.ones((size, size), dtype=bool)
    for obj in objects:
        x0, y0, x1, y1 = obj.box()
        outside[y0 : y1 + grow_bottom_right, x0 : x1 + grow_bottom_right] = False
    return outside


def _noisy(image: np.ndarray, rng: np.random.Generator, std: float = 8.0) -> np.ndarray:
    return np.clip(np.rint(image + rng.normal(0.0, std, image.shape)), 0, 255).astype(np.uint8)


def _blurred(image: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    out = gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _spec(category: str, prompt_prefix: str) -> PromptSpec:
    matches = [s for s in prompts.all_specs(category) if s.prompt.startswith(prompt_prefix)]
    assert matches, prompt_prefix
    return matches[0]


# --------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [world.IMAGE_SIZE, 48])
def test_render_shape_and_dtype(size):
    image = render_scene([SceneObject("circle", "red", 3, 4, 9)], size=size)
    assert image.shape == (size, size, 3)
    assert image.dtype == np.uint8


def test_background_pixels_equal_background():
    assert (render_scene([]) == BG).all()
    for objects in _random_scenes(60, seed=1):
        image = render_scene(objects)
        # One extra pixel below/right of each box: triangles leak there (see the xfail test below).
        outside = _outside_boxes(objects, world.IMAGE_SIZE, grow_bottom_right=1)
        assert (image[outside] == BG).all()
        # ...and each object really is drawn inside its box.
        for obj in objects:
            x0, y0, x1, y1 = obj.box()
            assert (image[y0:y1, x0:x1] != BG).any(axis=-1).sum() >= obj.size


@pytest.mark.xfail(strict=True, reason="world._draw_shape: triangle polygon ends at x1,y1 (not x1-1,y1-1) and "
                   "leaks ~1/4 coverage into the pixel row/column just past its box")
def test_triangle_stays_inside_its_box():
    obj = SceneObject("triangle", "white", 10, 10, 9)
    image = render_scene([obj])
    assert (image[_outside_boxes([obj], world.IMAGE_SIZE)] == BG).all()


@pytest.mark.parametrize("color", list(PALETTE))
def test_centre_of_large_square_has_palette_colour(color):
    image = render_scene([SceneObject("square", color, 5, 9, world.MAX_OBJECT_SIZE)])
    centre = image[9 + 3 : 9 + 8, 5 + 3 : 5 + 8]
    assert (centre == np.asarray(PALETTE[color], dtype=np.uint8)).all()


def test_placed_objects_keep_min_gap():
    for objects in _random_scenes(200, seed=2):
        for obj in objects:
            assert world.MIN_OBJECT_SIZE <= obj.size <= world.MAX_OBJECT_SIZE
            assert 0 <= obj.x and obj.x + obj.size <= world.IMAGE_SIZE
            assert 0 <= obj.y and obj.y + obj.size <= world.IMAGE_SIZE
        for a, b in itertools.combinations(objects, 2):
            gap_x = max(b.x - (a.x + a.size), a.x - (b.x + b.size))
            gap_y = max(b.y - (a.y + a.size), a.y - (b.y + b.size))
            assert max(gap_x, gap_y) >= MIN_GAP, (a, b)


def test_placement_and_render_are_deterministic():
    items = [("circle", "red"), ("cross", "blue"), ("triangle", "green")]
    first = world.place_objects(items, np.random.default_rng(7))
    second = world.place_objects(items, np.random.default_rng(7))
    other = world.place_objects(items, np.random.default_rng(8))
    assert first == second
    assert first != other
    assert np.array_equal(render_scene(first), render_scene(second))
    assert [(o.shape, o.color) for o in first] == items


@pytest.mark.parametrize("relation", world.RELATIONS)
def test_place_objects_enforces_relation(relation):
    rng = np.random.default_rng(3)
    for _ in range(60):
        a, b = world.place_objects([("square", "red"), ("circle", "blue")], rng, relation=relation)
        assert world.relation_holds(relation, a.center, b.center, world.RELATION_RENDER_MARGIN)
    # relation_holds itself is directional.
    assert world.relation_holds("left of", (1.0, 5.0), (10.0, 5.0), 2.0)
    assert not world.relation_holds("right of", (1.0, 5.0), (10.0, 5.0), 2.0)
    assert not world.relation_holds("left of", (9.0, 5.0), (10.0, 5.0), 2.0)


# --------------------------------------------------------------------------- grammar


def test_every_category_present_in_test_split():
    by_category = Counter(spec.category for spec in prompts.test_specs())
    assert set(by_category) == set(CATEGORIES)
    assert all(by_category[cat] > 0 for cat in CATEGORIES)


def test_train_and_test_prompts_are_disjoint():
    train = {spec.prompt for spec in prompts.train_specs()}
    test = {spec.prompt for spec in prompts.test_specs()}
    assert train and test
    assert not train & test
    # Together they are exactly the grammar.
    assert train | test == {s.prompt for cat in CATEGORIES for s in prompts.all_specs(cat)}


def test_test_prompts_use_vocabulary_only():
    vocabulary = set(prompts.vocabulary())
    assert prompts.vocabulary() == sorted(vocabulary)
    for spec in prompts.test_specs():
        assert set(spec.prompt.split()) <= vocabulary, spec.prompt
    expected = set(SHAPES) | set(world.PLURALS.values()) | set(world.COLORS) | set(prompts.NUMBER_WORDS.values())
    expected |= {w for rel in world.RELATIONS for w in rel.split()}
    assert expected <= vocabulary


def test_test_set_covers_every_category():
    entries = prompts.test_set()
    images = Counter()
    for spec, n in entries:
        assert n >= 1
        images[spec.category] += n
    assert set(images) == set(CATEGORIES)
    for cat in CATEGORIES:
        assert images[cat] >= 90, (cat, images[cat])
    assert [spec for spec, _ in entries] == prompts.test_specs()


def test_scene_for_spec_matches_spec():
    rng = np.random.default_rng(4)
    for cat in CATEGORIES:
        for spec in prompts.all_specs(cat)[:40]:
            objects = prompts.scene_for_spec(spec, rng)
            assert len(objects) == sum(c.count for c in spec.objects)
            shapes = Counter(o.shape for o in objects)
            for clause in spec.objects:
                assert shapes[clause.shape] == clause.count
                if clause.color is not None:
                    assert {o.color for o in objects if o.shape == clause.shape} == {clause.color}
            assert all(o.color in PALETTE for o in objects)
            if spec.relation is not None:
                assert world.relation_holds(spec.relation, objects[0].center, objects[1].center, world.RELATION_RENDER_MARGIN)


def test_metadata_round_trip():
    for spec in prompts.test_specs()[::7]:
        assert PromptSpec.from_metadata(spec.prompt, spec.to_metadata()) == spec


# --------------------------------------------------------------------------- verifier

RENDERS_PER_CATEGORY = 250
# Measured with these seeds (250 per category): clean 1.000 and noise 1.000 in every
# category; blur 0.996 in two_object and counting, 1.000 elsewhere. Over 2000 per category
# (other seeds): clean and noise 1.000 everywhere; blur 0.9995 (two_object), 0.9975
# (counting, color_attr), 0.999 (position), 1.000 elsewhere. The blur failures are two
# objects MIN_GAP apart whose blurred edges bridge the gap above FOREGROUND_DISTANCE, so
# they merge into one blob of unknown shape.
MIN_CLEAN_PASS = 0.995
MIN_NOISE_PASS = 0.99
MIN_BLUR_PASS = 0.98


@pytest.mark.parametrize("category", CATEGORIES)
def test_verifier_passes_ground_truth(category):
    rng = np.random.default_rng(100 + CATEGORIES.index(category))
    specs = prompts.all_specs(category)
    passes = Counter()
    for i in range(RENDERS_PER_CATEGORY):
        spec = specs[i % len(specs)]
        image = render_scene(prompts.scene_for_spec(spec, rng))
        passes["clean"] += verifier.verify(spec, image).passed
        passes["noise"] += verifier.verify(spec, _noisy(image, rng)).passed
        passes["blur"] += verifier.verify(spec, _blurred(image)).passed
    rates = {k: passes[k] / RENDERS_PER_CATEGORY for k in ("clean", "noise", "blur")}
    assert rates["clean"] >= MIN_CLEAN_PASS, rates
    assert rates["noise"] >= MIN_NOISE_PASS, rates
    assert rates["blur"] >= MIN_BLUR_PASS, rates


def test_verifier_accepts_float_chw_tensor():
    rng = np.random.default_rng(5)
    for spec in prompts.test_specs()[::11]:
        image = render_scene(prompts.scene_for_spec(spec, rng))
        tensor = torch.tensor(image).permute(2, 0, 1).float() / 255.0
        assert verifier.verify(spec, tensor) == verifier.verify(spec, image)


def test_wrong_shape_fails_single_object():
    rng = np.random.default_rng(6)
    for drawn, asked in itertools.permutations(SHAPES, 2):
        spec = _spec("single_object", f"a photo of {'an' if asked[0] in 'aeiou' else 'a'} {asked}")
        image = render_scene(world.place_objects([(drawn, "blue")], rng))
        verdict = verifier.verify(spec, image)
        assert not verdict.passed and verdict.partial == 0.0, (drawn, asked, verdict)
        # ...while the right shape passes.
        right = _spec("single_object", f"a photo of {'an' if drawn[0] in 'aeiou' else 'a'} {drawn}")
        assert verifier.verify(right, image).passed


def test_wrong_colour_fails_colors():
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        for asked, drawn in [("red", "blue"), ("green", "yellow"), ("white", "purple"), ("purple", "red")]:
            spec = PromptSpec("colors", f"a photo of a {asked} {shape}", (ObjectClause(shape, asked),))
            image = render_scene(world.place_objects([(shape, drawn)], rng))
            verdict = verifier.verify(spec, image)
            assert not verdict.passed
            assert verdict.partial == pytest.approx(0.5)  # the shape is there, its colour is wrong
            assert dict(verdict.clauses)[f"{shape} is {asked}"] == 0.0


@pytest.mark.parametrize("relation", world.RELATIONS)
def test_swapped_positions_fail_position(relation):
    rng = np.random.default_rng(8)
    specs = [s for s in prompts.all_specs("position") if s.relation == relation]
    for spec in specs:
        a, b = prompts.scene_for_spec(spec, rng)
        assert verifier.verify(spec, render_scene([a, b])).passed
        # Same boxes, contents exchanged: A now sits where B was and vice versa.
        swapped = [SceneObject(a.shape, a.color, b.x, b.y, b.size), SceneObject(b.shape, b.color, a.x, a.y, a.size)]
        verdict = verifier.verify(spec, render_scene(swapped))
        assert not verdict.passed, spec.prompt
        assert dict(verdict.clauses)[relation] == 0.0
        assert verdict.partial == pytest.approx(2.0 / 3.0)


def test_counting_partial_credit():
    rng = np.random.default_rng(9)
    for shape in SHAPES:
        for want, word in prompts.NUMBER_WORDS.items():
            spec = _spec("counting", f"a photo of {word} {world.PLURALS[shape]}")
            for n in range(0, 6):
                objects = world.place_objects([(shape, "green")] * n, rng) if n else []
                verdict = verifier.verify(spec, render_scene(objects))
                assert verdict.passed == (n == want), (spec.prompt, n)
                assert verdict.partial == pytest.approx(max(0.0, 1.0 - abs(n - want) / want)), (spec.prompt, n)
    # The case named in the spec: three objects for a "two ..." prompt.
    spec = _spec("counting", "a photo of two circles")
    verdict = verifier.verify(spec, render_scene(world.place_objects([("circle", "red")] * 3, rng)))
    assert not verdict.passed and verdict.partial == pytest.approx(0.5)


def _draw(*items: tuple[str, tuple[float, float, float, float], str], size: int = world.IMAGE_SIZE) -> np.ndarray:
    """Off-grammar drawings (boxes in pixels, supersampled like the renderer) that look like a
    model's near misses: rectangles, ellipses, rounded squares, two-tone and touching shapes."""
    from PIL import Image, ImageDraw

    s = world.SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for kind, (x0, y0, x1, y1), color in items:
        box = (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1)
        fill = PALETTE[color]
        if kind == "rectangle":
            draw.rectangle(box, fill=fill)
        elif kind == "ellipse":
            draw.ellipse(box, fill=fill)
        elif kind == "rounded_square":
            draw.rounded_rectangle(box, radius=0.3 * (box[2] - box[0]), fill=fill)
        elif kind == "left_half_ellipse":
            draw.pieslice(box, 90, 270, fill=fill)
        elif kind == "right_half_ellipse":
            draw.pieslice(box, 270, 90, fill=fill)
    return np.asarray(canvas.resize((size, size), Image.BOX))


def _shapes_found(image) -> list[str]:
    return [o.shape for o in verifier.detect_objects(image)]


def test_rectangle_is_not_a_square():
    square = _spec("single_object", "a photo of a square")
    assert verifier.verify(square, _draw(("rectangle", (8, 10, 18, 20), "green"))).passed
    for box in [(8, 10, 22, 19), (8, 10, 15, 22)]:  # 14x9 and 7x12
        assert _shapes_found(_draw(("rectangle", box, "green"))) == ["unknown"], box
        assert not verifier.verify(square, _draw(("rectangle", box, "green"))).passed


def test_elongated_or_rounded_blob_is_not_a_circle():
    circle = _spec("single_object", "a photo of a circle")
    assert verifier.verify(circle, _draw(("ellipse", (8, 8, 18, 18), "white"))).passed
    assert _shapes_found(_draw(("ellipse", (6, 10, 22, 20), "white"))) == ["unknown"]  # a 16x10 sausage
    # A square with well rounded corners sits between the circle and the square templates.
    rounded = _draw(("rounded_square", (8, 8, 18, 18), "yellow"))
    assert not verifier.verify(circle, rounded).passed


def test_two_tone_circle_is_a_circle_of_no_palette_colour():
    image = _draw(("left_half_ellipse", (8, 8, 18, 18), "red"), ("right_half_ellipse", (8, 8, 18, 18), "yellow"))
    assert verifier.verify(_spec("single_object", "a photo of a circle"), image).passed
    (found,) = verifier.detect_objects(image)
    assert found.color == "unknown"
    red_circle = PromptSpec("colors", "a photo of a red circle", (ObjectClause("circle", "red"),))
    assert not verifier.verify(red_circle, image).passed


def test_touching_shapes_are_one_blob_not_two_objects():
    spec = PromptSpec("two_object", "a photo of a circle and a square", (ObjectClause("circle"), ObjectClause("square")))
    apart = _draw(("ellipse", (4, 10, 13, 19), "blue"), ("rectangle", (16, 10, 25, 19), "yellow"))
    assert verifier.verify(spec, apart).passed
    touching = _draw(("ellipse", (4, 10, 13, 19), "blue"), ("rectangle", (13, 10, 22, 19), "yellow"))
    assert _shapes_found(touching) == ["unknown"]
    assert not verifier.verify(spec, touching).passed


def test_empty_image_fails_everything():
    empty = render_scene([])
    for cat in CATEGORIES:
        for spec in prompts.all_specs(cat):
            verdict = verifier.verify(spec, empty)
            assert not verdict.passed, spec.prompt
            assert verdict.partial == 0.0, spec.prompt
    assert verifier.detect_objects(empty) == []


def test_color_attr_one_colour_wrong_gets_three_quarters():
    rng = np.random.default_rng(10)
    spec = PromptSpec(
        "color_attr", "a photo of a red circle and a blue square", (ObjectClause("circle", "red"), ObjectClause("square", "blue"))
    )
    for _ in range(10):
        good = render_scene(world.place_objects([("circle", "red"), ("square", "blue")], rng))
        assert verifier.verify(spec, good).passed
        bad = render_scene(world.place_objects([("circle", "red"), ("square", "green")], rng))
        verdict = verifier.verify(spec, bad)
        assert not verdict.passed
        assert verdict.partial == pytest.approx(0.75)
        assert dict(verdict.clauses) == {"has circle": 1.0, "circle is red": 1.0, "has square": 1.0, "square is blue": 0.0}


# --------------------------------------------------------------------------- metrics


def _ground_truth_batch(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    specs = prompts.all_specs("color_attr")
    return np.stack([render_scene(prompts.scene_for_spec(specs[i * 17 % len(specs)], rng)) for i in range(n)])


def _reference_artifact(image: np.ndarray) -> float:
    """Brute force: distance to densely sampled points of every background-to-colour segment."""
    t = np.linspace(0.0, 1.0, 2001)[:, None]
    bg = np.asarray(BACKGROUND, dtype=np.float64)
    points = np.concatenate([bg + t * (np.asarray(c, dtype=np.float64) - bg) for c in PALETTE.values()])
    pixels = image.reshape(-1, 3).astype(np.float64)
    d = np.sqrt(((pixels[:, None, :] - points[None]) ** 2).sum(-1)).min(1)
    return float(d.mean() / (255.0 * np.sqrt(3.0)))


def test_artifact_score_matches_brute_force():
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    images[1] = np.clip(BG + rng.uniform(0, 1, (8, 8, 1)) * (np.asarray(PALETTE["purple"]) - BG.astype(float)), 0, 255).astype(np.uint8)
    scores = metrics.artifact_score(images)
    assert scores.shape == (3,)
    for image, score in zip(images, scores):
        assert score == pytest.approx(_reference_artifact(image), abs=2e-4)
    assert scores[1] < 0.002 < scores[0]  # blends of one palette colour are clean, random colours are not


def test_artifact_score_clean_vs_corrupted():
    clean = _ground_truth_batch(16, seed=12)
    rng = np.random.default_rng(13)
    noisy = np.stack([_noisy(im, rng) for im in clean])
    shifted = np.clip(clean.astype(int) + np.array([30, -20, 0]), 0, 255).astype(np.uint8)
    s_clean, s_noisy, s_shifted = (metrics.artifact_score(x) for x in (clean, noisy, shifted))
    assert s_clean.max() < 1e-3
    assert (s_clean < s_noisy).all()
    assert (s_clean < s_shifted).all()
    assert ((s_clean >= 0) & (s_noisy <= 1) & (s_shifted <= 1)).all()
    # A float CHW tensor in [0, 1] gives the same scores as the uint8 HWC batch.
    tensor = torch.from_numpy(noisy).permute(0, 3, 1, 2).float() / 255.0
    np.testing.assert_allclose(metrics.artifact_score(tensor), s_noisy, atol=1e-6)


def test_diversity_score():
    images = _ground_truth_batch(4, seed=14)
    same = np.repeat(images[:1], 5, axis=0)
    assert metrics.diversity_score(same) == 0.0
    assert metrics.diversity_score(images) > 0.0
    # Known value: black vs white is RMS 1; with a third black image the pairs are 1, 1, 0.
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert metrics.diversity_score(np.stack([black, white])) == pytest.approx(1.0)
    assert metrics.diversity_score(np.stack([black, white, black])) == pytest.approx(2.0 / 3.0)
    # Brute force over pairs.
    x = images.astype(np.float64) / 255.0
    pairs = [np.sqrt(((x[i] - x[j]) ** 2).mean()) for i, j in itertools.combinations(range(4), 2)]
    assert metrics.diversity_score(images) == pytest.approx(np.mean(pairs))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert metrics.diversity_score(tensor) == pytest.approx(np.mean(pairs), abs=1e-6)
    with pytest.raises(ValueError):
        metrics.diversity_score(images[:1])


def test_group_diversity_ignores_singletons():
    images = _ground_truth_batch(6, seed=15)
    collapsed = np.repeat(images[:1], 3, axis=0)
    batch = np.concatenate([collapsed, images[3:5], images[5:6]])
    ids = ["a", "a", "a", "b", "b", "c"]
    expected = (0.0 + metrics.diversity_score(images[3:5])) / 2.0
    assert metrics.group_diversity(batch, ids) == pytest.approx(expected)
    # The singleton "c" changes nothing, whatever it looks like.
    batch2 = batch.copy()
    batch2[5] = 255 - batch2[5]
    assert metrics.group_diversity(batch2, ids) == pytest.approx(expected)
    # Group order and interleaving do not matter.
    order = [3, 0, 5, 1, 4, 2]
    assert metrics.group_diversity(batch[order], [ids[i] for i in order]) == pytest.approx(expected)
    assert np.isnan(metrics.group_diversity(images[:3], [0, 1, 2]))


def test_failure_kind_names_drawing_before_following():
    rng = np.random.default_rng(11)
    position = next(s for s in prompts.all_specs("position") if s.relation == "left of")
    a, b = prompts.scene_for_spec(position, rng)
    assert verifier.failure_kind(position, render_scene([a, b])) is None
    swapped = [SceneObject(a.shape, a.color, b.x, b.y, b.size), SceneObject(b.shape, b.color, a.x, a.y, a.size)]
    assert verifier.failure_kind(position, render_scene(swapped)) == "wrong_relation"
    assert verifier.failure_kind(position, render_scene([a])) == "wrong_shapes"
    square = _spec("single_object", "a photo of a square")
    assert verifier.failure_kind(square, _draw(("rectangle", (8, 10, 22, 19), "green"))) == "unknown_shape"
    red = PromptSpec("colors", "a photo of a red circle", (ObjectClause("circle", "red"),))
    assert verifier.failure_kind(red, render_scene(world.place_objects([("circle", "blue")], rng))) == "wrong_colour"
    three = _spec("counting", "a photo of three")
    drawn = world.place_objects([(three.objects[0].shape, "white")] * 2, rng)
    assert verifier.failure_kind(three, render_scene(drawn)) == "wrong_count"
