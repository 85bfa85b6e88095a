"""Out-of-domain quality metrics for ShapesEval images (the analogue of DGPO's aesthetic / DeQA checks).

The verifier reward only asks *what* is in an image (which shapes, colours, counts and
positions). A policy optimised against it can raise that reward while the pictures get
worse in ways the verifier never looks at: speckle noise below the foreground threshold,
smeared or off-palette colours that still point in the right colour direction, or a
collapse to one memorised layout per prompt. These metrics measure exactly those
side effects, so reward hacking shows up as a rising verifier score with a rising
artifact score or a falling diversity score.

* :func:`artifact_score` -- how far pixels stray from the colours a clean render can
  contain (lower is cleaner).
* :func:`diversity_score` / :func:`group_diversity` -- how different the images of one
  prompt are from each other (0 means mode collapse).

Images may be given as a uint8 batch ``(N, H, W, 3)``, a float batch in [0, 1] of shape
``(N, H, W, 3)`` or ``(N, 3, H, W)`` (numpy or torch), a single image of any of those
layouts, or a list of single images.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ..diversity import diversity
from ..diversity import group_diversity as _group_diversity
from .verifier import to_pixels_hwc
from .world import BACKGROUND, PALETTE

_BG = np.asarray(BACKGROUND, dtype=np.float64)
# One segment per palette colour: from the background to the colour, as (K, 3) directions.
_SEGMENT_DIRS = np.stack([np.asarray(c, dtype=np.float64) for c in PALETTE.values()]) - _BG
_SEGMENT_SQNORMS = (_SEGMENT_DIRS**2).sum(axis=1)
_MAX_DISTANCE = 255.0 * np.sqrt(3.0)


def _as_batch_hwc(images) -> np.ndarray:
    """Return images as a float64 array ``(N, H, W, 3)`` with values in 0..255."""
    if isinstance(images, (list, tuple)):
        return np.stack([to_pixels_hwc(im) for im in images]).astype(np.float64)
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected an image or a batch of images, got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    return np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0


def artifact_score(images) -> np.ndarray:
    """Per-image mean distance of pixels from the set of colours a clean render can contain.

    A clean render holds only the background, palette colours and anti-aliased edges,
    and every edge pixel is a blend ``BACKGROUND + t * (colour - BACKGROUND)`` with
    ``t`` in [0, 1] (objects never touch, so no pixel mixes two palette colours). The
    admissible colours are therefore the union of the segments from BACKGROUND to each
    PALETTE colour. For every pixel we take the RGB distance (in units of 255, divided
    by sqrt(3) so it lies in [0, 1]) to the nearest point of that union and average over
    the image's pixels.

    Clean renders score ~0 (only uint8 rounding); Gaussian noise, blurs that mix two
    colours, tints and any off-palette colour score higher. It is blind to errors that
    stay on the segments (a blurred edge against the background, a wrong but valid
    palette colour), which is what the verifier judges instead. Note that white's
    segment is the grey diagonal, so a uniform grey wash is *not* penalised.

    Returns a float64 array of shape ``(N,)`` with values in [0, 1].
    """
    pixels = _as_batch_hwc(images) - _BG  # (N, H, W, 3), offsets from the background
    distance = np.full(pixels.shape[:-1], np.inf)
    for direction, sqnorm in zip(_SEGMENT_DIRS, _SEGMENT_SQNORMS):
        # Projection parameter on this segment, clamped to its ends (background, colour).
        t = np.clip(pixels @ direction / sqnorm, 0.0, 1.0)
        np.minimum(distance, np.linalg.norm(pixels - t[..., None] * direction, axis=-1), out=distance)
    return distance.mean(axis=(1, 2)) / _MAX_DISTANCE


def diversity_score(images) -> float:
    """Mean pairwise distance between the images of one prompt's group (``dgpo.diversity.diversity``, on any of
    this module's image layouts): 0 exactly when every image is the same, the mode collapse that optimising a
    verifier reward with a narrow target tends to cause. Needs at least two images (raises ``ValueError`` otherwise).
    """
    return diversity(torch.from_numpy(_as_batch_hwc(images) / 255.0))


def group_diversity(images, group_ids: Sequence[Hashable]) -> float:
    """Unweighted mean of :func:`diversity_score` over the groups with at least 2 images.

    ``group_ids[i]`` names the group (typically the prompt) of ``images[i]``. Groups with a
    single image have no pairs and are ignored. Returns NaN when no group has 2 images.
    """
    if hasattr(group_ids, "detach"):
        group_ids = group_ids.detach().cpu().tolist()
    return _group_diversity(torch.from_numpy(_as_batch_hwc(images) / 255.0), list(group_ids))
