"""Sliced inference equals sahi's ``get_sliced_prediction`` on the same model, image and parameters.

sahi is given the very model and image processor the backend serves with; our pipeline
batches the windows and merges with tensor code, sahi runs window by window through its
per-box objects. The merged boxes must match one to one (IoU > 0.99, same label, score
within 1e-3).

Both DETR decodings are covered: Conditional DETR (sigmoid per class) and plain DETR
(softmax with a no-object class). For the softmax family, sahi's transformers adapter
keeps a query when its arg-max over all classes *including no-object* is a real class
above the threshold, while the image processor's own ``post_process_object_detection``
(which the backend uses, so every family is decoded as its authors decode it) takes the
best real class. The two agree whenever the threshold is at least 0.5, so plain DETR is
checked at 0.5 and 0.7, Conditional DETR at 0.3 (the default) and 0.5.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from testkit.sahi_reference import assert_same_detections, sahi_detections
from testkit.tiny_models import draw_scene


@pytest.fixture(scope="module")
def scene_pixels() -> np.ndarray:
    # 20 small squares on a 600x450 image: many windows see the same square.
    return np.asarray(draw_scene(600, 450, 20, random.Random(11)).image)


@pytest.fixture(scope="module")
def plain_detr(detr_dir: Path) -> Detector:
    return Detector.load(str(detr_dir), device="cpu")


@pytest.mark.parametrize("merge_type", ["NMS", "GREEDYNMM"])
@pytest.mark.parametrize("metric", ["IOU", "IOS"])
@pytest.mark.parametrize(
    ("family", "threshold"),
    [("conditional", 0.3), ("conditional", 0.5), ("detr", 0.5), ("detr", 0.7)],
)
def test_sliced_boxes_equal_sahis(
    detector: Detector,
    plain_detr: Detector,
    scene_pixels: np.ndarray,
    merge_type: str,
    metric: str,
    family: str,
    threshold: float,
) -> None:
    model = detector if family == "conditional" else plain_detr
    cfg = SliceConfig(
        slice_height=128,
        slice_width=128,
        overlap_height_ratio=0.2,
        overlap_width_ratio=0.2,
        merge_type=merge_type,  # type: ignore[arg-type]
        merge_metric=metric,  # type: ignore[arg-type]
        window_batch_size=8,
    )
    ours = sliced_detect(model, scene_pixels, cfg, threshold)
    theirs = sahi_detections(model, scene_pixels, cfg, threshold)
    assert len(theirs) > 5, "the comparison needs boxes to compare"
    assert_same_detections(ours, theirs, score_tol=1e-3)


def test_parity_holds_without_the_full_image_pass_and_class_agnostic(
    detector: Detector, scene_pixels: np.ndarray
) -> None:
    cfg = SliceConfig(slice_height=160, slice_width=160, full_image_pass=False, class_agnostic=True)
    assert_same_detections(
        sliced_detect(detector, scene_pixels, cfg, 0.5),
        sahi_detections(detector, scene_pixels, cfg, 0.5),
        1e-3,
    )
