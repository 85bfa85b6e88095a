"""GenEval (Ghosh et al. 2023) as a reward: object detection with Mask2Former, colour with CLIP.

A port of GenEval's ``evaluation/evaluate_images.py`` (github.com/djghosh13/geneval) in two layers:

* the decision layer (:func:`select_detections`, :func:`strict_verdict`, :func:`partial_score`,
  :func:`judge`) is plain Python on detections: which detections count, and whether they satisfy
  a prompt's GenEval metadata (``{"tag", "include": [{"class", "count", "color"?, "position"?}],
  "exclude"?}``, one line of GenEval's ``evaluation_metadata.jsonl``). The strict verdict is
  GenEval's; the partial credit is the one RL codebases train on (Flow-GRPO's reward server,
  ``evaluate_reward``), reproduced with its quirks so scores compare with its reward curves.
* the detector layer: a Mask2Former COCO instance segmenter picked by name (``detector``, see
  :mod:`dgpo.rewards.geneval_detectors`: ``transformers`` by default, GenEval's own ``mmdet`` stack
  as an option), and a zero-shot CLIP ViT-L/14 colour classifier over GenEval's ten colours and
  prompt templates (:class:`ColourClassifier`). The CLIP runs through ``transformers``
  (``openai/clip-vit-large-patch14``, the same OpenAI weights GenEval loads with open_clip), so
  open_clip and clip_benchmark are not needed.

The ``geneval`` reward reads each sample's GenEval metadata from ``metadata`` (the trainer passes
the ``metadata`` object of each JSONL prompt line; :func:`convert_geneval_prompts` writes GenEval's
prompt file in that form); a sample without it scores NaN.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..requirements import Variant
from .base import RewardCategories, register_categories, register_reward, to_pil_images
from .clip import CLIP_MODEL, ClipEmbedder
from .geneval_detectors import DETECTORS, Detection, Detector, build_detector

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's zero-shot colour prompts ({c}: colour, {name}: the detected class).
COLOR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
CROP_BACKGROUND = "#999"  # GenEval's ImageCrops bgcolor: pixels outside the object's mask
COLOUR_MODEL = replace(CLIP_MODEL, option="clip_model")
DEFAULT_DETECTOR = "transformers"


@dataclass(frozen=True)
class GenEvalRules:
    """GenEval's ``--options`` and their defaults (evaluate_images.py, ``__main__``)."""

    threshold: float = 0.3  # detections must score above this ...
    counting_threshold: float = 0.9  # ... or above this for "counting" prompts
    max_objects: int = 16  # most confident detections kept per class
    max_overlap: float = 1.0  # per-class NMS IoU; 1.0 keeps overlapping boxes
    position_threshold: float = 0.1  # margin, as a fraction of both boxes' sizes, for relative position


@dataclass(frozen=True)
class Verdict:
    correct: bool  # GenEval's pass/fail
    partial: float  # Flow-GRPO's partial credit
    reasons: tuple[str, ...]  # why GenEval failed it (its "reason" column)


def is_geneval_metadata(metadata) -> bool:
    """A GenEval line has an ``include`` list; anything else is not applicable (NaN)."""
    return isinstance(metadata, dict) and isinstance(metadata.get("include"), list)


def compute_iou(box_a, box_b) -> float:
    """GenEval's IoU, with its inclusive-pixel (+1) box areas."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0


def select_detections(detections: list[Detection], tag: str | None, rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """GenEval's ``evaluate_image`` box selection: per class, the detections scoring above the threshold
    (the counting threshold for "counting" prompts), most confident first, at most ``max_objects``,
    each dropping later ones it overlaps by ``max_overlap`` IoU or more. Classes left empty are absent."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:
        by_class.setdefault(detection.name, []).append(detection)
    selected = {}
    for name, candidates in by_class.items():
        # In float32, as GenEval compares mmdet's float32 scores: a score of float32(0.3) is not above 0.3.
        scores = np.array([d.confidence for d in candidates], dtype=np.float32)
        ordering = np.argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > np.float32(threshold)][: rules.max_objects].tolist()
        kept = []
        while ordering:
            best = candidates[ordering.pop(0)]
            kept.append(best)
            ordering = [i for i in ordering if rules.max_overlap == 1 or compute_iou(best.box, candidates[i].box) < rules.max_overlap]
        if kept:
            selected[name] = kept
    return selected


def relative_position(box_a, box_b, threshold: float = GenEvalRules.position_threshold) -> set[str]:
    """Where A is relative to B: the centre offset, shrunk towards zero by ``threshold`` times the
    two boxes' summed width (height), divided by the unshrunk offset's length; a component beyond
    0.5 names the relation (image y grows downwards)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colours(found: list[Detection], name: str) -> list[str]:
    if any(d.color is None for d in found):
        raise ValueError(f"a {name} detection has no colour label: label the first `count` detections of classes asked for in a colour")
    return [d.color for d in found]


def _position(requirement: dict) -> tuple[str, int]:
    relation, target = requirement["position"]
    return relation, int(target)


def _misplaced(found: list[Detection], targets: list[Detection], relation: str, threshold: float) -> set[str] | None:
    """The relations found for the first (object, target) pair lacking ``relation``; None if every pair has it."""
    for obj in found:
        for target in targets:
            relations = relative_position(obj.box, target.box, threshold)
            if relation not in relations:
                return relations
    return None


def strict_verdict(objects: dict[str, list[Detection]], metadata: dict, rules: GenEvalRules = GenEvalRules()) -> tuple[bool, list[str]]:
    """GenEval's ``evaluate``: every include clause holds (at least ``count`` objects; the ``count``
    most confident have the colour; each of them has the relation to every object of the target
    clause, which must itself have held) and no exclude clause does (fewer than ``count`` objects)."""
    correct = True
    reasons = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = _colours(found, name)
                if colours.count(req["color"]) < count:
                    matched = False
                    others = ", ".join(f"{colours.count(c)} {c}" for c in COLORS if c in colours)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colours.count(req['color'])} {req['color']}; and {others}")
            if "position" in req and matched:
                relation, target = _position(req)
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    found_relations = _misplaced(found, matched_groups[target], relation, rules.position_threshold)
                    if found_relations is not None:
                        matched = False
                        reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(found_relations))} target")
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        found = len(objects.get(req["class"], []))
        if found >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {found}")
    return correct, reasons


def partial_score(objects: dict[str, list[Detection]], metadata: dict, rules: GenEvalRules = GenEvalRules()) -> float:
    """Flow-GRPO's partial credit (reward server ``evaluate_reward``): the mean of one term per check.

    Per include clause: ``1 - |count - n| / count`` for the n detections of the class (all of them,
    so it goes below 0 past twice the count); if n is not exactly ``count``, one 0 stands for the
    colour or position check; else the colour term ``1 - |count - matching colours| / count`` and,
    for a position clause, 0 when the target clause failed or a pair lacks the relation, followed by
    a 1 that Flow-GRPO appends whether or not the relation held. Exclude clauses are not scored."""
    terms = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])
        terms.append(1 - abs(count - len(found)) / count)
        matched = len(found) == count
        if not matched:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = _colours(found, name).count(req["color"])
                terms.append(1 - abs(count - hits) / count)
                matched = hits == count
            if "position" in req and matched:
                relation, target = _position(req)
                if matched_groups[target] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    if _misplaced(found, matched_groups[target], relation, rules.position_threshold) is not None:
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)
        matched_groups.append(found if matched else None)
    return sum(terms) / len(terms) if terms else 0.0


def judge(objects: dict[str, list[Detection]], metadata: dict, rules: GenEvalRules = GenEvalRules()) -> Verdict:
    """GenEval's verdict and Flow-GRPO's partial credit for the selected detections of one image."""
    correct, reasons = strict_verdict(objects, metadata, rules)
    return Verdict(correct, partial_score(objects, metadata, rules), tuple(reasons))


def geneval_prompt_rows(text: str, source: str) -> list[dict]:
    """The lines of GenEval's ``evaluation_metadata.jsonl`` (or a file in its format) as dgpo prompt rows,
    ``{"prompt": ..., "metadata": line}``: the whole GenEval line is kept as the metadata the reward judges."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str) or not is_geneval_metadata(row):
            raise ValueError(f"{source}:{number}: not a GenEval metadata line (needs 'prompt' and an 'include' list)")
        rows.append({"prompt": row["prompt"], "metadata": row})
    return rows


def convert_geneval_prompts(source, destination) -> int:
    """GenEval's ``evaluation_metadata.jsonl`` -> dgpo prompt JSONL (:func:`geneval_prompt_rows`). Returns the
    number of prompts written."""
    rows = geneval_prompt_rows(Path(source).read_text(), str(source))
    Path(destination).write_text("".join(f"{json.dumps(row)}\n" for row in rows))
    return len(rows)


# GenEval reports accuracy per prompt tag, in its paper's column order, and overall as the mean over the six tags.
register_categories("geneval", RewardCategories("tag", {
    "single_object": "single", "two_object": "two", "counting": "counting", "colors": "colors",
    "position": "position", "color_attr": "color attribution",
}))


# ----------------------------------------------------------------------------- detector layer


def colour_crop(image: Image.Image, box, mask: np.ndarray | None = None) -> Image.Image:
    """GenEval's ``ImageCrops`` item: the object (its mask over a grey background) cropped to its box,
    at least one pixel wide and high."""
    image = image.convert("RGB")
    if mask is not None:
        image = Image.composite(image, Image.new("RGB", image.size, CROP_BACKGROUND), Image.fromarray(np.asarray(mask, dtype=bool)))
    left, top, right, bottom = (round(v) for v in box[:4])  # what PIL's crop does with float boxes
    return image.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


class ColourClassifier:
    """GenEval's ``color_classification``: CLIP zero-shot over :data:`COLORS`, one classifier per object
    class (clip_benchmark's ``zero_shot_classifier``: the normalised mean of the normalised embeddings
    of the three templates), applied to :func:`colour_crop` of each detection."""

    def __init__(self, model: str | None = None, device: str | None = None):
        model = COLOUR_MODEL.value(model)
        self.clip = ClipEmbedder("geneval", model, model, device, batch_size=len(COLORS) * len(COLOR_TEMPLATES))
        self.classifiers: dict[str, torch.Tensor] = {}

    def classifier(self, name: str) -> torch.Tensor:
        """(embedding dim, colours) unit columns for objects of class ``name``."""
        if name not in self.classifiers:
            prompts = [template.format(c=colour, name=name) for colour in COLORS for template in COLOR_TEMPLATES]
            embeddings = self.clip.texts(prompts).view(len(COLORS), len(COLOR_TEMPLATES), -1)
            self.classifiers[name] = F.normalize(embeddings.mean(dim=1), dim=-1).T
        return self.classifiers[name]

    def __call__(self, image: Image.Image, detections: list[Detection], name: str) -> list[str]:
        crops = [colour_crop(image, d.box, d.mask) for d in detections]
        tensors = [torch.from_numpy(np.array(crop)).permute(2, 0, 1).float()[None] / 255.0 for crop in crops]
        features = torch.cat([self.clip.images(t) for t in tensors])
        return [COLORS[i] for i in (features @ self.classifier(name)).argmax(dim=1).tolist()]

    def label(self, image: Image.Image, objects: dict[str, list[Detection]], metadata: dict) -> None:
        """Set ``color`` on the detections a colour clause looks at: the ``count`` most confident of its class."""
        for req in metadata["include"]:
            found = objects.get(req["class"], [])[: int(req["count"])]
            if "color" in req and len(found) == int(req["count"]):
                for detection, colour in zip(found, self(image, found, req["class"])):
                    detection.color = colour


class GenEvalReward:
    """Detect, keep GenEval's boxes, label colours where asked, judge; NaN for samples without GenEval metadata."""

    def __init__(self, detector: Detector, colours: ColourClassifier, strict: bool, rules: GenEvalRules):
        self.detector, self.colours, self.strict, self.rules = detector, colours, strict, rules

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = np.full(len(images), np.nan)
        todo = [i for i, meta in enumerate(metadata) if is_geneval_metadata(meta)]
        if not todo:
            return scores
        for i, verdict in zip(todo, self.verdicts(to_pil_images(images[todo]), [metadata[i] for i in todo])):
            scores[i] = float(verdict.correct) if self.strict else verdict.partial
        return scores

    def verdicts(self, pictures: list[Image.Image], metadata: list[dict]) -> list[Verdict]:
        """GenEval's verdict and the partial credit of each picture; each metadata is a GenEval line."""
        verdicts = []
        for picture, meta, detections in zip(pictures, metadata, self.detector.detect(pictures)):
            objects = select_detections(detections, meta.get("tag"), self.rules)
            self.colours.label(picture, objects, meta)
            verdicts.append(judge(objects, meta, self.rules))
        return verdicts


@register_reward("geneval", requires=(Variant("detector", DEFAULT_DETECTOR, DETECTORS), COLOUR_MODEL))
def geneval(
    detector: str = DEFAULT_DETECTOR,
    clip_model: str | None = None,
    device: str | None = None,
    strict: bool = False,
    batch_size: int = 16,
    threshold: float = GenEvalRules.threshold,
    counting_threshold: float = GenEvalRules.counting_threshold,
    max_objects: int = GenEvalRules.max_objects,
    max_overlap: float = GenEvalRules.max_overlap,
    position_threshold: float = GenEvalRules.position_threshold,
    **detector_options,
):
    """GenEval with Mask2Former + CLIP colours: partial credit, or pass/fail with strict=True (detector: transformers|mmdet).

    ``detector``: ``transformers`` (default; weights ``model``, $DGPO_GENEVAL_MODEL) or ``mmdet`` (GenEval's own
    stack, needs dgpo[geneval-mmdet]; ``checkpoint``, ``config``); the options not named here go to the detector."""
    rules = GenEvalRules(threshold, counting_threshold, int(max_objects), max_overlap, position_threshold)
    if "min_score" in detector_options:
        raise ValueError("reward 'geneval': min_score follows from threshold and counting_threshold; set those instead")
    # Detections at or below both thresholds can never be selected: the detector may drop them early.
    min_score = min(rules.threshold, rules.counting_threshold)
    found = build_detector(detector, device=device, batch_size=batch_size, min_score=min_score, **detector_options)
    colours = ColourClassifier(clip_model, found.device)
    return GenEvalReward(found, colours, bool(strict), rules)
