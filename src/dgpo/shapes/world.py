"""The ShapesEval world: flat coloured shapes on a plain background.

Everything that defines what a scene *is* lives here: the shape kinds, the palette,
the image size, shape geometry and the renderer. The verifier classifies objects
against the very same geometry (``shape_mask``), so renderer and verifier cannot drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (24, 24, 24)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 230, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 250),
    "purple": (170, 70, 220),
    "white": (240, 240, 240),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
MIN_OBJECT_SIZE = 7
MAX_OBJECT_SIZE = 11
MIN_GAP = 2
# Position relations in renders keep a clear margin so ground truth is unambiguous.
RELATION_RENDER_MARGIN = 4


@dataclass(frozen=True)
class SceneObject:
    """One shape: kind, colour name, top-left corner and side length, in pixels."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2.0, self.y + self.size / 2.0)

    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        arm_w, arm_h = w / 3.0, h / 3.0
        draw.rectangle([x0, cy - arm_h / 2, x1 - 1, cy + arm_h / 2 - 1], fill=fill)
        draw.rectangle([cx - arm_w / 2, y0, cx + arm_w / 2 - 1, y1 - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Soft coverage in [0, 1] of ``shape`` stretched to fill a ``width`` x ``height`` box."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, width * SUPERSAMPLE, height * SUPERSAMPLE), 255)
    small = canvas.resize((width, height), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_scene(objects: list[SceneObject] | tuple[SceneObject, ...], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render objects anti-aliased (supersampled box filter). Returns uint8 (size, size, 3)."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x0, y0, x1, y1 = obj.box()
        _draw_shape(draw, obj.shape, (x0 * s, y0 * s, x1 * s, y1 * s), PALETTE[obj.color])
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.uint8)


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0


def relation_holds(relation: str, a_center: tuple[float, float], b_center: tuple[float, float], margin: float) -> bool:
    """GenEval-style relation of A to B on centres: 'left of' means A's centre is left of B's by > margin."""
    (ax, ay), (bx, by) = a_center, b_center
    if relation == "left of":
        return ax < bx - margin
    if relation == "right of":
        return ax > bx + margin
    if relation == "above":
        return ay < by - margin
    if relation == "below":
        return ay > by + margin
    raise ValueError(f"unknown relation {relation!r}")


RELATIONS = ("left of", "right of", "above", "below")


def place_objects(
    shapes_and_colors: list[tuple[str, str]],
    rng: np.random.Generator,
    relation: str | None = None,
    size: int = IMAGE_SIZE,
    max_tries: int = 500,
) -> list[SceneObject]:
    """Random non-overlapping placement; with ``relation``, object 0 stands in it to object 1."""
    max_obj = MAX_OBJECT_SIZE
    for attempt in range(max_tries):
        if attempt and attempt % 100 == 0:
            max_obj = max(MIN_OBJECT_SIZE, max_obj - 1)
        placed: list[SceneObject] = []
        for shape, color in shapes_and_colors:
            side = int(rng.integers(MIN_OBJECT_SIZE, max_obj + 1))
            x = int(rng.integers(0, size - side + 1))
            y = int(rng.integers(0, size - side + 1))
            candidate = SceneObject(shape, color, x, y, side)
            if not all(_boxes_apart(candidate, other) for other in placed):
                break
            placed.append(candidate)
        else:
            if relation is None or relation_holds(relation, placed[0].center, placed[1].center, RELATION_RENDER_MARGIN):
                return placed
    raise RuntimeError(f"could not place {len(shapes_and_colors)} objects in {max_tries} tries")
