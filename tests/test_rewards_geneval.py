"""GenEval reward: the decision layer on hand-built detections, the mmdet result format, colour crops and
the CLIP colour classifier on a tiny CLIP, prompt conversion, and the real detector stack where installed.

Comments cite the GenEval lines a test mirrors: djghosh13/geneval evaluation/evaluate_images.py at
commit 16f1681 ("GE Lnnn"), and for the partial credit Flow-GRPO's reward server, yifan123/reward-server
reward_server/gen_eval.py ``evaluate_reward`` ("FG").
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

from dgpo.rewards import available_rewards, get_reward
from dgpo.rewards.clip import ClipEmbedder, save_tiny_clip
from dgpo.rewards.geneval import (
    COLORS,
    ColourClassifier,
    GenEvalRules,
    colour_crop,
    compute_iou,
    convert_geneval_prompts,
    is_geneval_metadata,
    judge,
    relative_position,
    select_detections,
)
from dgpo.rewards.geneval_detectors import OBJECT_NAMES, Detection, detections_from_mmdet
from dgpo.train.data import PromptSource

INSTALLED = all(importlib.util.find_spec(name) is not None for name in ("mmdet", "mmcv"))
needs_extra = pytest.mark.skipif(
    not INSTALLED,
    reason="mmdet/mmcv (the geneval-mmdet extra) is not installed: pip install --no-build-isolation 'dgpo[geneval-mmdet]' "
    "(mmdet 2.x, mmcv-full 1.7); the test also needs DGPO_GENEVAL_CHECKPOINT=<mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth>",
)


def det(name: str, confidence: float, box, color: str | None = None) -> Detection:
    return Detection(name, confidence, tuple(float(v) for v in box), color=color)


def verdict(detections: list[Detection], metadata: dict, rules: GenEvalRules | None = None):
    rules = rules or GenEvalRules()
    return judge(select_detections(detections, metadata.get("tag"), rules), metadata, rules)


# GenEval metadata lines, as prompts/create_prompts.py writes them.
SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}], "prompt": "a photo of a cat and a dog"}
COUNTING = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}], "prompt": "a photo of two cups"}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}],
              "prompt": "a photo of a red car and a blue bench"}
# "a photo of a dog left of a cat": the target (cat) is clause 0, the dog carries ["left of", 0].
POSITION = {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a dog left of a cat"}

LEFT, RIGHT = (10, 100, 110, 200), (300, 100, 400, 200)


# ----------------------------------------------------------------------------- geometry


def test_iou_counts_pixels_inclusively():
    # GE L131: area_fn = max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert compute_iou((0, 0, 9, 9), (10, 0, 19, 9)) == 0.0, "touching boxes share no pixel"
    assert compute_iou((0, 0, 9, 9), (9, 0, 18, 9)) == pytest.approx(10 / 190), "a shared edge column is a pixel of both"


@pytest.mark.parametrize(
    "box_a, box_b, relations",
    [
        (LEFT, RIGHT, {"left of"}),
        (RIGHT, LEFT, {"right of"}),
        ((100, 0, 200, 50), (100, 300, 200, 350), {"above"}),  # image y grows downwards
        ((100, 300, 200, 350), (100, 0, 200, 50), {"below"}),
        ((0, 0, 50, 50), (400, 400, 450, 450), {"left of", "above"}),  # a clear diagonal is both
        ((0, 0, 100, 100), (10, 10, 110, 110), set()),  # offset inside the margin: no relation
        ((0, 0, 100, 100), (0, 0, 100, 100), set()),
    ],
)
def test_relative_position(box_a, box_b, relations):
    # GE L140-157: centres, offset shrunk by POSITION_THRESHOLD * (dim_a + dim_b), |component| > 0.5 of the offset
    assert relative_position(box_a, box_b) == relations


def test_relative_position_margin_is_a_tenth_of_both_widths():
    # GE L147: revised_offset = max(|offset| - 0.1 * (dim_a + dim_b), 0) * sign(offset); GE L151: / norm(offset).
    # Two 50-wide boxes: margin 10. Offset 20 -> 10 / 20 = 0.5, not > 0.5; offset 21 -> 11 / 21 > 0.5.
    assert relative_position((20, 0, 70, 10), (0, 0, 50, 10)) == set()
    assert relative_position((21, 0, 71, 10), (0, 0, 50, 10)) == {"right of"}
    assert relative_position((0, 0, 50, 10), (20, 0, 70, 10)) == set() and relative_position((0, 0, 50, 10), (21, 0, 71, 10)) == {"left of"}
    assert relative_position((0, 20, 10, 70), (0, 0, 10, 50)) == set() and relative_position((0, 21, 10, 71), (0, 0, 10, 50)) == {"below"}
    assert relative_position((0, 0, 10, 50), (0, 20, 10, 70)) == set() and relative_position((0, 0, 10, 50), (0, 21, 10, 71)) == {"above"}
    assert relative_position((21, 0, 71, 10), (0, 0, 50, 10), threshold=0.2) == set(), "position_threshold widens the margin"
    # A mostly-horizontal offset with some vertical drift is still only "right of": dy stays under 0.5.
    assert relative_position((300, 130, 400, 230), (0, 100, 100, 200)) == {"right of"}


# ----------------------------------------------------------------------------- box selection


def test_selection_threshold_is_strict_and_orders_by_confidence():
    # GE L233: ordering[bbox[index][ordering, 4] > confidence_threshold]; GE L232: argsort(...)[::-1]
    detections = [det("cat", 0.3, LEFT), det("cat", 0.5, RIGHT), det("cat", 0.95, (0, 0, 5, 5)), det("dog", 0.29, LEFT)]
    objects = select_detections(detections, "single_object")
    assert list(objects) == ["cat"], "a class with nothing above the threshold is absent (GE L243)"
    assert [d.confidence for d in objects["cat"]] == [0.95, 0.5], "0.3 itself is not above 0.3"


def test_counting_prompts_use_the_counting_threshold():
    # GE L230: THRESHOLD if metadata['tag'] != "counting" else COUNTING_THRESHOLD (0.3 / 0.9, GE __main__)
    detections = [det("cup", 0.95, LEFT), det("cup", 0.91, RIGHT), det("cup", 0.85, (0, 300, 50, 350))]
    assert len(select_detections(detections, "counting")["cup"]) == 2
    assert len(select_detections(detections, "two_object")["cup"]) == 3
    assert len(select_detections(detections, "counting", GenEvalRules(counting_threshold=0.8))["cup"]) == 3


def test_at_most_max_objects_per_class():
    # GE L234: ordering[:MAX_OBJECTS] (16): the most confident of each class, other classes unaffected
    detections = [det("cup", 0.4 + i / 100, (10 * i, 0, 10 * i + 5, 5)) for i in range(20)] + [det("cat", 0.9, LEFT)]
    objects = select_detections(detections, "counting", GenEvalRules(counting_threshold=0.3))
    assert len(objects["cup"]) == 16 and min(d.confidence for d in objects["cup"]) == pytest.approx(0.44)
    assert len(objects["cat"]) == 1
    assert len(select_detections(detections, "counting", GenEvalRules(counting_threshold=0.3, max_objects=4))["cup"]) == 4


def test_overlap_suppression_is_off_by_default_and_per_class():
    # GE L239-242: keep obj unless NMS_THRESHOLD != 1 and compute_iou(best, obj) >= NMS_THRESHOLD (max_overlap, default 1.0)
    detections = [det("cat", 0.9, (0, 0, 99, 99)), det("cat", 0.8, (5, 5, 104, 104)), det("cat", 0.7, (300, 0, 399, 99)),
                  det("dog", 0.85, (0, 0, 99, 99)), det("cat", 0.6, (0, 0, 99, 99))]
    assert len(select_detections(detections, "single_object")["cat"]) == 4, "duplicates, even identical boxes, are kept at max_overlap=1"
    nms = select_detections(detections, "single_object", GenEvalRules(max_overlap=0.5))
    assert [d.confidence for d in nms["cat"]] == [0.9, 0.7], "the overlapping, less confident cats go"
    assert len(nms["dog"]) == 1, "a dog on the same box is another class: kept"


# ----------------------------------------------------------------------------- strict verdict and partial credit


def test_single_object():
    # GE L176-179: found = objects[class][:count]; fewer than count fails with "expected cat>=1, found 0"
    ok = verdict([det("cat", 0.8, LEFT)], SINGLE)
    assert ok.correct and ok.partial == 1.0 and ok.reasons == ()
    missing = verdict([det("dog", 0.8, LEFT)], SINGLE)
    assert not missing.correct and missing.reasons == ("expected cat>=1, found 0",)
    assert missing.partial == 0.0  # FG: 1 - |count - len(found)| / count


def test_low_confidence_detection_is_ignored():
    # GE L233: a 0.25 cat never reaches evaluate(); the prompt fails as if there were no cat
    result = verdict([det("cat", 0.25, LEFT)], SINGLE)
    assert not result.correct and result.reasons == ("expected cat>=1, found 0",)


def test_extra_objects_pass_strict_but_cost_partial_credit():
    # GE L176-177: ">= count" (only the first `count` are looked at); FG: exact count, |count - n| over all n found
    result = verdict([det("cat", 0.9, LEFT), det("cat", 0.8, RIGHT)], SINGLE)
    assert result.correct
    assert result.partial == 0.0
    assert verdict([det("cat", 0.9 - i / 100, (100 * i, 0, 100 * i + 50, 50)) for i in range(3)], SINGLE).partial == -1.0, \
        "Flow-GRPO's count term goes negative past twice the count"


def test_two_objects_need_both():
    result = verdict([det("cat", 0.9, LEFT)], TWO)
    assert not result.correct and result.reasons == ("expected dog>=1, found 0",)
    assert result.partial == 0.5
    assert verdict([det("cat", 0.9, LEFT), det("dog", 0.6, RIGHT)], TWO).correct


def test_counting_wrong_count_and_excluded_class_present():
    exact = [det("cup", 0.95, (0, 0, 50, 50)), det("cup", 0.93, (100, 0, 150, 50))]
    assert verdict(exact, COUNTING).correct and verdict(exact, COUNTING).partial == 1.0
    # GE L177: too few
    too_few = verdict(exact[:1], COUNTING)
    assert not too_few.correct and too_few.reasons == ("expected cup>=2, found 1",) and too_few.partial == 0.5
    # GE L215-219: exclude {"cup", count 3}: three cups fail even though the include clause holds
    three = exact + [det("cup", 0.92, (200, 0, 250, 50))]
    too_many = verdict(three, COUNTING)
    assert not too_many.correct and too_many.reasons == ("expected cup<3, found 3",)
    assert too_many.partial == pytest.approx(0.5), "FG scores the count term only: 1 - |2 - 3| / 2"
    # a third cup below the counting threshold (GE L230) is not counted
    assert verdict(exact + [det("cup", 0.85, (200, 0, 250, 50))], COUNTING).correct


def test_exclude_applies_to_any_class():
    metadata = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    assert verdict([det("cat", 0.9, LEFT)], metadata).correct
    result = verdict([det("cat", 0.9, LEFT), det("dog", 0.4, RIGHT)], metadata)
    assert not result.correct and result.reasons == ("expected dog<1, found 1",)


def test_wrong_colour_fails():
    # GE L181-190: colour of the first `count` detections; fewer than `count` of the asked colour fails
    assert verdict([det("car", 0.9, LEFT, "red")], COLOR).correct
    result = verdict([det("car", 0.9, LEFT, "blue")], COLOR)
    assert not result.correct
    assert result.reasons == ("expected red car>=1, found 0 red; and 1 blue",)
    assert result.partial == 0.5  # FG: [count term 1, colour term 1 - |1 - 0| / 1 = 0]


def test_colour_is_judged_on_the_most_confident_objects_only():
    # GE L176 + docstring: "Color and position will only be evaluated on the most confidently predicted objects"
    result = verdict([det("car", 0.9, LEFT, "blue"), det("car", 0.5, RIGHT, "red")], COLOR)
    assert not result.correct, "a less confident red car does not rescue a blue one"
    assert result.partial == 0.0, "FG: two cars for one: count term 0, colour check not reached, one 0"


def test_colour_attribution_binds_each_colour_to_its_object():
    good = [det("car", 0.9, LEFT, "red"), det("bench", 0.8, RIGHT, "blue")]
    assert verdict(good, COLOR_ATTR).correct and verdict(good, COLOR_ATTR).partial == 1.0
    swapped = [det("car", 0.9, LEFT, "blue"), det("bench", 0.8, RIGHT, "red")]
    assert not verdict(swapped, COLOR_ATTR).correct and verdict(swapped, COLOR_ATTR).partial == 0.5
    one_wrong = [det("car", 0.9, LEFT, "red"), det("bench", 0.8, RIGHT, "green")]
    assert verdict(one_wrong, COLOR_ATTR).partial == 0.75


def test_a_failed_colour_clause_is_no_position_target():
    # GE L210-213 / FG: a clause that failed (here on colour) leaves None as the target group of later clauses
    metadata = {"tag": "position", "include": [{"class": "car", "count": 1, "color": "red"},
                                               {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert verdict([det("car", 0.9, RIGHT, "red"), det("dog", 0.9, LEFT)], metadata).correct
    result = verdict([det("car", 0.9, RIGHT, "blue"), det("dog", 0.9, LEFT)], metadata)
    assert result.reasons[1] == "no target for dog to be left of"
    assert result.partial == pytest.approx(2 / 4), "FG: [car 1, colour 0, dog 1, no target 0]"


def test_missing_colour_label_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="car detection has no colour label"):
        verdict([det("car", 0.9, LEFT)], COLOR)


def test_relative_position_rule():
    # GE L191-209: every found object must have the relation to every object of the target clause
    assert verdict([det("cat", 0.9, RIGHT), det("dog", 0.9, LEFT)], POSITION).correct
    assert verdict([det("cat", 0.9, RIGHT), det("dog", 0.9, LEFT)], POSITION).partial == 1.0
    wrong = verdict([det("cat", 0.9, LEFT), det("dog", 0.9, RIGHT)], POSITION)
    assert not wrong.correct and wrong.reasons == ("expected dog left of target, found right of target",)
    assert wrong.partial == 0.75, "FG appends 0 for the failed relation and then 1 regardless: [1, 1, 0, 1]"
    overlapping = verdict([det("cat", 0.9, (0, 0, 100, 100)), det("dog", 0.9, (10, 0, 110, 100))], POSITION)
    assert not overlapping.correct and overlapping.reasons == ("expected dog left of target, found  target",)


def test_position_needs_the_target_clause_to_hold():
    # GE L194-196: matched_groups[target] is None -> "no target for dog to be left of"
    result = verdict([det("dog", 0.9, LEFT)], POSITION)
    assert not result.correct
    assert result.reasons == ("expected cat>=1, found 0", "no target for dog to be left of")
    assert result.partial == pytest.approx(1 / 3), "FG: [cat 0, dog 1, no target 0]"
    # the position clause is only looked at when its own count holds (GE L191 "and matched")
    assert verdict([det("cat", 0.9, RIGHT)], POSITION).reasons == ("expected dog>=1, found 0",)


def test_position_is_checked_against_the_counted_objects_only():
    # GE L176/L211: the target group is objects[class][:count]; a second, less confident cat on the wrong side is ignored
    detections = [det("cat", 0.9, RIGHT), det("cat", 0.5, (-300, 100, -200, 200)), det("dog", 0.9, LEFT)]
    assert verdict(detections, POSITION).correct


def test_string_target_index_as_in_json():
    metadata = {**POSITION, "include": [POSITION["include"][0], {"class": "dog", "count": 1, "position": ["left of", "0"]}]}
    assert verdict([det("cat", 0.9, RIGHT), det("dog", 0.9, LEFT)], metadata).correct


def test_what_counts_as_geneval_metadata():
    assert is_geneval_metadata(SINGLE) and is_geneval_metadata({"include": []})
    assert not is_geneval_metadata({}) and not is_geneval_metadata({"objects": [], "category": "color"}) and not is_geneval_metadata(None)


# ----------------------------------------------------------------------------- detector-side helpers (no mmdet needed)


def test_detections_from_mmdet_result_format():
    # GE L225-226 and L238: result = (bbox per class (n, 5), segm per class [n masks]); class index -> object_names.txt
    bbox = [np.zeros((0, 5), np.float32) for _ in OBJECT_NAMES]
    segm = [[] for _ in OBJECT_NAMES]
    bbox[15] = np.array([[1, 2, 30, 40, 0.9], [5, 5, 9, 9, 0.2]], np.float32)
    segm[15] = [np.ones((50, 60), bool), np.zeros((50, 60), bool)]
    bbox[65] = np.array([[0, 0, 10, 10, 0.7]], np.float32)
    segm[65] = [np.ones((50, 60), bool)]
    detections = detections_from_mmdet((bbox, segm))
    assert [(d.name, round(d.confidence, 3)) for d in detections] == [("cat", 0.9), ("cat", 0.2), ("tv remote", 0.7)]
    assert detections[0].box == (1.0, 2.0, 30.0, 40.0) and detections[0].mask.shape == (50, 60) and detections[1].mask.sum() == 0
    assert detections_from_mmdet(bbox)[0].mask is None, "a detector without masks gives boxes only"
    with pytest.raises(ValueError, match="80 COCO classes"):
        detections_from_mmdet(bbox[:79])


def test_object_names_are_geneval_s():
    assert len(OBJECT_NAMES) == 80 and len(set(OBJECT_NAMES)) == 80
    assert OBJECT_NAMES[:3] == ("person", "bicycle", "car") and OBJECT_NAMES[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GE L76


def test_colour_crop_greys_out_everything_but_the_mask():
    # GE L84 bgcolor "#999", L98 Image.composite(image, blank, mask), L102 image.crop(box[:4])
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    mask = np.zeros((30, 40), bool)
    mask[5:15, 10:20] = True
    crop = colour_crop(image, (8.4, 3.6, 21.5, 16.2), mask)
    assert crop.size == (14, 12), "float boxes round like PIL's crop: (8, 4, 22, 16)"
    pixels = np.asarray(crop)
    assert (pixels[1:11, 2:12] == (200, 10, 10)).all(), "inside the mask: the image"
    assert (pixels[0] == 153).all() and (pixels[:, 0] == 153).all(), "outside it: #999"
    assert (np.asarray(colour_crop(image, (8, 4, 22, 16))) == (200, 10, 10)).all(), "no mask: the plain crop"
    assert colour_crop(image, (5, 5, 5, 5), mask).size == (1, 1), "an empty box still gives a pixel"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    save_tiny_clip(path)
    return str(path)


def test_colour_classifier_is_clip_zero_shot_over_geneval_templates(tiny_clip):
    # GE L111-117: zero_shot_classifier(COLORS, ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"])
    # and GE L126-127: argmax of image features against it. Checked here through CLIPModel's own projections.
    classifier = ColourClassifier(tiny_clip, device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    objects = [det("car", 0.9, (0, 0, 40, 30)), det("car", 0.8, (30, 20, 80, 64)), det("car", 0.7, (5, 30, 25, 60))]
    labels = classifier(image, objects, "car")

    model, tokenizer = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    weights = []
    with torch.no_grad():
        for colour in COLORS:
            prompts = [f"a photo of a {colour} car", f"a photo of a {colour}-colored car", f"a photo of a {colour} object"]
            tokens = tokenizer(prompts, padding=True, return_tensors="pt")
            text = F.normalize(model.text_projection(model.text_model(**tokens).pooler_output), dim=-1)
            weights.append(F.normalize(text.mean(0), dim=-1))
        pixels = ClipEmbedder("test", tiny_clip, None, "cpu", 1).preprocess
        expected = []
        for o in objects:
            crop = torch.from_numpy(np.asarray(image.crop(tuple(int(v) for v in o.box)))).permute(2, 0, 1).float()[None] / 255
            feature = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels(crop)).pooler_output), dim=-1)
            expected.append(COLORS[int((feature @ torch.stack(weights, 1)).argmax())])
    torch.testing.assert_close(classifier.classifier("car"), torch.stack(weights, 1), rtol=1e-5, atol=1e-6)
    assert labels == expected and all(label in COLORS for label in labels)
    assert set(classifier.classifiers) == {"car"}, "one classifier per object class, cached"

    select = {"car": objects[:2], "bench": [det("bench", 0.9, (0, 0, 10, 10))]}
    classifier.label(image, select, COLOR_ATTR)
    assert [o.color for o in select["car"]] == [expected[0], None], "only the `count` most confident are labelled"
    assert select["bench"][0].color in COLORS
    classifier.label(image, {}, COLOR)  # no car at all: nothing to classify (GenEval classifies only when the count holds)


# ----------------------------------------------------------------------------- prompts


def test_convert_geneval_prompts_for_the_jsonl_loader(tmp_path):
    source = tmp_path / "evaluation_metadata.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in (SINGLE, POSITION, COUNTING)) + "\n")
    assert PromptSource.load(str(source)).prompts[0].metadata == {}, "the loader reads GenEval's own lines without their metadata"
    target = tmp_path / "geneval_prompts.jsonl"
    assert convert_geneval_prompts(source, target) == 3
    prompts = PromptSource.load(str(target)).prompts
    assert [p.text for p in prompts] == [SINGLE["prompt"], POSITION["prompt"], COUNTING["prompt"]]
    assert prompts[1].metadata == POSITION and is_geneval_metadata(prompts[1].metadata)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a GenEval metadata line"):
        convert_geneval_prompts(tmp_path / "bad.jsonl", tmp_path / "out.jsonl")


# ----------------------------------------------------------------------------- the reward


def test_registered():
    assert "geneval" in available_rewards()


@pytest.mark.skipif(INSTALLED, reason="checks the message shown when the GenEval extra is missing")
def test_missing_extra_names_the_package_and_the_install_line():
    with pytest.raises(RuntimeError) as info:
        get_reward("geneval", detector="mmdet", checkpoint="unused.pth")
    message = str(info.value)
    assert "\n" not in message and "GenEval detector 'mmdet' needs mmdet, missing here (mmdet 2.x, mmcv-full 1.7)" in message
    assert "pip install --no-build-isolation 'dgpo[geneval-mmdet]'" in message and "'transformers' needs neither" in message


def _mmdet_demo_image() -> Path:
    import mmdet

    root = Path(mmdet.__file__).parent
    return next(p for p in (root / ".mim" / "demo" / "demo.jpg", root.parent / "demo" / "demo.jpg") if p.is_file())


@pytest.mark.skipif(not os.environ.get("DGPO_GENEVAL_CHECKPOINT"), reason="set DGPO_GENEVAL_CHECKPOINT to GenEval's Mask2Former .pth")
@needs_extra  # innermost: its reason is the one reported when the extra is missing
def test_real_detector_stack_on_a_photo():
    reward = get_reward("geneval", detector="mmdet", strict=True)
    picture = Image.open(_mmdet_demo_image()).convert("RGB")
    detections = reward.detector.detect([picture])[0]
    confident = sorted((d for d in detections if d.confidence > 0.9), key=lambda d: -d.confidence)
    assert confident, "Mask2Former finds at least one object with confidence > 0.9 in mmdet's demo photo"
    top = confident[0].name
    count = sum(d.name == top for d in confident)
    absent = next(name for name in OBJECT_NAMES if all(d.name != name or d.confidence <= 0.3 for d in detections))
    colour = reward.colours(picture, select_detections(detections, "colors")[top][:1], top)[0]
    other = next(c for c in COLORS if c != colour)
    metadata = [
        {"tag": "single_object", "include": [{"class": top, "count": 1}]},
        {"tag": "single_object", "include": [{"class": absent, "count": 1}]},
        {"tag": "counting", "include": [{"class": top, "count": count}], "exclude": [{"class": top, "count": count + 1}]},
        {"tag": "counting", "include": [{"class": top, "count": count + 1}], "exclude": [{"class": top, "count": count + 2}]},
        {"tag": "colors", "include": [{"class": top, "count": 1, "color": colour}]},
        {"tag": "colors", "include": [{"class": top, "count": 1, "color": other}]},
        {},
    ]
    images = torch.from_numpy(np.asarray(picture)).permute(2, 0, 1).float()[None].expand(len(metadata), -1, -1, -1) / 255
    scores = reward(images, ["a photo"] * len(metadata), metadata)
    np.testing.assert_array_equal(scores[:6], [1, 0, 1, 0, 1, 0])
    assert np.isnan(scores[6]), "no GenEval metadata: not applicable"
