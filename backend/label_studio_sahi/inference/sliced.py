"""Sliced detection: an image cut into overlapping windows, each through the detector, the
boxes merged back in image pixels (slicing-aided hyper inference). Arrays in, boxes out:
no HTTP, Redis or Label Studio; serving, training, evaluation and the benchmarks share it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from label_studio_sahi import metrics
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.slicing import (
    Detections,
    merge_detections,
    model_window,
    slice_windows,
)
from label_studio_sahi.settings import MatchMetric, MergeType, Settings


@dataclass(frozen=True)
class SliceConfig:
    """How an image is cut into windows and how the windows' boxes are merged back."""

    slice_height: int | None = 512
    slice_width: int | None = 512
    overlap_height_ratio: float = 0.2
    overlap_width_ratio: float = 0.2
    full_image_pass: bool = True
    merge_type: MergeType = "GREEDYNMM"
    merge_metric: MatchMetric = "IOS"
    merge_threshold: float = 0.5
    class_agnostic: bool = False
    window_batch_size: int | None = None  # None: Detector.window_batch()
    native_windows: bool = False  # windows at their own size, not the processor's

    def windows(self, height: int, width: int) -> torch.Tensor:
        """``[N, 4]`` windows (x1, y1, x2, y2) an image of this size is cut into."""
        return slice_windows(
            height,
            width,
            self.slice_height,
            self.slice_width,
            self.overlap_height_ratio,
            self.overlap_width_ratio,
        )

    @classmethod
    def from_settings(cls, settings: Settings, detector: Detector | None = None) -> SliceConfig:
        """The settings' slicing; a window side left ``auto`` is ``detector``'s window
        (``model_window``), or, without a detector, chosen per image (``auto_slice_size``)."""
        height, width = settings.slice_height, settings.slice_width
        if detector is not None and (height is None or width is None):
            side = model_window(*detector.input_shape())
            height, width = height or side, width or side
        return cls(
            slice_height=height,
            slice_width=width,
            overlap_height_ratio=settings.overlap_height_ratio,
            overlap_width_ratio=settings.overlap_width_ratio,
            full_image_pass=settings.full_image_pass,
            merge_type=settings.merge_type,
            merge_metric=settings.merge_metric,
            merge_threshold=settings.merge_threshold,
            class_agnostic=settings.merge_class_agnostic,
            window_batch_size=settings.window_batch_size,
            native_windows=settings.native_window_size,
        )


@dataclass
class Timings:
    """Seconds spent per stage for one image or task (also fed to Prometheus)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            metrics.STAGE_SECONDS.labels(stage=name).observe(elapsed)


def sliced_detect(
    detector: Detector,
    image: np.ndarray,
    slicing: SliceConfig,
    threshold: float,
    timings: Timings | None = None,
) -> Detections:
    """Detections over overlapping windows of ``image`` (HWC uint8), merged, in image pixels.

    All windows go through the model in batches of ``window_batch_size`` (they share one
    size, so a batch needs no padding); the whole image is run as well when
    ``full_image_pass`` is on and there is more than one window, so that large objects cut
    by every window are still found.
    """
    windows, whole = sliced_passes(detector, image, slicing, threshold, timings)
    return merge_passes([*windows, *whole], slicing, timings)


def merge_passes(
    parts: list[Detections], slicing: SliceConfig, timings: Timings | None = None
) -> Detections:
    with (timings or Timings()).stage("merge"):
        return merge_detections(
            Detections.cat(parts),
            slicing.merge_type,
            slicing.merge_metric,
            slicing.merge_threshold,
            slicing.class_agnostic,
        )


def sliced_passes(
    detector: Detector,
    image: np.ndarray,
    slicing: SliceConfig,
    threshold: float,
    timings: Timings | None = None,
) -> tuple[list[Detections], list[Detections]]:
    """``sliced_detect``'s detections before merging: the windows' (in image pixels) and
    the whole-image pass's (empty when there is none)."""
    timings = timings or Timings()
    height, width = image.shape[:2]
    with timings.stage("slice"):
        windows = slicing.windows(height, width).tolist()
        crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in windows]
    parts: list[Detections] = []
    step = slicing.window_batch_size or detector.window_batch()
    for start in range(0, len(crops), step):
        chunk, offsets = crops[start : start + step], windows[start : start + step]
        parts.extend(
            det.shifted(x1, y1)
            for det, (x1, y1, _, _) in zip(
                _detect(detector, chunk, threshold, timings, native=slicing.native_windows),
                offsets,
                strict=True,
            )
        )
    whole: list[Detections] = []
    if slicing.full_image_pass and len(windows) > 1:
        whole = _detect(detector, [image], threshold, timings)
    return parts, whole


def _detect(
    detector: Detector,
    images: Sequence[np.ndarray],
    threshold: float,
    timings: Timings,
    native: bool = False,
) -> list[Detections]:
    with timings.stage("preprocess"):
        inputs = detector.preprocess(images, native=native)
    with timings.stage("detector"):
        outputs = detector.forward(inputs)
    with timings.stage("postprocess"):
        return detector.postprocess(
            outputs, [(img.shape[0], img.shape[1]) for img in images], threshold
        )
