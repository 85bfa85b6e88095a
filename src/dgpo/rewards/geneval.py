"""GenEval (Ghosh et al. 2023) as a reward: object detection with Mask2Former, colour with CLIP.

A port of GenEval's ``evaluation/evaluate_images.py`` (github.com/djghosh13/geneval) in two layers:

* the decision layer (:func:`select_detections`, :func:`strict_verdict`, :func:`partial_score`,
  :func:`judge`) is plain Python on detections: which detections count, and whether they satisfy
  a prompt's GenEval metadata (``{"tag", "include": [{"class", "count", "color"?, "position"?}],
  "exclude"?}``, one line of GenEval's ``evaluation_metadata.jsonl``). The strict verdict is
  GenEval's; the partial credit is the one RL codebases train on (Flow-GRPO's reward server,
  ``evaluate_reward``), reproduced with its quirks so scores compare with its reward curves.
* the detector layer (:class:`Mask2Former`, :class:`ColourClassifier`) needs the ``geneval``
  extra (mmdet 2.x and mmcv-full 1.7, the versions GenEval documents): GenEval's
  ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` instance segmenter, and a zero-shot CLIP
  ViT-L/14 colour classifier over GenEval's ten colours and prompt templates. The CLIP runs
  through ``transformers`` (``openai/clip-vit-large-patch14``, the same OpenAI weights GenEval
  loads with open_clip), so open_clip and clip_benchmark are not needed.

The ``geneval`` reward reads each sample's GenEval metadata from ``metadata`` (the trainer passes
the ``metadata`` object of each JSONL prompt line; :func:`convert_geneval_prompts` writes GenEval's
prompt file in that form); a sample without it scores NaN.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from .base import register_reward, to_pil_images
from .clip import ClipEmbedder

# GenEval's evaluation/object_names.txt: the 80 COCO classes in the detector's output order.
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's zero-shot colour prompts ({c}: colour, {name}: the detected class).
COLOR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
CROP_BACKGROUND = "#999"  # GenEval's ImageCrops bgcolor: pixels outside the object's mask
MASK2FORMER = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
# GenEval's evaluation/download_models.sh fetches this file and saves it as f"{MASK2FORMER}.pth".
MASK2FORMER_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/"
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"
)
# mmcv-full compiles its ops against the installed torch, so pip must not build it in an isolated environment.
INSTALL = "pip install --no-build-isolation 'dgpo[geneval]'"


@dataclass(frozen=True)
class GenEvalRules:
    """GenEval's ``--options`` and their defaults (evaluate_images.py, ``__main__``)."""

    threshold: float = 0.3  # detections must score above this ...
    counting_threshold: float = 0.9  # ... or above this for "counting" prompts
    max_objects: int = 16  # most confident detections kept per class
    max_overlap: float = 1.0  # per-class NMS IoU; 1.0 keeps overlapping boxes
    position_threshold: float = 0.1  # margin, as a fraction of both boxes' sizes, for relative position


@dataclass
class Detection:
    """One detected object: class name, confidence, box (x1, y1, x2, y2) in pixels, optional binary
    mask (H, W), and the colour label of the colour classifier where a prompt asks for a colour."""

    name: str
    confidence: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None


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
        scores = np.array([d.confidence for d in candidates])
        ordering = np.argsort(scores)[::-1]
        ordering = ordering[scores[ordering] > threshold][: rules.max_objects].tolist()
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


def convert_geneval_prompts(source, destination) -> int:
    """GenEval's ``evaluation_metadata.jsonl`` -> dgpo prompt JSONL: one ``{"prompt": ..., "metadata": line}``
    per line, the whole GenEval line kept as the metadata. Returns the number of prompts written."""
    rows = []
    for number, line in enumerate(Path(source).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str) or not is_geneval_metadata(row):
            raise ValueError(f"{source}:{number}: not a GenEval metadata line (needs 'prompt' and an 'include' list)")
        rows.append(json.dumps({"prompt": row["prompt"], "metadata": row}))
    Path(destination).write_text("".join(f"{row}\n" for row in rows))
    return len(rows)


# ----------------------------------------------------------------------------- detector layer


def detections_from_mmdet(result) -> list[Detection]:
    """One image's mmdet 2.x instance result (per class: an (n, 5) array of x1, y1, x2, y2, score, and
    with masks a list of n (H, W) masks) as detections, named by GenEval's class list."""
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    if len(bbox) != len(OBJECT_NAMES):
        raise ValueError(f"expected per-class results for the {len(OBJECT_NAMES)} COCO classes, got {len(bbox)}")
    return [
        Detection(name, float(row[4]), tuple(float(v) for v in row[:4]), None if segm is None else np.asarray(segm[index][j]))
        for index, name in enumerate(OBJECT_NAMES)
        for j, row in enumerate(bbox[index])
    ]


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
        model = model or os.environ.get("DGPO_CLIP_MODEL", "openai/clip-vit-large-patch14")
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


def _import_mmdet():
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError as exc:
        raise UserError(f"the geneval reward needs {exc.name or 'mmdet'}, missing here (the GenEval extra: mmdet 2.x, mmcv-full 1.7): {INSTALL}") from None
    return init_detector, inference_detector


def default_config() -> str:
    """mmdet's own copy of GenEval's Mask2Former config (pip installs keep configs under ``mmdet/.mim``;
    GenEval's source install has them next to the package)."""
    import mmdet

    root = Path(mmdet.__file__).parent
    for configs in (root / ".mim" / "configs", root.parent / "configs"):
        path = configs / "mask2former" / f"{MASK2FORMER}.py"
        if path.is_file():
            return str(path)
    raise UserError(f"reward 'geneval': mmdet has no configs/mask2former/{MASK2FORMER}.py; pass config= or set DGPO_GENEVAL_CONFIG")


class Mask2Former:
    """GenEval's object detector through ``mmdet.apis``: images go in as 8-bit BGR arrays, as mmcv reads
    the PNG files GenEval evaluates."""

    def __init__(self, config: str | None = None, checkpoint: str | None = None, device: str | None = None, batch_size: int = 16):
        init_detector, self._inference = _import_mmdet()
        config = config or os.environ.get("DGPO_GENEVAL_CONFIG") or default_config()
        checkpoint = checkpoint or os.environ.get("DGPO_GENEVAL_CHECKPOINT")
        if not checkpoint:
            raise UserError(
                f"reward 'geneval' needs the Mask2Former weights: set DGPO_GENEVAL_CHECKPOINT (or pass checkpoint=) "
                f"to {MASK2FORMER}.pth, from {MASK2FORMER_URL}"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = init_detector(config, checkpoint, device=self.device)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        detections = []
        for start in range(0, len(images), self.batch_size):
            arrays = [np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]) for image in images[start : start + self.batch_size]]
            detections.extend(detections_from_mmdet(result) for result in self._inference(self.model, arrays))
        return detections


class GenEvalReward:
    """Detect, keep GenEval's boxes, label colours where asked, judge; NaN for samples without GenEval metadata."""

    def __init__(self, detector: Mask2Former, colours: ColourClassifier, strict: bool, rules: GenEvalRules):
        self.detector, self.colours, self.strict, self.rules = detector, colours, strict, rules

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> np.ndarray:
        scores = np.full(len(images), np.nan)
        todo = [i for i, meta in enumerate(metadata) if is_geneval_metadata(meta)]
        if not todo:
            return scores
        pictures = to_pil_images(images[todo])
        for i, picture, detections in zip(todo, pictures, self.detector.detect(pictures)):
            objects = select_detections(detections, metadata[i].get("tag"), self.rules)
            self.colours.label(picture, objects, metadata[i])
            verdict = judge(objects, metadata[i], self.rules)
            scores[i] = float(verdict.correct) if self.strict else verdict.partial
        return scores


@register_reward("geneval")
def geneval(
    config: str | None = None,
    checkpoint: str | None = None,
    clip_model: str | None = None,
    device: str | None = None,
    strict: bool = False,
    batch_size: int = 16,
    threshold: float = GenEvalRules.threshold,
    counting_threshold: float = GenEvalRules.counting_threshold,
    max_objects: int = GenEvalRules.max_objects,
    max_overlap: float = GenEvalRules.max_overlap,
    position_threshold: float = GenEvalRules.position_threshold,
):
    """GenEval with Mask2Former + CLIP colours: partial credit, or pass/fail with strict=True (needs dgpo[geneval])."""
    detector = Mask2Former(config, checkpoint, device, batch_size)
    colours = ColourClassifier(clip_model, detector.device)
    rules = GenEvalRules(threshold, counting_threshold, int(max_objects), max_overlap, position_threshold)
    return GenEvalReward(detector, colours, bool(strict), rules)
