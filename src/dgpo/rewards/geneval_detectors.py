"""GenEval's detector layer: images -> :class:`Detection` lists, one detector per registered name.

GenEval (``evaluation/evaluate_images.py``, github.com/djghosh13/geneval) runs mmdet 2.x's Mask2Former
(Swin-S, COCO instance segmentation, ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``) and reads its
result per class: an (n, 5) array of boxes with scores and n masks. Two detectors give those detections:

* ``transformers`` (the default, nothing to install beyond dgpo): Mask2Former through ``transformers``
  with a COCO instance checkpoint in the HF format, ``facebook/mask2former-swin-small-coco-instance``
  (the Swin-S size GenEval uses). Its pre- and post-processing are mmdet's test pipeline and
  ``MaskFormerFusionHead.instance_postprocess``, redone in torch (:func:`detector_inputs`,
  :func:`image_mask_logits`, :func:`instance_segmentation`, :func:`mask_boxes`), not the HF image
  processor's, which stretches images to a multiple of 32 instead of padding them and resamples masks
  through a fixed 384 x 384 grid.
* ``mmdet``: GenEval's own stack (mmdet 2.x and mmcv-full 1.7, the ``geneval-mmdet`` extra), kept for
  exact reproduction of published numbers.

The two are different trainings of one architecture (mmdet's checkpoint, and the one of the Mask2Former
authors that the HF port converts), so their detections, and the GenEval scores, can differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import UserError
from ..registry import Registry
from ..requirements import Package, Requirement, Setting
from .base import build_registered

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
MASK2FORMER = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
# GenEval's evaluation/download_models.sh fetches this file and saves it as f"{MASK2FORMER}.pth".
MASK2FORMER_URL = (
    "https://download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/"
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth"
)
HF_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
# mmcv-full compiles its ops against the installed torch, so pip must not build it in an isolated environment.
MMDET_INSTALL = "pip install --no-build-isolation 'dgpo[geneval-mmdet]'"
TRANSFORMERS_MODEL = Setting("model", "DGPO_GENEVAL_MODEL", HF_MASK2FORMER, kind="model")
MMDET_CHECKPOINT = Setting("checkpoint", "DGPO_GENEVAL_CHECKPOINT", kind="file")
# mmdet's test pipeline for GenEval's config: Resize(img_scale=(1333, 800), keep_ratio=True), Normalize, Pad(size_divisor=32).
SHORT_EDGE, LONG_EDGE, SIZE_DIVISOR = 800, 1333, 32
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # img_norm_cfg, RGB, on 0-255 values
MAX_PER_IMAGE = 100  # test_cfg.max_per_image: (query, class) pairs kept per image


@dataclass
class Detection:
    """One detected object: class name, confidence, box (x1, y1, x2, y2) in pixels, optional binary
    mask (H, W), and the colour label of the colour classifier where a prompt asks for a colour."""

    name: str
    confidence: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None


class Detector(Protocol):
    device: str | torch.device

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]: ...


DETECTORS: Registry[Callable[..., Detector]] = Registry("GenEval detector")


def register_detector(name: str, requires: tuple[Requirement, ...] = ()):
    """Register a detector factory. Every factory takes ``device``, ``batch_size`` and ``min_score`` (detections
    scoring at most this may be dropped: GenEval keeps only those above its thresholds) plus its own weights options;
    ``requires``: the packages and weights settings it needs (``dgpo.requirements``), for ``dgpo check``."""
    return DETECTORS.register(name, requires)


def build_detector(name: str, **options) -> Detector:
    """The detector ``name`` built with ``options``; an option it does not take is a one-line error naming both."""
    return build_registered(DETECTORS, name, **options)


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------- transformers


def resized_shape(height: int, width: int, short_edge: int = SHORT_EDGE, long_edge: int = LONG_EDGE) -> tuple[int, int]:
    """mmcv's keep-ratio ``rescale_size``: scale = min(long_edge / max(h, w), short_edge / min(h, w)), each side
    ``int(side * scale + 0.5)``: the short side becomes ``short_edge`` unless the long one would pass ``long_edge``."""
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def detector_inputs(images: list[torch.Tensor], short_edge: int = SHORT_EDGE, long_edge: int = LONG_EDGE) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """mmdet's test pipeline on 8-bit RGB images (3, H, W): bilinear keep-ratio resize (:func:`resized_shape`,
    rounded back to 8 bits as cv2 does), normalise with ``PIXEL_MEAN``/``PIXEL_STD``, then pad with zeros at the
    bottom and right to one batch shape, a multiple of 32 (``Pad(size_divisor=32)`` and mmdet's collate).
    Returns the batch and each image's resized (height, width)."""
    mean = torch.tensor(PIXEL_MEAN, device=images[0].device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images[0].device).view(3, 1, 1)
    resized = []
    for image in images:
        size = resized_shape(*image.shape[-2:], short_edge, long_edge)
        pixels = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
        resized.append((pixels - mean) / std)
    height, width = (max(r.shape[d] for r in resized) for d in (1, 2))
    height, width = -(-height // SIZE_DIVISOR) * SIZE_DIVISOR, -(-width // SIZE_DIVISOR) * SIZE_DIVISOR
    batch = torch.stack([F.pad(r, (0, width - r.shape[2], 0, height - r.shape[1])) for r in resized])
    return batch, [tuple(r.shape[1:]) for r in resized]


def image_mask_logits(mask_logits: torch.Tensor, input_shape, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """One image's mask logits (queries, h, w) back on its pixels, as mmdet's Mask2Former test does: bilinear to
    the padded batch shape, crop the padding off (the resized image's shape), bilinear to the original shape."""
    logits = F.interpolate(mask_logits[None], size=tuple(input_shape), mode="bilinear", align_corners=False)[0]
    logits = logits[:, : resized[0], : resized[1]]
    return F.interpolate(logits[None], size=tuple(original), mode="bilinear", align_corners=False)[0]


def instance_segmentation(class_logits: torch.Tensor, mask_logits: torch.Tensor, max_per_image: int = MAX_PER_IMAGE):
    """mmdet's ``MaskFormerFusionHead.instance_postprocess`` for one image.

    Class probabilities p = softmax(class_logits)[:, :-1] (the last class is "no object"); the ``max_per_image``
    most probable (query, class) pairs are the instances, so one query can give several classes. Each instance's
    mask is its query's logits > 0 and its score is p times the mean sigmoid of the logits inside the mask
    (zero for an empty mask). Returns labels (n,), scores (n,) and masks (n, H, W) bool, in no particular order.
    """
    queries, classes = class_logits.shape[0], class_logits.shape[1] - 1
    probabilities = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    scores, top = probabilities.flatten().topk(min(max_per_image, queries * classes), sorted=False)
    labels, query = top % classes, torch.div(top, classes, rounding_mode="floor")
    logits = mask_logits[query].float()
    masks = logits > 0
    inside = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return labels, scores * mask_scores, masks


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet's ``mask2bbox``: (n, H, W) bool -> (n, 4) float boxes x1, y1 (first column, row of the mask) and
    x2, y2 (last column, row + 1); all zeros for an empty mask."""
    columns, rows = masks.any(dim=1), masks.any(dim=2)

    def span(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = hits.float().argmax(dim=1)
        last = hits.shape[1] - hits.flip(1).float().argmax(dim=1)
        return first, last

    (x1, x2), (y1, y2) = span(columns), span(rows)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(columns.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def detections_from_instances(labels: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, min_score: float = -1.0) -> list[Detection]:
    """Instances (label index into :data:`OBJECT_NAMES`, score, mask) as detections with their mask's box, as
    mmdet's ``bbox2result`` hands them to GenEval; those scoring at most ``min_score`` are left out."""
    keep = scores > min_score
    labels, scores, masks = labels[keep], scores[keep], masks[keep]
    boxes = mask_boxes(masks).tolist()
    masks = masks.cpu().numpy()
    return [Detection(OBJECT_NAMES[label], score, tuple(box), mask) for label, score, box, mask in zip(labels.tolist(), scores.tolist(), boxes, masks)]


class TransformersMask2Former:
    """Mask2Former instance segmentation through ``transformers``: :func:`detector_inputs`, the model,
    :func:`image_mask_logits`, :func:`instance_segmentation`, :func:`detections_from_instances`."""

    def __init__(self, model: str, device: str | None, batch_size: int, min_score: float, short_edge: int, long_edge: int):
        from transformers import Mask2FormerForUniversalSegmentation

        self.device = _default_device(device)
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model).eval().requires_grad_(False).to(self.device)
        except OSError as exc:
            raise UserError(f"reward 'geneval': cannot load Mask2Former {model!r} (a local directory or a hub id, e.g. {HF_MASK2FORMER}): {exc}") from exc
        if self.model.config.num_labels != len(OBJECT_NAMES):
            raise UserError(f"reward 'geneval': {model!r} has {self.model.config.num_labels} classes, GenEval needs a COCO instance model with 80")
        self.batch_size, self.min_score = int(batch_size), float(min_score)
        self.short_edge, self.long_edge = int(short_edge), int(long_edge)

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        detections = []
        for start in range(0, len(images), self.batch_size):
            pixels = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(self.device) for image in images[start : start + self.batch_size]]
            batch, resized = detector_inputs(pixels, self.short_edge, self.long_edge)
            outputs = self.model(pixel_values=batch)
            for i, image in enumerate(pixels):
                logits = image_mask_logits(outputs.masks_queries_logits[i], batch.shape[-2:], resized[i], image.shape[-2:])
                detections.append(detections_from_instances(*instance_segmentation(outputs.class_queries_logits[i], logits), self.min_score))
        return detections


@register_detector("transformers", requires=(TRANSFORMERS_MODEL,))
def transformers_detector(
    model: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
    min_score: float = -1.0,
    short_edge: int = SHORT_EDGE,
    long_edge: int = LONG_EDGE,
) -> TransformersMask2Former:
    """Mask2Former (Swin-S, COCO instances) through transformers: ``model`` a local directory or hub id
    (default $DGPO_GENEVAL_MODEL, else facebook/mask2former-swin-small-coco-instance)."""
    model = TRANSFORMERS_MODEL.value(model)
    return TransformersMask2Former(model, device, batch_size, min_score, short_edge, long_edge)


# ----------------------------------------------------------------------------- mmdet


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


def _import_mmdet():
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError as exc:
        raise UserError(
            f"GenEval detector 'mmdet' needs {exc.name or 'mmdet'}, missing here (mmdet 2.x, mmcv-full 1.7): {MMDET_INSTALL}; "
            f"the default detector 'transformers' needs neither"
        ) from None
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


class MmdetMask2Former:
    """GenEval's object detector through ``mmdet.apis``: images go in as 8-bit BGR arrays, as mmcv reads
    the PNG files GenEval evaluates."""

    def __init__(self, config: str | None, checkpoint: str | None, device: str | None, batch_size: int, min_score: float):
        init_detector, self._inference = _import_mmdet()
        config = config or os.environ.get("DGPO_GENEVAL_CONFIG") or default_config()
        checkpoint = MMDET_CHECKPOINT.value(checkpoint)
        if not checkpoint:
            raise UserError(
                f"GenEval detector 'mmdet' needs the Mask2Former weights: set DGPO_GENEVAL_CHECKPOINT (or pass checkpoint=) "
                f"to {MASK2FORMER}.pth, from {MASK2FORMER_URL}"
            )
        self.device = str(_default_device(device))
        self.model = init_detector(config, checkpoint, device=self.device)
        self.batch_size, self.min_score = int(batch_size), float(min_score)

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        detections = []
        for start in range(0, len(images), self.batch_size):
            arrays = [np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]) for image in images[start : start + self.batch_size]]
            for result in self._inference(self.model, arrays):
                detections.append([d for d in detections_from_mmdet(result) if d.confidence > self.min_score])
        return detections


@register_detector("mmdet", requires=(Package("mmdet", MMDET_INSTALL), Package("mmcv", MMDET_INSTALL), MMDET_CHECKPOINT))
def mmdet_detector(
    config: str | None = None, checkpoint: str | None = None, device: str | None = None, batch_size: int = 16, min_score: float = -1.0
) -> MmdetMask2Former:
    """GenEval's own mmdet 2.x Mask2Former: ``checkpoint`` ($DGPO_GENEVAL_CHECKPOINT) its .pth, ``config``
    ($DGPO_GENEVAL_CONFIG) mmdet's config, by default the copy installed with mmdet."""
    return MmdetMask2Former(config, checkpoint, device, batch_size, min_score)
