"""Deterministic ShapesEval verifier (no learned weights).

The rules, all in one place:

1. **Foreground**: a pixel is foreground when its RGB distance from the background
   colour exceeds ``FOREGROUND_DISTANCE``.
2. **Colour** of a foreground pixel: the palette colour whose direction from the
   background is closest in angle to the pixel's (cosine similarity). Anti-aliased
   edges are the colour blended with the background, so they keep the direction of
   their object's colour. A pixel whose best cosine is below ``MIN_COLOR_COSINE``
   is "unknown".
3. **Objects**: 8-connected components of pixels of one colour; components smaller
   than ``MIN_OBJECT_AREA`` pixels are specks and ignored. Unknown-colour components
   are objects of unknown colour.
4. **Shape**: the component's soft coverage (alpha = distance from background divided
   by its colour's distance) inside its bounding box is compared with every shape's
   ideal mask stretched to that box (soft IoU); best IoU >= ``MIN_SHAPE_IOU`` names
   the shape, otherwise it is "unknown".
5. **Clauses** (GenEval's rules): an object clause holds when at least one object of
   that shape is found (counting: exactly N); a colour clause holds when every found
   object of that shape has that colour; a position clause compares the centroids of
   the largest objects of the two shapes with a margin of ``RELATION_MARGIN`` px.
6. **Scores**: strict pass = all clauses hold (GenEval per-image pass/fail);
   partial credit = fraction of clauses that hold, with counting graded as
   max(0, 1 - |n - N| / N) (the dense training reward).
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
    objects: list[DetectedObject] = []
    for ci in range(-1, len(_COLOR_NAMES)):
        labels, count = ndimage.label(foreground & (color_index == ci), structure=_EIGHT_CONNECTED)
        for sl_index, sl in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[sl] == sl_index
            area = int(component.sum())
            if area < MIN_OBJECT_AREA:
                continue
            color_norm = _COLOR_NORMS[ci] if ci >= 0 else float(np.median(distance[sl][component]))
            alpha = np.where(component, np.clip(distance[sl] / color_norm, 0.0, 1.0), 0.0)
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
    """Best soft IoU of a bounding-box crop of coverage against each ideal shape mask."""
    h, w = alpha.shape
    best_shape, best_iou = "unknown", 0.0
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        iou = float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6))
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return (best_shape if best_iou >= MIN_SHAPE_IOU else "unknown"), best_iou


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


def verify(spec: PromptSpec, image) -> Verdict:
    return check(spec, detect_objects(image))
