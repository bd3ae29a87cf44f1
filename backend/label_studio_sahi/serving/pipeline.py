"""The serving pipeline: tasks -> images -> sliced detection (``inference.sliced``) and
classes -> Label Studio results, with a score per task.

Each task also gets a score (what Label Studio sorts and filters tasks by), computed as
``scores.py`` says: by default 1 / (1 + the summed doubt of what was suggested for the
task), 0 for a task where nothing was found. Sorting tasks by prediction score ascending
puts the most uncertain tasks first, which is what an active-learning loop labels next; a
task whose image failed also scores 0, so it is looked at.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from PIL import Image

from label_studio_sahi import metrics
from label_studio_sahi.errors import BackendError, ImageTooLarge, ImageURLError
from label_studio_sahi.images.decode import EncodedImage, rgb_pixels
from label_studio_sahi.inference import scores
from label_studio_sahi.inference.sliced import SliceConfig, Timings, merge_passes, sliced_passes
from label_studio_sahi.inference.slicing import (
    Detections,
    shrink_factor,
)
from label_studio_sahi.labelstudio.label_config import (
    ControlTag,
    LabelConfig,
    choices_result,
    rectangle_result,
)
from label_studio_sahi.settings import Settings, TaskScore
from label_studio_sahi.versions.bundles import ModelBundle

log = logging.getLogger(__name__)


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
    it: said once per model, since labels then buy little (bench/LOG.md, "Geometry")."""
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
