"""Scores of a model on the held-out tasks: COCO detection mAP and classification accuracy.

Detection metrics are pycocotools' ``COCOeval`` (bbox, 100 detections per image), the
numbers papers and the HF model cards quote, computed from in-memory ground truth and
detections; pycocotools' printing is silenced.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from collections.abc import Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from label_studio_sahi.slicing import Detections

__all__ = ["classification_accuracy", "detection_metrics", "paired_bootstrap"]

Box = tuple[float, float, float, float]


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _annotation(ann_id: int, image_id: int, box: Sequence[float], label: int) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    # Ids start at 1: COCOeval treats a matched id of 0 as "unmatched".
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(label) + 1,
        "bbox": [x1, y1, w, h],
        "area": w * h,
        "iscrowd": 0,
    }


def detection_metrics(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Sequence[Box], Sequence[int]]],
    num_classes: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> dict[str, float | None]:
    """COCO box metrics of ``predictions`` against ``truths``, image by image.

    Args:
        predictions: per image, detections (x1, y1, x2, y2 pixels, score, class index).
        truths: per image, ``(boxes, labels)`` with class indices in ``[0, num_classes)``;
            an image may have none.
        num_classes: the classes scored. Predicted classes outside the range are ignored
            (COCO scores per class, and such a class has no ground truth).
        image_sizes: per image ``(width, height)``; by default the smallest size holding
            every box (COCO wants a size; box metrics do not depend on it).

    Returns:
        ``map`` (AP at IoU .50:.95), ``map_50`` (AP at IoU .50), ``map_small`` (AP of
        objects of area up to 32² px, COCO's "small"), ``images`` and ``boxes`` (ground
        truth boxes). Where COCOeval answers -1 ("nothing to score"): ``map`` and ``map_50``
        are 0.0 (no ground truth boxes at all: nothing was found, see ``boxes``),
        ``map_small`` is ``None`` (JSON null) when no ground truth box is small. With
        ground truth but no predictions every AP is 0.0. Images without ground truth
        still count: detections on them are false positives.

    Raises:
        ValueError: when the lists differ in length, or a ground truth label is outside
            ``[0, num_classes)``.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} ground truths")
    if image_sizes is not None and len(image_sizes) != len(truths):
        raise ValueError(f"{len(image_sizes)} image sizes but {len(truths)} ground truths")

    images: list[dict[str, Any]] = []
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for index, (det, (boxes, labels)) in enumerate(zip(predictions, truths, strict=True)):
        image_id = index + 1
        if len(boxes) != len(labels):
            raise ValueError(f"image {index}: {len(boxes)} boxes but {len(labels)} labels")
        for box, label in zip(boxes, labels, strict=True):
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"image {index}: label {label} outside [0, {num_classes})")
            gt_anns.append(_annotation(len(gt_anns) + 1, image_id, box, int(label)))
        det_boxes = det.boxes.detach().float().cpu().reshape(-1, 4).tolist()
        det_scores = det.scores.detach().float().cpu().reshape(-1).tolist()
        det_labels = det.labels.detach().cpu().reshape(-1).tolist()
        for box, score, label in zip(det_boxes, det_scores, det_labels, strict=True):
            ann = _annotation(len(dt_anns) + 1, image_id, box, int(label))
            ann["score"] = float(score)
            dt_anns.append(ann)
        if image_sizes is not None:
            width, height = image_sizes[index]
        else:
            xs = [b[2] for b in boxes] + [b[2] for b in det_boxes]
            ys = [b[3] for b in boxes] + [b[3] for b in det_boxes]
            width = max(1, math.ceil(max(xs, default=1)))
            height = max(1, math.ceil(max(ys, default=1)))
        images.append({"id": image_id, "width": int(width), "height": int(height)})

    result: dict[str, float | None] = {
        "map": 0.0,
        "map_50": 0.0,
        "map_small": None,
        "images": len(images),
        "boxes": len(gt_anns),
    }
    if not gt_anns:
        return result

    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _coco({"images": images, "annotations": gt_anns, "categories": categories})
        dt = _coco({"images": images, "annotations": dt_anns, "categories": categories})
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    result["map"] = max(stats[0], 0.0)
    result["map_50"] = max(stats[1], 0.0)
    result["map_small"] = stats[3] if stats[3] >= 0 else None
    return result


def paired_bootstrap(
    candidate: Sequence[Detections],
    live: Sequence[Detections],
    truths: Sequence[tuple[Sequence[Box], Sequence[int]]],
    num_classes: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    metric: str = "map_50",
    resamples: int = 200,
    seed: int = 0,
) -> float:
    """How often the candidate scores strictly higher than live on held-out images drawn
    with replacement (both models on the same draw): the share of ``resamples`` draws.

    A held-out set of a few images is noise: one image more or less flips a small
    difference. A gain that survives most re-draws of the images is one that holds across
    them. Ties count as not better, so a candidate equal to live is never promoted.
    """
    if not truths:
        return 0.0
    rng = random.Random(seed)
    n = len(truths)
    wins = 0
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        sizes = [image_sizes[i] for i in pick] if image_sizes is not None else None
        chosen = [truths[i] for i in pick]
        a = detection_metrics([candidate[i] for i in pick], chosen, num_classes, sizes)[metric]
        b = detection_metrics([live[i] for i in pick], chosen, num_classes, sizes)[metric]
        wins += float(a or 0.0) > float(b or 0.0)
    return wins / resamples


def classification_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Share of images whose predicted class equals the true one (``None``: no answer,
    wrong); 0.0 for no images."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    if not truth:
        return 0.0
    return sum(p is not None and p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
