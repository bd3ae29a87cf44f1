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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.scores import one_to_one_matches
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.labelstudio.label_config import ControlTag
from label_studio_sahi.training.dataset import LabelledTask

__all__ = [
    "bootstrap_fewer",
    "classification_accuracy",
    "corrections",
    "detection_metrics",
    "in_project_labels",
    "paired_bootstrap",
    "sign_test_fewer",
    "truth_detections",
]

Box = tuple[float, float, float, float]

EVAL_SCORE_THRESHOLD = 0.05  # mAP needs the low-score tail of the precision-recall curve


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


def in_project_labels(
    found: Detections, id2label: Mapping[int, str], tag: ControlTag, own_labels: bool
) -> Detections:
    """A model's boxes with their classes as indices into ``tag.labels``, as served: a
    fine-tuned model's classes are the project's labels (``own_labels``), a base model's
    are mapped by ``tag.label_for``; boxes of a class the project has no label for are
    dropped."""
    labels = list(tag.labels)
    index: list[int | None] = []
    for class_id in found.labels.tolist():
        name = id2label[int(class_id)]
        label = name if own_labels else tag.label_for(name)
        index.append(labels.index(label) if label in labels else None)
    keep = [i for i, k in enumerate(index) if k is not None]
    return Detections(
        found.boxes[keep], found.scores[keep], found.labels.new_tensor([index[i] for i in keep])
    )


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
    images, gt_anns, dt_anns = _coco_lists(predictions, truths, num_classes, image_sizes)
    result: dict[str, float | None] = {
        "map": 0.0,
        "map_50": 0.0,
        "map_small": None,
        "images": len(images),
        "boxes": len(gt_anns),
    }
    if not gt_anns:
        return result
    evaluator = _evaluated(images, gt_anns, dt_anns, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    result["map"] = max(stats[0], 0.0)
    result["map_50"] = max(stats[1], 0.0)
    result["map_small"] = stats[3] if stats[3] >= 0 else None
    return result


def _coco_lists(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Sequence[Box], Sequence[int]]],
    num_classes: int,
    image_sizes: Sequence[tuple[int, int]] | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO images, ground-truth and detection annotations (image ids from 1, in order)."""
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
    return images, gt_anns, dt_anns


def _evaluated(
    images: list[dict[str, Any]],
    gt_anns: list[dict[str, Any]],
    dt_anns: list[dict[str, Any]],
    num_classes: int,
) -> COCOeval:
    """A COCOeval that has matched detections to truths, image by image (``evaluate``)."""
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = _coco({"images": images, "annotations": gt_anns, "categories": categories})
        dt = _coco({"images": images, "annotations": dt_anns, "categories": categories})
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
    return evaluator


# What each metric reads of COCOeval's per-image matches: its area range and IoU thresholds
# (COCO's: 0.50, 0.55, ..., 0.95; index 0 is 0.50).
_METRIC_SCOPE = {"map": ("all", slice(None)), "map_50": ("all", slice(0, 1)),
                 "map_small": ("small", slice(None))}  # fmt: skip


@dataclass
class _Matches:
    """COCOeval.evaluateImg's answer for one image and class, at 100 detections."""

    scores: np.ndarray  # (D,) in descending order
    matched: np.ndarray  # (T, D) matched a truth at IoU threshold t
    ignored: np.ndarray  # (T, D)
    truths: int  # truths that count (not ignored)


def _image_matches(evaluator: COCOeval, area: str) -> list[dict[int, _Matches]]:
    """Per image (in order), per class: the matches ``evaluate`` found."""
    params = evaluator.params
    max_det = params.maxDets[-1]
    n_images, n_areas = len(params.imgIds), len(params.areaRng)
    a = params.areaRngLbl.index(area)
    out: list[dict[int, _Matches]] = [{} for _ in range(n_images)]
    for k in range(len(params.catIds)):
        for i in range(n_images):
            e = evaluator.evalImgs[k * n_areas * n_images + a * n_images + i]
            if e is None:
                continue
            out[i][k] = _Matches(
                np.asarray(e["dtScores"][:max_det], dtype=float),
                np.asarray(e["dtMatches"][:, :max_det]) > 0,
                np.asarray(e["dtIgnore"][:, :max_det]).astype(bool),
                int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)),
            )
    return out


def _average_precision(
    per_image: list[dict[int, _Matches]], pick: Sequence[int], ious: slice, recalls: np.ndarray
) -> float:
    """COCOeval.accumulate + summarize over the images ``pick`` (repeats allowed): AP
    averaged over classes that have truths and over the IoU thresholds ``ious``."""
    values = []
    for k in sorted({k for i in pick for k in per_image[i]}):
        entries = [per_image[i][k] for i in pick if k in per_image[i]]
        truths = sum(e.truths for e in entries)
        if truths == 0:
            continue  # COCO's -1: a class with nothing to find is not averaged
        order = np.argsort(-np.concatenate([e.scores for e in entries]), kind="mergesort")
        matched = np.concatenate([e.matched for e in entries], axis=1)[ious, order]
        ignored = np.concatenate([e.ignored for e in entries], axis=1)[ious, order]
        tp = np.cumsum(matched & ~ignored, axis=1, dtype=float)
        fp = np.cumsum(~matched & ~ignored, axis=1, dtype=float)
        for t in range(tp.shape[0]):
            recall = tp[t] / truths
            precision = tp[t] / (tp[t] + fp[t] + np.spacing(1))
            # The precision envelope: at each recall, the best precision at that recall or more.
            precision = np.maximum.accumulate(precision[::-1])[::-1]
            at = np.searchsorted(recall, recalls, side="left")
            q = np.zeros(len(recalls))
            inside = at < len(precision)
            q[inside] = precision[at[inside]]
            values.append(q.mean())
    return float(np.mean(values)) if values else 0.0


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

    Each draw scores exactly as ``detection_metrics`` would on the drawn images: COCOeval
    matches each image once, and only the accumulation (COCO's, over the draw) is redone,
    so 200 draws cost about as much as two evaluations, whatever the box counts.
    """
    if not truths:
        return 0.0
    area, ious = _METRIC_SCOPE[metric]
    recalls = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds
    matches = []
    for model in (candidate, live):
        images, gt_anns, dt_anns = _coco_lists(model, truths, num_classes, image_sizes)
        if not gt_anns:
            return 0.0
        matches.append(_image_matches(_evaluated(images, gt_anns, dt_anns, num_classes), area))
    rng = random.Random(seed)
    n = len(truths)
    wins = 0
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        a, b = (_average_precision(m, pick, ious, recalls) for m in matches)
        wins += a > b
    return wins / resamples


def corrections(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[Sequence[Box], Sequence[int]]],
    threshold: float,
) -> list[int]:
    """Per image, the boxes an annotator deletes or draws when the boxes at or above
    ``threshold`` (the serving threshold) are suggested: the wrong ones and the misses,
    suggestions matched one to one to the truth (same label, IoU >= 0.5, surest first).

    Unlike mAP it counts every false box, so it tells a model that sprays boxes from one
    that suggests little, where a few held-out images hold too few objects for mAP to.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} ground truths")
    out = []
    for det, (boxes, labels) in zip(predictions, truths, strict=True):
        suggested = det.select(det.scores >= threshold)
        matched = one_to_one_matches(suggested, truth_detections(boxes, labels))
        out.append(len(suggested) + len(boxes) - 2 * matched)
    return out


def truth_detections(boxes: Sequence[Sequence[float]], labels: Sequence[int]) -> Detections:
    """An image's true boxes as detections (score 1), to match suggestions against."""
    return Detections(
        torch.tensor([list(b) for b in boxes], dtype=torch.float32).reshape(-1, 4),
        torch.ones(len(boxes)),
        torch.tensor([int(c) for c in labels], dtype=torch.int64),
    )


def bootstrap_fewer(
    candidate: Sequence[int], live: Sequence[int], resamples: int = 200, seed: int = 0
) -> float:
    """How often the candidate's per-image counts (``corrections``) sum strictly lower than
    live's on the same images drawn with replacement: the share of ``resamples`` draws.
    Ties count as not fewer."""
    if len(candidate) != len(live):
        raise ValueError(f"{len(candidate)} candidate counts but {len(live)} live counts")
    if not candidate:
        return 0.0
    rng = random.Random(seed)
    n = len(candidate)
    wins = 0
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        wins += sum(candidate[i] for i in pick) < sum(live[i] for i in pick)
    return wins / resamples


def sign_test_fewer(candidate: Sequence[int], live: Sequence[int]) -> float:
    """One minus the chance that a coin per image would make the candidate's count
    (``corrections``) lower on as many of the images where the two differ: a one-sided
    sign test, exact.

    A bootstrap of sums cannot be sure of anything on two images, yet says so: lower on
    both, every draw is lower (1.0), where a coin gives that once in four (0.75). For a mAP
    gain the bootstrap re-pools many boxes per draw; for a tie, where only false-box counts
    differ, every image is one piece of evidence. 0.95 takes at least 5 images.
    """
    if len(candidate) != len(live):
        raise ValueError(f"{len(candidate)} candidate counts but {len(live)} live counts")
    fewer = sum(c < v for c, v in zip(candidate, live, strict=True))
    differ = sum(c != v for c, v in zip(candidate, live, strict=True))
    if fewer == 0:
        return 0.0
    as_many = sum(math.comb(differ, k) for k in range(fewer, differ + 1)) / 2**differ
    return 1.0 - as_many


def classification_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Share of images whose predicted class equals the true one (``None``: no answer,
    wrong); 0.0 for no images."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions but {len(truth)} truths")
    if not truth:
        return 0.0
    return sum(p is not None and p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


@dataclass
class HeldOutScore:
    """A detector's boxes on the held-out tasks, the truth, and the COCO metrics."""

    predictions: list[Detections]
    truths: list[tuple[list[tuple[float, float, float, float]], list[int]]]
    sizes: list[tuple[int, int]]
    metrics: dict[str, Any]


def evaluate_detector(
    detector: Detector,
    tag: ControlTag,
    held: list[LabelledTask],
    images: dict[int, Image.Image],
    slicing: SliceConfig,
    own_labels: bool,
) -> HeldOutScore:
    """Sliced mAP on held-out tasks; a live model's classes are mapped to labels as in serving."""
    labels = list(tag.labels)
    predictions, truths, sizes = [], [], []
    for task in held:
        image = images[task.task_id]
        found = sliced_detect(
            detector, np.array(image.convert("RGB")), slicing, EVAL_SCORE_THRESHOLD
        )
        predictions.append(in_project_labels(found, detector.id2label, tag, own_labels))
        truth = [(box, labels.index(label)) for label, box in task.boxes if label in labels]
        truths.append(([b for b, _ in truth], [c for _, c in truth]))
        sizes.append(image.size)
    metrics = detection_metrics(predictions, truths, len(labels), image_sizes=sizes)
    return HeldOutScore(predictions, truths, sizes, metrics)


def held_out_accuracy(
    classifier: Classifier,
    tag: ControlTag,
    held: list[LabelledTask],
    images: dict[int, Image.Image],
    own_labels: bool,
) -> float:
    scored = [t for t in held if t.choices]
    if not scored:
        return 0.0
    ranked = classifier.classify(
        [np.array(images[t.task_id].convert("RGB")) for t in scored], top_k=1
    )
    predicted = [r[0][0] if own_labels else tag.label_for(r[0][0]) for r in ranked]
    return classification_accuracy(predicted, [t.choices[0] for t in scored])
