"""The prediction pipeline: task -> image -> windows -> detector -> merge -> Label Studio results.

Each task also gets a score (what Label Studio sorts and filters tasks by), computed as
``scores.py`` says: by default 1 / (1 + the summed doubt of what was suggested for the
task), 0 for a task where nothing was found. Sorting tasks by prediction score ascending
puts the most uncertain tasks first, which is what an active-learning loop labels next; a
task whose image failed also scores 0, so it is looked at.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from label_studio_sahi import metrics
from label_studio_sahi.errors import BackendError, ImageTooLarge, ImageURLError
from label_studio_sahi.images.fetch import EncodedImage, rgb_pixels
from label_studio_sahi.inference import scores
from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.slicing import (
    Detections,
    merge_detections,
    model_window,
    shrink_factor,
    slice_windows,
)
from label_studio_sahi.labelstudio.label_config import (
    ControlTag,
    LabelConfig,
    choices_result,
    rectangle_result,
)
from label_studio_sahi.settings import MatchMetric, MergeType, Settings, TaskScore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBundle:
    """The models serving one project, and the version Label Studio sees for them."""

    detector: Detector | None
    classifier: Classifier | None
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            parts = [m.version for m in (self.detector, self.classifier) if m is not None]
            object.__setattr__(self, "version", "+".join(parts) or "no-model")


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


@dataclass
class TaskPrediction:
    """One entry of ``/predict``'s ``results``; ``error`` is set when the task failed."""

    result: list[dict[str, Any]]
    score: float
    model_version: str
    error: BackendError | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "result": self.result,
            "score": self.score,
            "model_version": self.model_version,
        }
        if self.error is not None:
            body["error"] = {"error": self.error.code, "detail": self.error.message}
        return body


@dataclass
class ScoreInputs:
    """What a task's score is computed from (scores.py): each suggested item's score and
    margin, and each image's agreement between its whole-image and sliced passes."""

    scores: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    agreements: list[float] = field(default_factory=list)

    def score(self, method: TaskScore) -> float:
        agreement = min(self.agreements) if self.agreements else None
        return scores.task_score(method, self.scores, self.margins, agreement)


# A task's image by URL: decoded (PIL), as its pixels (ImageLoader.load_pixels), or its
# bytes with the size from its header, not yet decoded (ImageLoader.load_encoded): only
# this last kind lets RequestImages refuse an image over budget before decoding it.
LoadedImage = Image.Image | np.ndarray | EncodedImage
ImageLoaderFn = Callable[[str, int | None], LoadedImage]


def as_pixels(image: LoadedImage) -> np.ndarray:
    """The RGB pixels (HWC uint8) of what an ImageLoaderFn returned, decoding if need be."""
    if isinstance(image, EncodedImage):
        return image.pixels()
    return image if isinstance(image, np.ndarray) else rgb_pixels(image)


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pixels: np.ndarray | None = None
    error: BackendError | None = None


class RequestImages:
    """The images of one request: a URL repeated across tasks is fetched once, and all of
    them together stay within MAX_REQUEST_PIXELS (a batch of huge images is refused image by
    image once the budget is spent, instead of filling memory)."""

    def __init__(self, load: ImageLoaderFn, max_pixels: int) -> None:
        # Pixels, not PIL images, are kept: the decoded image is let go as soon as it is
        # converted, so a large image is held once, not twice.
        self._load = load
        self._max_pixels = max_pixels
        self._pixels = 0
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def __call__(self, url: str, task_id: int | None) -> np.ndarray:
        with self._lock:
            slot = self._slots.setdefault(url, _Slot())
        with slot.lock:  # the first task with this URL fetches; the others wait for it
            if slot.pixels is None and slot.error is None:
                try:
                    slot.pixels = self._decoded(self._load(url, task_id))
                except BackendError as exc:
                    slot.error = exc
            if slot.error is not None:
                raise slot.error
            assert slot.pixels is not None
            return slot.pixels

    def _decoded(self, image: LoadedImage) -> np.ndarray:
        if not isinstance(image, EncodedImage):  # the loader decoded it already
            pixels = as_pixels(image)
            self._charge(pixels.shape[0] * pixels.shape[1])
            return pixels
        # Charged from the header, before a pixel is decoded: an image over budget costs
        # its download only. One that then fails to decode gives its share back.
        self._charge(image.pixel_count)
        try:
            return image.pixels()
        except BackendError:
            with self._lock:
                self._pixels -= image.pixel_count
            raise

    def _charge(self, pixels: int) -> None:
        with self._lock:
            if self._pixels + pixels > self._max_pixels:
                raise ImageTooLarge(
                    f"this request's images pass MAX_REQUEST_PIXELS ({self._max_pixels:,} "
                    "pixels in all); send fewer tasks per request"
                )
            self._pixels += pixels


def _warn_if_shrunk(slicing: SliceConfig, bundle: ModelBundle) -> None:
    """A set window larger than the detector's input is shrunk into it, and its objects with
    it: said once per model, since labels then buy little (bench/README.md, "Geometry")."""
    if bundle.detector is None or slicing.native_windows:
        return
    if slicing.slice_height is None or slicing.slice_width is None:
        return
    side = min(bundle.detector.input_shape())
    shrink = shrink_factor(min(slicing.slice_height, slicing.slice_width), side)
    if shrink > 1:
        log.warning(
            "slice_window_shrunk model=%s window=%dx%d input=%d shrink=%.1fx: objects are "
            "shrunk with the window and fine-tuning gains little; SLICE_WIDTH=SLICE_HEIGHT=auto "
            "uses windows of the input size",
            bundle.version, slicing.slice_width, slicing.slice_height, side, shrink,
        )  # fmt: skip


class Predictor:
    """Predicts Label Studio tasks with one model bundle; safe to share across threads."""

    def __init__(
        self,
        bundle: ModelBundle,
        settings: Settings,
        load_image: ImageLoaderFn,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.slicing = SliceConfig.from_settings(settings, bundle.detector)
        _warn_if_shrunk(self.slicing, bundle)
        self.load_image = load_image
        # Tasks of a batch run concurrently (downloads overlap model work). The pool may be
        # shared by several predictors, so that swapping models never touches it.
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(
            settings.image_fetch_concurrency, thread_name_prefix="task"
        )

    def close(self) -> None:
        if self._own_pool:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def predict_tasks(
        self, tasks: Sequence[dict[str, Any]], config: LabelConfig
    ) -> list[TaskPrediction]:
        """One prediction per task, in order; a failing task gets an empty result and its error."""
        images = RequestImages(self.load_image, self.settings.max_request_pixels)
        return list(self._pool.map(lambda task: self.predict_task(task, config, images), tasks))

    def predict_task(
        self,
        task: dict[str, Any],
        config: LabelConfig,
        load_image: ImageLoaderFn | None = None,
    ) -> TaskPrediction:
        timings = Timings()
        load_image = load_image or self.load_image
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        try:
            data = task.get("data")
            if not isinstance(data, dict):
                raise ImageURLError("task has no 'data' object")
            result: list[dict[str, Any]] = []
            inputs = ScoreInputs()
            for key in config.image_keys:
                url = data.get(key)
                if not isinstance(url, str) or not url:
                    raise ImageURLError(f"task data has no image URL under '{key}'")
                with timings.stage("fetch"):  # decoding included
                    image = as_pixels(load_image(url, task_id))
                result.extend(self.predict_image(image, config, key, timings, inputs))
        except BackendError as exc:
            metrics.TASK_ERRORS.labels(error=exc.code).inc()
            log.warning("task_failed task=%s error=%s detail=%s", task_id, exc.code, exc.message)
            return TaskPrediction([], 0.0, self.bundle.version, exc, timings.seconds)
        return TaskPrediction(
            result,
            inputs.score(self.score_method(config)),
            self.bundle.version,
            None,
            timings.seconds,
        )

    def score_method(self, config: LabelConfig) -> TaskScore:
        """The project's task score: its labeling config's task_score, else TASK_SCORE."""
        return cast(TaskScore, config.task_score or self.settings.task_score)

    def predict_image(
        self,
        image: LoadedImage,
        config: LabelConfig,
        image_key: str | None = None,
        timings: Timings | None = None,
        inputs: ScoreInputs | None = None,
    ) -> list[dict[str, Any]]:
        """Label Studio result items for the controls of ``config`` that point at ``image_key``
        (``image``: a PIL image, or its RGB pixels as ``rgb_pixels`` gives them)."""
        timings = timings or Timings()
        inputs = inputs if inputs is not None else ScoreInputs()
        pixels = as_pixels(image)
        height, width = pixels.shape[:2]
        rect_tags = [t for t in config.rectangles if image_key in (None, t.image_key)]
        choice_tags = [t for t in config.choices if image_key in (None, t.image_key)]
        result: list[dict[str, Any]] = []
        if rect_tags and self.bundle.detector is not None:
            threshold = min(
                [self.settings.score_threshold]
                + [t.score_threshold for t in rect_tags if t.score_threshold is not None]
            )
            windows, whole = sliced_passes(
                self.bundle.detector, pixels, self.slicing, threshold, timings
            )
            dets = merge_passes([*windows, *whole], self.slicing, timings)
            if whole and self.score_method(config) == "disagreement":
                sliced = merge_passes(windows, self.slicing)
                inputs.agreements.append(
                    scores.agreement(
                        sliced.select(sliced.scores >= self.settings.score_threshold),
                        whole[0].select(whole[0].scores >= self.settings.score_threshold),
                    )
                )
            result.extend(self._boxes(dets, rect_tags, width, height, inputs))
        if choice_tags and self.bundle.classifier is not None:
            with timings.stage("classifier"):
                ranked = self.bundle.classifier.classify(
                    [pixels], top_k=len(self.bundle.classifier.id2label)
                )[0]
            result.extend(self._choices(ranked, choice_tags, inputs))
        return result

    def _boxes(
        self,
        dets: Detections,
        tags: list[ControlTag],
        width: int,
        height: int,
        inputs: ScoreInputs,
    ) -> list[dict[str, Any]]:
        assert self.bundle.detector is not None
        names = self.bundle.detector.id2label
        out = []
        for tag in tags:
            threshold = tag.threshold(self.settings.score_threshold)
            margins = dets.margins.tolist() if dets.margins is not None else dets.scores.tolist()
            for box, score, label_id, margin in zip(
                dets.boxes.tolist(),
                dets.scores.tolist(),
                dets.labels.tolist(),
                margins,
                strict=True,
            ):
                label = tag.label_for(names.get(int(label_id), str(label_id)))
                if label is None or score < threshold or box[2] <= box[0] or box[3] <= box[1]:
                    continue
                inputs.scores.append(score)
                inputs.margins.append(margin)
                out.append(
                    rectangle_result(
                        tag, (box[0], box[1], box[2], box[3]), label, score, width, height
                    )
                )
        return out

    def _choices(
        self, ranked: list[tuple[str, float]], tags: list[ControlTag], inputs: ScoreInputs
    ) -> list[dict[str, Any]]:
        out = []
        for tag in tags:
            threshold = tag.threshold(self.settings.classifier_threshold)
            picked: list[tuple[str, float]] = []
            for name, prob in ranked:
                label = tag.label_for(name)
                if label is None or prob < threshold or label in [p[0] for p in picked]:
                    continue
                picked.append((label, prob))
                if len(picked) >= (self.settings.classifier_top_k if tag.multiple else 1):
                    break
            if picked:
                out.append(choices_result(tag, [p[0] for p in picked], min(p[1] for p in picked)))
                inputs.scores.append(min(p[1] for p in picked))
                # The classifier's own margin: its best class over its second best.
                inputs.margins.append(
                    ranked[0][1] - ranked[1][1] if len(ranked) > 1 else ranked[0][1]
                )
        return out
