"""sahi's own sliced prediction around our detector: the reference that parity tests and the
benchmark compare the backend with.

sahi is given the very model and image processor the backend serves with (its transformers
adapter, ``HuggingfaceDetectionModel``) and the same slice and merge parameters
(``SliceConfig``), and runs ``sahi.predict.get_sliced_prediction`` window by window.
"""

from __future__ import annotations

import numpy as np
import torch
from sahi.models.huggingface import HuggingfaceDetectionModel
from sahi.predict import get_sliced_prediction
from sahi.prediction import ObjectPrediction

from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.inference.slicing import Detections, pairwise_overlap


def sahi_model(detector: Detector, threshold: float) -> HuggingfaceDetectionModel:
    """sahi's transformers adapter around ``detector``'s model and image processor, on its device."""
    return HuggingfaceDetectionModel(
        model=detector.model,
        processor=detector.processor,
        confidence_threshold=threshold,
        device=str(detector.device),
    )


def sahi_sliced_prediction(
    model: HuggingfaceDetectionModel, pixels: np.ndarray, cfg: SliceConfig, batch_size: int = 1
) -> list[ObjectPrediction]:
    """``get_sliced_prediction`` with ``cfg``'s windows, full-image pass and merging
    (``batch_size`` windows per forward pass)."""
    result = get_sliced_prediction(
        pixels,
        model,
        slice_height=cfg.slice_height,
        slice_width=cfg.slice_width,
        overlap_height_ratio=cfg.overlap_height_ratio,
        overlap_width_ratio=cfg.overlap_width_ratio,
        perform_standard_pred=cfg.full_image_pass,
        postprocess_type=cfg.merge_type,
        postprocess_match_metric=cfg.merge_metric,
        postprocess_match_threshold=cfg.merge_threshold,
        postprocess_class_agnostic=cfg.class_agnostic,
        verbose=0,
        batch_size=batch_size,
    )
    return result.object_prediction_list


def sahi_detections(
    detector: Detector, pixels: np.ndarray, cfg: SliceConfig, threshold: float
) -> Detections:
    """sahi's merged boxes for ``pixels``, as the backend's ``Detections`` (xyxy pixels)."""
    preds = sahi_sliced_prediction(sahi_model(detector, threshold), pixels, cfg)
    return Detections(
        torch.tensor([p.bbox.to_xyxy() for p in preds], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([p.score.value for p in preds], dtype=torch.float32),
        torch.tensor([p.category.id for p in preds], dtype=torch.int64),
    )


def assert_same_detections(ours: Detections, theirs: Detections, score_tol: float = 1e-5) -> None:
    """Same number of boxes, each matched one-to-one at IoU > 0.99 with the same label."""
    assert len(ours) == len(theirs), f"{len(ours)} boxes against sahi's {len(theirs)}"
    if len(ours) == 0:
        return
    iou = pairwise_overlap(torch.cat([ours.boxes, theirs.boxes]), "IOU")[: len(ours), len(ours) :]
    used: set[int] = set()
    for i in range(len(ours)):
        candidates = [
            j
            for j in torch.argsort(iou[i], descending=True).tolist()
            if j not in used and iou[i, j] > 0.99 and int(theirs.labels[j]) == int(ours.labels[i])
        ]
        assert candidates, f"our box {ours.boxes[i].tolist()} has no match in sahi's result"
        j = candidates[0]
        used.add(j)
        assert abs(float(ours.scores[i]) - float(theirs.scores[j])) <= score_tol
