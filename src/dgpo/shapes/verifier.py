"""Deterministic ShapesEval verifier (no learned weights).

The rules, all in one place:

1. **Foreground**: a pixel is foreground when its RGB distance from the background
   colour exceeds ``FOREGROUND_DISTANCE``.
2. **Colour** of a foreground pixel: the palette colour whose direction from the
   background is closest in angle to the pixel's (cosine similarity). Anti-aliased
   edges are the colour blended with the background, so they keep the direction of
   their object's colour. A pixel whose best cosine is below ``MIN_COLOR_COSINE``
   is "unknown".
3. **Objects**: 8-connected components of foreground pixels; components smaller than
   ``MIN_OBJECT_AREA`` pixels are specks and ignored. Objects in the world never touch,
   so a blob of two touching shapes is one object (and, not being near square or
   matching any shape, of unknown shape). An object's colour is the palette colour of
   more than ``MIN_COLOR_SHARE`` of its pixels, otherwise "unknown": a circle fading
   from red to yellow is a circle, but neither a red nor a yellow one.
4. **Shape**: the object's soft coverage (alpha = distance from background divided
   by its pixel colour's distance) inside the box of its at-least-half-covered pixels is
   compared with every shape's ideal mask stretched to that box (soft IoU). The best
   match names the shape when all of these hold, otherwise the shape is "unknown":
   best IoU >= ``MIN_SHAPE_IOU``; the box is near square (longer side at most
   ``MAX_ASPECT`` times the shorter, or ``MAX_SIDE_SLACK`` px longer, since one pixel
   is a large fraction of a small shape: the world draws every shape in a square box, so
   a rectangle is not a square and a sausage is not a circle); and a circle needs IoU >= ``MIN_CIRCLE_IOU`` and a lead of
   ``MIN_CIRCLE_MARGIN`` over the next shape, because any roundish blob matches the
   circle best (rounded squares, soft triangles), and only a clear match is a circle.
5. **Clauses** (GenEval's rules): an object clause holds when at least one object of
   that shape is found (counting: exactly N); a colour clause holds when every found
   object of that shape has that colour; a position clause compares the centroids of
   the largest objects of the two shapes with a margin of ``RELATION_MARGIN`` px.
6. **Scores**: strict pass = all clauses hold (GenEval per-image pass/fail);
   partial credit = fraction of clauses that hold, with counting graded as
   max(0, 1 - |n - N| / N) (the dense training reward); focused credit
   (``focused_partial``) = the same clauses, but those the category tests (a
   relation, a colour, a count) share a fixed part ``focus`` of the credit and the
   object clauses the rest, so that drawing the shapes cannot crowd out the relation
   or the colour binding the prompt is about.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .prompts import PromptSpec
from .world import BACKGROUND, PALETTE, SHAPES, relation_holds, shape_mask

FOREGROUND_DISTANCE = 60.0
MIN_COLOR_COSINE = 0.93
MIN_OBJECT_AREA = 10
MIN_SHAPE_IOU = 0.6
MAX_ASPECT = 1.3
MAX_SIDE_SLACK = 2
MIN_COLOR_SHARE = 0.5
MIN_CIRCLE_IOU = 0.8
MIN_CIRCLE_MARGIN = 0.05
RELATION_MARGIN = 2.0

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_COLOR_NAMES = list(PALETTE)
_COLOR_DIRS = np.stack([np.asarray(PALETTE[c], dtype=np.float32) - _BG for c in _COLOR_NAMES])
_COLOR_NORMS = np.linalg.norm(_COLOR_DIRS, axis=1)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    centroid: tuple[float, float]
    area: int
    shape_iou: float


@dataclass(frozen=True)
class Verdict:
    passed: bool
    partial: float
    clauses: tuple[tuple[str, float], ...]


def to_pixels_hwc(image) -> np.ndarray:
    """HWC float32 pixels in 0..255 from HWC/CHW uint8 (0..255) or float (0..1), numpy or torch."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0.0, 1.0) * 255.0
    return arr.astype(np.float32)


def detect_objects(image) -> list[DetectedObject]:
    pixels = to_pixels_hwc(image)
    offset = pixels - _BG
    distance = np.linalg.norm(offset, axis=-1)
    foreground = distance > FOREGROUND_DISTANCE
    cosine = (offset @ _COLOR_DIRS.T) / (distance[..., None] * _COLOR_NORMS + 1e-6)
    color_index = np.where(cosine.max(-1) >= MIN_COLOR_COSINE, cosine.argmax(-1), -1)
    labels, _ = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    objects: list[DetectedObject] = []
    for sl_index, sl in enumerate(ndimage.find_objects(labels), start=1):
        component = labels[sl] == sl_index
        area = int(component.sum())
        if area < MIN_OBJECT_AREA:
            continue
        colors = color_index[sl][component]
        votes = np.bincount(colors[colors >= 0], minlength=len(_COLOR_NAMES))
        ci = int(votes.argmax()) if votes.max() > MIN_COLOR_SHARE * area else -1
        known = color_index[sl] >= 0
        norms = np.where(known, _COLOR_NORMS[np.maximum(color_index[sl], 0)], float(np.median(distance[sl][component])))
        alpha = np.where(component, np.clip(distance[sl] / norms, 0.0, 1.0), 0.0)
        shape, iou = classify_shape(_crop_to_half_coverage(alpha))
        ys, xs = np.nonzero(component)
        centroid = (float(xs.mean() + sl[1].start + 0.5), float(ys.mean() + sl[0].start + 0.5))
        color = _COLOR_NAMES[ci] if ci >= 0 else "unknown"
        objects.append(DetectedObject(shape, color, centroid, area, iou))
    return objects


def _crop_to_half_coverage(alpha: np.ndarray) -> np.ndarray:
    """Crop to the box of pixels at least half covered: blur spreads faint edges outwards, the 0.5 level stays put."""
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(ys) == 0:
        return alpha
    return alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def classify_shape(alpha: np.ndarray) -> tuple[str, float]:
    """Name the shape of a coverage crop (rule 4 of the module docstring); returns (shape, best soft IoU)."""
    h, w = alpha.shape
    ious = {}
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        ious[shape] = float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6))
    best, runner_up = sorted(ious.values(), reverse=True)[:2]
    shape = max(ious, key=ious.get)
    near_square = max(h, w) <= max(MAX_ASPECT * min(h, w), min(h, w) + MAX_SIDE_SLACK)
    clear = best >= MIN_SHAPE_IOU and near_square
    if shape == "circle":
        clear = clear and best >= MIN_CIRCLE_IOU and best - runner_up >= MIN_CIRCLE_MARGIN
    return (shape if clear else "unknown"), best


def _largest(objects: list[DetectedObject]) -> DetectedObject:
    return max(objects, key=lambda o: o.area)


def check(spec: PromptSpec, objects: list[DetectedObject]) -> Verdict:
    """Apply the clause rules of the module docstring to detected objects."""
    clauses: list[tuple[str, float]] = []
    for clause in spec.objects:
        found = [o for o in objects if o.shape == clause.shape]
        if spec.category == "counting":
            n, want = len(found), clause.count
            clauses.append((f"count {clause.shape}={want}", max(0.0, 1.0 - abs(n - want) / want)))
            continue
        clauses.append((f"has {clause.shape}", float(len(found) >= 1)))
        if clause.color is not None:
            ok = bool(found) and all(o.color == clause.color for o in found)
            clauses.append((f"{clause.shape} is {clause.color}", float(ok)))
    if spec.relation is not None:
        a = [o for o in objects if o.shape == spec.objects[0].shape]
        b = [o for o in objects if o.shape == spec.objects[1].shape]
        ok = bool(a and b) and relation_holds(spec.relation, _largest(a).centroid, _largest(b).centroid, RELATION_MARGIN)
        clauses.append((spec.relation, float(ok)))
    partial = float(np.mean([score for _, score in clauses]))
    passed = all(score == 1.0 for _, score in clauses)
    return Verdict(passed, partial, tuple(clauses))


def focused_partial(verdict: Verdict, focus: float) -> float:
    """Partial credit with the tested clauses (all but "has <shape>") sharing ``focus`` of it (rule 6)."""
    tested = [score for name, score in verdict.clauses if not name.startswith("has ")]
    objects = [score for name, score in verdict.clauses if name.startswith("has ")]
    if not tested or not objects:
        return verdict.partial
    return focus * float(np.mean(tested)) + (1.0 - focus) * float(np.mean(objects))


def verify(spec: PromptSpec, image) -> Verdict:
    return check(spec, detect_objects(image))


FAILURE_KINDS = ("unknown_shape", "wrong_shapes", "wrong_count", "wrong_colour", "wrong_relation")
"""Why an image fails, drawing first: an object whose shape can't be classified, then named shapes
missing although every object is classified; the rest are failures to follow the words."""
DRAWING_FAILURES = FAILURE_KINDS[:2]


def failure_kind(spec: PromptSpec, image) -> str | None:
    """The first of ``FAILURE_KINDS`` that explains a failed image, or None when it passes."""
    objects = detect_objects(image)
    verdict = check(spec, objects)
    if verdict.passed:
        return None
    failed = [name for name, score in verdict.clauses if score < 1.0]
    if any(o.shape == "unknown" for o in objects):
        return "unknown_shape"
    if any(name.startswith("has ") for name in failed):
        return "wrong_shapes"
    if any(name.startswith("count ") for name in failed):
        return "wrong_count"
    if any(" is " in name for name in failed):
        return "wrong_colour"
    return "wrong_relation"
