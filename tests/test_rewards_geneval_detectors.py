"""GenEval's detector layer on transformers: mmdet's test geometry, its Mask2Former instance post-processing on
hand-built logits, the mapping into GenEval's detections, a tiny random Mask2Former built here, the whole
geneval reward on it with a tiny random CLIP, and benchmarks/geneval_agreement.py's tables.

Comments cite the mmdet 2.x code a test mirrors: ``MaskFormerFusionHead.instance_postprocess`` ("IP"),
``mmdet.core.mask2bbox`` ("M2B"), ``mmcv.rescale_size`` ("RS") and GenEval's evaluate_images.py ("GE").
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_benchmark
from PIL import Image
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

from dgpo.errors import UserError
from dgpo.rewards import get_reward
from dgpo.rewards.clip import save_tiny_clip
from dgpo.rewards.geneval import COLORS, Verdict, select_detections
from dgpo.rewards.geneval_detectors import (
    DETECTORS,
    OBJECT_NAMES,
    PIXEL_MEAN,
    PIXEL_STD,
    TransformersMask2Former,
    build_detector,
    detections_from_instances,
    detector_inputs,
    image_mask_logits,
    instance_segmentation,
    mask_boxes,
    resized_shape,
)

CAT, DOG, CUP = OBJECT_NAMES.index("cat"), OBJECT_NAMES.index("dog"), OBJECT_NAMES.index("cup")
SMALL = dict(short_edge=64, long_edge=96)  # the tiny model's input size instead of GenEval's 800 x 1333


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "shape, resized",
    [((512, 512), (800, 800)), ((1024, 1024), (800, 800)), ((480, 640), (800, 1067)), ((640, 480), (1067, 800)), ((200, 1000), (267, 1333))],
)
def test_resized_shape_is_mmcvs_keep_ratio_rescale(shape, resized):
    # RS: scale = min(1333 / long side, 800 / short side); int(side * scale + 0.5)
    assert resized_shape(*shape) == resized


def test_detector_inputs_resize_normalise_and_pad_to_32():
    flat = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    tall = torch.full((3, 30, 20), 200, dtype=torch.uint8)
    batch, resized = detector_inputs([flat, tall], short_edge=40, long_edge=70)
    assert resized == [(40, 60), (60, 40)]
    assert batch.shape == (2, 3, 64, 64), "one batch shape: the largest sides, rounded up to a multiple of 32"
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :40, :60], ((100 - mean) / std).expand(3, 40, 60))
    torch.testing.assert_close(batch[1, :, :60, :40], ((200 - mean) / std).expand(3, 60, 40))
    assert (batch[0, :, 40:] == 0).all() and (batch[0, :, :, 60:] == 0).all(), "padding is zero after normalising (Normalize, then Pad)"
    gradient = torch.arange(8, dtype=torch.uint8).repeat(3, 8, 1) * 30
    pixels = (detector_inputs([gradient], short_edge=16, long_edge=16)[0][0] * std + mean)[:, :16, :16]
    assert torch.allclose(pixels, pixels.round(), atol=1e-3), "the resized image is 8-bit, as cv2 resizes an 8-bit image"


def test_mask_logits_are_cropped_to_the_image_before_going_back_to_its_size():
    # mmdet: upsample to the padded batch shape, crop to the resized image, upsample to the original shape.
    # The input is 64 x 64 padded from a 64 x 48 image (original 32 x 24); logits come at 1/4: 16 x 16.
    logits = torch.full((1, 16, 16), -10.0)
    logits[:, :, :6] = 10.0  # the left half of the image (input columns 0-23 of 48)
    logits[:, :, 12:] = 10.0  # the padding (input columns 48-63): must not reach the image
    mask = image_mask_logits(logits, (64, 64), (64, 48), (32, 24))[0] > 0
    assert mask.shape == (32, 24)
    assert mask[:, :11].all() and not mask[:, 13:].any(), "the left half, and nothing of the padding at the right edge"


# ----------------------------------------------------------------------------- instance post-processing


def _reference_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """IP written out with loops: (query, class, score) of the k most probable (query, class) pairs."""
    probabilities = torch.softmax(class_logits.double(), dim=-1)[:, :-1]
    pairs = sorted(((float(probabilities[q, c]), q, c) for q in range(probabilities.shape[0]) for c in range(probabilities.shape[1])), reverse=True)[:k]
    rows = []
    for probability, query, label in pairs:
        inside = mask_logits[query].double() > 0
        mask_score = float(mask_logits[query].double().sigmoid()[inside].sum() / (inside.sum() + 1e-6))
        rows.append((query, label, probability * mask_score))
    return rows


def test_instance_segmentation_is_mmdets_instance_postprocess():
    class_logits = torch.zeros(3, 81)
    class_logits[0, CAT] = 6.0  # a confident cat
    class_logits[1, CAT], class_logits[1, DOG] = 3.0, 3.2  # one query, two classes: both may be instances
    class_logits[2, 80], class_logits[2, CUP] = 8.0, 7.0  # mostly "no object" (the last class), else a cup
    mask_logits = torch.full((3, 8, 10), -4.0)
    mask_logits[0, 1:4, 2:6] = torch.linspace(0.5, 3.0, 12).view(3, 4)
    mask_logits[1, 5:8, 0:10] = 2.0
    mask_logits[2, 0, 0] = 1.0
    labels, scores, masks = instance_segmentation(class_logits, mask_logits, max_per_image=4)
    assert labels.shape == scores.shape == (4,) and masks.shape == (4, 8, 10)
    expected = _reference_instances(class_logits, mask_logits, 4)
    assert sorted((int(label), round(score, 5)) for label, score in zip(labels.tolist(), scores.tolist())) == \
        sorted((label, round(score, 5)) for _, label, score in expected)
    assert {(q, label) for q, label, _ in expected} == {(0, CAT), (1, CAT), (1, DOG), (2, CUP)}, "query 1 gives a cat and a dog"
    for label, score, mask in zip(labels.tolist(), scores.tolist(), masks):
        query = next(q for q, c, s in expected if c == label and abs(s - score) < 1e-5)
        assert torch.equal(mask, mask_logits[query] > 0), "an instance's mask is its query's logits > 0"
    empty = instance_segmentation(class_logits, torch.full((3, 8, 10), -1.0), max_per_image=2)[1]
    assert (empty == 0).all(), "an empty mask scores 0 (IP: sum / (area + 1e-6))"
    assert instance_segmentation(class_logits, mask_logits)[0].shape == (100,), "max_per_image 100 pairs by default"


def test_mask_boxes_are_mmdets_mask2bbox():
    # M2B: [x[0], y[0], x[-1] + 1, y[-1] + 1] of the mask's columns and rows; zeros for an empty mask
    masks = torch.zeros(5, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:8] = True
    masks[1, 0, 0] = True
    masks[2] = True
    masks[3, 9, 1] = masks[3, 4, 11] = True  # two separate pixels: the box spans both
    expected = [[3, 2, 8, 5], [0, 0, 1, 1], [0, 0, 12, 10], [1, 4, 12, 10], [0, 0, 0, 0]]
    assert mask_boxes(masks).tolist() == expected


def test_instances_become_genevals_detections():
    # 20 cups (0.31 ... 0.50), two cats (0.95, 0.2), a dog at exactly 0.3: GE keeps > 0.3, the 16 most confident a class
    masks = torch.zeros(23, 16, 20, dtype=torch.bool)
    for i in range(23):
        masks[i, i % 8 : i % 8 + 4, i % 12 : i % 12 + 5] = True
    labels = torch.tensor([CUP] * 20 + [CAT, CAT, DOG])
    scores = torch.tensor([0.31 + i / 100 for i in range(20)] + [0.95, 0.2, 0.3])
    detections = detections_from_instances(labels, scores, masks)
    assert [d.name for d in detections] == ["cup"] * 20 + ["cat", "cat", "dog"]
    assert detections[3].box == (3.0, 3.0, 8.0, 7.0) and detections[3].mask.shape == (16, 20) and (detections[3].mask == masks[3].numpy()).all()
    objects = select_detections(detections, "two_object")
    assert set(objects) == {"cup", "cat"}, "the dog at 0.3 is not above the threshold"
    assert [round(d.confidence, 2) for d in objects["cup"]] == [round(0.50 - i / 100, 2) for i in range(16)], "most confident first, 16 at most"
    assert [d.confidence for d in objects["cat"]] == [pytest.approx(0.95)]
    assert set(select_detections(detections, "counting")) == {"cat"}, "counting prompts keep > 0.9 only"
    assert len(detections_from_instances(labels, scores, masks, min_score=0.3)) == 21, "min_score drops those at or below it"


# ----------------------------------------------------------------------------- a tiny random Mask2Former


def save_tiny_mask2former(path, num_labels: int = 80, favoured: int | None = CAT) -> None:
    """A tiny random Mask2Former (Swin backbone, one layer a stage); its class head favours one class so that it detects."""
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
                               num_queries=12, use_pretrained_backbone=False)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if favoured is not None:
        with torch.no_grad():
            model.class_predictor.bias[favoured] = 12.0
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mask2former")
    save_tiny_mask2former(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    save_tiny_clip(path)
    return str(path)


def _pictures(n: int, size=(48, 40), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_detector_registry():
    assert {"transformers", "mmdet"} <= set(DETECTORS.names())
    with pytest.raises(ValueError, match=r"unknown GenEval detector 'transformer' \(did you mean 'transformers'\?\)"):
        build_detector("transformer")
    with pytest.raises(ValueError, match=r"GenEval detector 'transformers': got an unexpected keyword argument 'checkpoint' \(it takes model, "):
        build_detector("transformers", checkpoint="mask2former.pth")
    with pytest.raises(ValueError, match=r"GenEval detector 'transformers': got an unexpected keyword argument 'modle'"):
        get_reward("geneval", modle="typo")
    with pytest.raises(ValueError, match=r"unknown GenEval detector 'mmdeth' \(did you mean 'mmdet'\?\)"):
        get_reward("geneval", detector="mmdeth")
    with pytest.raises(ValueError, match="min_score follows from threshold and counting_threshold"):
        get_reward("geneval", min_score=0.5)


def test_transformers_detector_on_a_tiny_mask2former(tiny_mask2former):
    detector = build_detector("transformers", model=tiny_mask2former, device="cpu", **SMALL)
    same_size = _pictures(3)
    detections = detector.detect(same_size)
    assert len(detections) == 3 and all(len(found) == 100 for found in detections), "the 100 most probable (query, class) pairs"
    for picture, found in zip(same_size, detections):
        assert {d.name for d in found} <= set(OBJECT_NAMES)
        assert any(d.name == "cat" and d.confidence > 0.3 for d in found), "the favoured class is detected"
        for d in found:
            assert 0 <= d.confidence <= 1 and d.mask.shape == (picture.height, picture.width) and d.mask.dtype == bool
            assert d.box == tuple(mask_boxes(torch.from_numpy(d.mask)[None])[0].tolist()), "the box is its mask's"
    one_by_one = [found for picture in same_size for found in detector.detect([picture])]
    for batched, alone in zip(detections, one_by_one):
        assert [d.name for d in batched] == [d.name for d in alone]
        np.testing.assert_allclose([d.confidence for d in batched], [d.confidence for d in alone], rtol=1e-4, atol=1e-6)
    mixed = detector.detect([_pictures(1, (48, 40))[0], _pictures(1, (30, 50))[0]])
    assert {d.mask.shape for d in mixed[1]} == {(50, 30)}, "images of different sizes in one batch: each gets masks of its own size"
    kept = build_detector("transformers", model=tiny_mask2former, device="cpu", min_score=0.3, **SMALL).detect(same_size[:1])[0]
    above = [d for d in one_by_one[0] if d.confidence > 0.3]
    assert [d.name for d in kept] == [d.name for d in above]
    np.testing.assert_allclose([d.confidence for d in kept], [d.confidence for d in above], rtol=1e-5)
    assert 0 < len(kept) < 100, "min_score drops the detections at or below it"


def test_transformers_detector_weights_errors(tmp_path, tiny_mask2former, monkeypatch):
    save_tiny_mask2former(tmp_path / "panoptic", num_labels=133, favoured=None)
    with pytest.raises(UserError, match="has 133 classes, GenEval needs a COCO instance model with 80"):
        build_detector("transformers", model=str(tmp_path / "panoptic"), device="cpu")
    with pytest.raises(UserError, match=r"reward 'geneval': cannot load Mask2Former .*missing.*\(a local directory or a hub id"):
        build_detector("transformers", model=str(tmp_path / "missing"), device="cpu")
    monkeypatch.setenv("DGPO_GENEVAL_MODEL", tiny_mask2former)
    assert isinstance(build_detector("transformers", device="cpu"), TransformersMask2Former), "the weights from $DGPO_GENEVAL_MODEL"


def test_geneval_reward_end_to_end_on_tiny_models(tiny_mask2former, tiny_clip):
    strict = get_reward("geneval", model=tiny_mask2former, clip_model=tiny_clip, device="cpu", strict=True, **SMALL)
    assert isinstance(strict.detector, TransformersMask2Former), "transformers is the default detector"
    pictures = _pictures(1, seed=3)
    cats = len(select_detections(strict.detector.detect(pictures)[0], "single_object")["cat"])
    assert 2 <= cats <= 12, "several cats (the favoured class), so counts and partial credit are tested"
    metadata = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"tag": "two_object", "include": [{"class": "cat", "count": cats}]},
        {"tag": "two_object", "include": [{"class": "cat", "count": cats + 1}]},
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": cats}]},
        {},
    ] + [{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": colour}]} for colour in COLORS]
    images = torch.from_numpy(np.array(pictures[0])).permute(2, 0, 1).float()[None].expand(len(metadata), -1, -1, -1) / 255
    scores = strict(images, ["a photo"] * len(metadata), metadata)
    assert scores.shape == (len(metadata),)
    np.testing.assert_array_equal(scores[:5], [1, 0, 1, 0, 0])
    assert np.isnan(scores[5]), "no GenEval metadata: not applicable"
    assert set(scores[6:].tolist()) <= {0.0, 1.0} and scores[6:].sum() == 1, "the most confident cat has exactly one of the ten colours"

    partial = get_reward("geneval", model=tiny_mask2former, clip_model=tiny_clip, device="cpu", **SMALL)
    scores = partial(images[:4], ["a photo"] * 4, metadata[:4])
    np.testing.assert_allclose(scores, [1 - (cats - 1), 0, 1, 1 - 1 / (cats + 1)])
    assert ((scores[2:] >= 0) & (scores[2:] <= 1)).all()


# ----------------------------------------------------------------------------- benchmarks/geneval_agreement.py


def test_agreement_script_tables_and_its_one_line_refusal_without_mmdet(tmp_path):
    script = load_benchmark("geneval_agreement")
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    counting = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}
    (tmp_path / "meta.jsonl").write_text(f"{json.dumps(single)}\n\n{json.dumps({'prompt': 'two cups', 'metadata': counting})}\n")
    assert script.read_metadata(tmp_path / "meta.jsonl") == [single, counting], "GenEval's lines and dgpo's prompt lines"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: not a GenEval metadata line"):
        script.read_metadata(tmp_path / "bad.jsonl")
    assert [p.name for p in sorted(map(Path, ["10.png", "2.png", "1.png"]), key=script.natural_key)] == ["1.png", "2.png", "10.png"]

    verdicts = {"transformers": [Verdict(True, 1.0, ()), Verdict(False, 0.5, ()), Verdict(True, 1.0, ())],
                "mmdet": [Verdict(True, 1.0, ()), Verdict(True, 1.0, ()), Verdict(False, 0.0, ())]}
    rows = {row["tag"]: row for row in script.agreement_table(verdicts, ["single_object", "counting", "counting"])}
    assert rows["single_object"] == {"tag": "single_object", "images": 1, "transformers_pass": 1.0, "mmdet_pass": 1.0,
                                     "agreement": 1.0, "partial_abs_diff": 0.0}
    assert rows["counting"]["agreement"] == 0.0 and rows["counting"]["partial_abs_diff"] == 0.75
    assert rows["overall"]["images"] == 3 and rows["overall"]["agreement"] == pytest.approx(1 / 3)

    if importlib.util.find_spec("mmdet") is None:
        with pytest.raises(SystemExit) as info:
            script.main([str(tmp_path), str(tmp_path / "meta.jsonl")])
        message = str(info.value.code)
        assert "\n" not in message and message.startswith("geneval_agreement: mmdet") and "dgpo[geneval-mmdet]" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transformers_detector_cuda_matches_cpu(tiny_mask2former):
    pictures = _pictures(2)
    found = {device: build_detector("transformers", model=tiny_mask2former, device=device, **SMALL).detect(pictures) for device in ("cpu", "cuda")}
    for cpu, cuda in zip(found["cpu"], found["cuda"]):
        on_cpu, on_cuda = select_detections(cpu, "single_object"), select_detections(cuda, "single_object")
        assert set(on_cpu) == set(on_cuda)
        for name in on_cpu:
            np.testing.assert_allclose([d.confidence for d in on_cuda[name]], [d.confidence for d in on_cpu[name]], atol=1e-3)
