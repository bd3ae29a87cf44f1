"""What a fine-tuning job trains and evaluates on, from a Label Studio export.

Three steps, all without decoding an image:

1. ``labelled_tasks`` picks one annotation per task (ground truth first, else the most
   recent, never a cancelled one) and keeps the boxes and choices the labeling config
   knows about.
2. ``split_holdout`` puts each task on the train or the held-out side by a hash of its
   id, so a task keeps its side as the project grows and scores stay comparable.
3. ``training_windows`` cuts each image into the same overlapping windows the detector
   sees at prediction time (plus the whole image), with each box clipped to the window
   and given in window coordinates; windows without boxes are sampled as negatives.

``crop`` then cuts a window out of a decoded image.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from PIL import Image

from label_studio_sahi.inference.slicing import slice_windows
from label_studio_sahi.labelstudio.label_config import (
    LabelConfig,
    annotation_boxes,
    annotation_choices,
)

__all__ = [
    "LabelledTask",
    "TrainingWindow",
    "crop",
    "holdout_hash",
    "jittered_window",
    "labelled_tasks",
    "split_holdout",
    "training_windows",
]

Box = tuple[float, float, float, float]
Window = tuple[int, int, int, int]

_OLDEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LabelledTask:
    """One labelled task: its image, boxes (label, x1, y1, x2, y2 in original pixels) and
    image-level choices, with the annotation they come from."""

    task_id: int
    image_url: str
    boxes: tuple[tuple[str, Box], ...]
    choices: tuple[str, ...]
    annotation_id: int | None
    updated_at: str | None


@dataclass(frozen=True)
class TrainingWindow:
    """A window ``(x1, y1, x2, y2)`` of image ``task_index`` with its boxes in window pixels."""

    task_index: int
    window: Window
    boxes: tuple[Box, ...]
    labels: tuple[str, ...]


# --------------------------------------------------------------------------- export


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _timestamp(value: object) -> datetime:
    """An ``updated_at`` as an aware datetime; missing or unreadable ones sort oldest."""
    if not isinstance(value, str):
        return _OLDEST
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return _OLDEST
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _choose_annotation(annotations: object) -> Mapping[str, Any] | None:
    """Not cancelled; ground truth first, then the latest ``updated_at``, then the higher id."""
    if not isinstance(annotations, list):
        return None
    best: Mapping[str, Any] | None = None
    best_key: tuple[bool, datetime, int, int] | None = None
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping) or annotation.get("was_cancelled"):
            continue
        annotation_id = _as_int(annotation.get("id"))
        key = (
            bool(annotation.get("ground_truth")),
            _timestamp(annotation.get("updated_at")),
            annotation_id if annotation_id is not None else -1,
            position,
        )
        if best_key is None or key > best_key:
            best, best_key = annotation, key
    return best


def labelled_tasks(export: list[dict[str, Any]], config: LabelConfig) -> list[LabelledTask]:
    """The tasks of an export (Label Studio's JSON export) that can be trained on.

    Per task one annotation is used: cancelled ones ("skipped") never; a ``ground_truth``
    one before any other; otherwise the most recent by ``updated_at`` (ties: the higher
    annotation id). From it, the rectangles of the config's ``<RectangleLabels>`` tags whose
    label is one of that tag's labels, and the choices of its ``<Choices>`` tags that are
    among that tag's choices. The image is ``task["data"][key]`` for the image key of the
    first ``<RectangleLabels>`` tag (the first ``<Choices>`` tag when there is none); only
    boxes of tags on that same image are used.

    Dropped: tasks without an integer id, without a string image URL, without a usable
    annotation, or whose chosen annotation has neither a box nor a choice left (an empty
    annotation is not used as an "image without objects").

    Returns:
        The tasks sorted by task id.
    """
    primary = config.rectangles[0] if config.rectangles else None
    if primary is None and config.choices:
        primary = config.choices[0]
    if primary is None:
        return []
    image_key = primary.image_key
    box_tags = [tag for tag in config.rectangles if tag.image_key == image_key]

    tasks: list[LabelledTask] = []
    for task in export:
        if not isinstance(task, Mapping):
            continue
        task_id = _as_int(task.get("id"))
        data = task.get("data")
        if task_id is None or not isinstance(data, Mapping):
            continue
        url = data.get(image_key)
        if not isinstance(url, str) or not url.strip():
            continue
        annotation = _choose_annotation(task.get("annotations"))
        if annotation is None:
            continue
        result = annotation.get("result")
        if not isinstance(result, list):
            continue

        boxes: list[tuple[str, Box]] = []
        for tag in box_tags:
            allowed = set(tag.labels)
            for label, (x1, y1, x2, y2) in annotation_boxes(result, tag.name):
                if label in allowed and x2 > x1 and y2 > y1:
                    boxes.append((label, (x1, y1, x2, y2)))
        choices: list[str] = []
        for tag in config.choices:
            allowed = set(tag.labels)
            choices.extend(
                c for c in annotation_choices(result, tag.name) if c in allowed and c not in choices
            )
        if not boxes and not choices:
            continue

        updated_at = annotation.get("updated_at")
        tasks.append(
            LabelledTask(
                task_id=task_id,
                image_url=url,
                boxes=tuple(boxes),
                choices=tuple(choices),
                annotation_id=_as_int(annotation.get("id")),
                updated_at=updated_at if isinstance(updated_at, str) else None,
            )
        )
    tasks.sort(key=lambda t: t.task_id)
    return tasks


# --------------------------------------------------------------------------- split


class _HasTaskId(Protocol):
    @property
    def task_id(self) -> int: ...


T = TypeVar("T", bound=_HasTaskId)


def holdout_hash(task_id: int) -> float:
    """A task's place in ``[0, 1)``: the first 8 bytes of sha1 of its decimal id."""
    digest = hashlib.sha1(str(int(task_id)).encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_holdout(tasks: Sequence[T], fraction: float) -> tuple[list[T], list[T]]:
    """``(train, held_out)``: a task is held out when ``holdout_hash(id) < fraction``.

    The side depends on the task id alone, so adding tasks never moves an existing one
    (and a model version is always scored on tasks it did not train on), except in the
    two small-project corrections below, which keep both sides non-empty:

    * with 2 or more tasks and none held out, the task with the smallest hash is held out;
    * with 2 or more tasks and all held out, the task with the largest hash trains.

    A single task always trains (nothing is held out: the caller skips evaluation).
    Both lists keep the input order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1], got {fraction}")
    hashes = [holdout_hash(t.task_id) for t in tasks]
    held = [h < fraction for h in hashes]
    if len(tasks) >= 2:
        if not any(held):
            held[min(range(len(tasks)), key=hashes.__getitem__)] = True
        elif all(held):
            held[max(range(len(tasks)), key=hashes.__getitem__)] = False
    elif tasks:
        held = [False]
    train = [t for t, h in zip(tasks, held, strict=True) if not h]
    held_out = [t for t, h in zip(tasks, held, strict=True) if h]
    return train, held_out


# --------------------------------------------------------------------------- windows


def _clip(box: Box, window: Window, min_area_ratio: float) -> Box | None:
    """The part of ``box`` inside ``window``, in window coordinates, or ``None`` to drop it."""
    x1, y1, x2, y2 = box
    wx1, wy1, wx2, wy2 = window
    area = (x2 - x1) * (y2 - y1)
    if not area > 0:
        return None
    cx1, cy1 = max(x1, wx1), max(y1, wy1)
    cx2, cy2 = min(x2, wx2), min(y2, wy2)
    if cx2 <= cx1 or cy2 <= cy1:  # outside, or only touching the edge
        return None
    if (cx2 - cx1) * (cy2 - cy1) / area < min_area_ratio:
        return None
    return (
        float(cx1 - wx1),
        float(cy1 - wy1),
        float(cx2 - wx1),
        float(cy2 - wy1),
    )


def training_windows(
    image_sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[tuple[str, Sequence[float]]]],
    *,
    slice_height: int | None,
    slice_width: int | None,
    overlap_height_ratio: float,
    overlap_width_ratio: float,
    min_area_ratio: float,
    negative_ratio: float,
    include_full_image: bool = True,
    seed: int = 0,
) -> list[TrainingWindow]:
    """The windows a detector is fine-tuned on, with their boxes.

    Per image (``image_sizes[i]`` is ``(width, height)``, ``boxes[i]`` its
    ``(label, (x1, y1, x2, y2))`` in image pixels): the windows of ``slice_windows`` with
    the same size and overlap as at prediction time (``None`` sizes: automatic, as there),
    then the whole image when ``include_full_image`` and the image has more than one
    window (the model also sees objects whole, at the scale of the full-image pass).

    A box is clipped to each window it overlaps with a positive area and kept there when
    ``clipped area / box area >= min_area_ratio``; kept boxes are in window coordinates.
    This is sahi's rule for sliced COCO datasets (``sahi.slicing.slice_coco`` →
    ``process_coco_annotations``: ``annotation_inside_slice`` requires a strict overlap,
    then the intersection's area over the annotation's area must reach
    ``min_area_ratio``, default 0.1), with one difference: sahi truncates both areas to
    whole pixels (``ShapelyAnnotation.area`` is an ``int``), here they are exact, so the
    two agree for boxes with integer corners and may differ by a rounding at the threshold
    otherwise (and a box under 1 px², a division by zero in sahi, is just tiny here).
    Boxes of zero area are dropped.

    Windows with at least one kept box are always returned. A window without one is a
    negative, kept when ``rng.random() < negative_ratio`` with ``rng = random.Random(seed)``
    drawn once per negative in order: deterministic, 0 keeps none, 1 keeps all (sahi's
    ``ignore_negative_samples`` is 0 or 1), and a higher ratio keeps a superset.

    Raises:
        ValueError: when the two lists differ in length, or on sizes or ratios that
            ``slice_windows`` refuses.
    """
    if len(image_sizes) != len(boxes):
        raise ValueError(f"{len(image_sizes)} image sizes but {len(boxes)} box lists")
    rng = random.Random(seed)
    out: list[TrainingWindow] = []
    for index, ((width, height), image_boxes) in enumerate(zip(image_sizes, boxes, strict=True)):
        windows: list[Window] = [
            (int(a), int(b), int(c), int(d))
            for a, b, c, d in slice_windows(
                int(height),
                int(width),
                slice_height,
                slice_width,
                overlap_height_ratio,
                overlap_width_ratio,
            ).tolist()
        ]
        if include_full_image and len(windows) > 1:
            windows.append((0, 0, int(width), int(height)))
        parsed = [
            (str(label), (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
            for label, b in image_boxes
        ]
        for window in windows:
            kept_boxes, kept_labels = _clip_all(parsed, window, min_area_ratio)
            if not kept_boxes and not rng.random() < negative_ratio:
                continue
            out.append(TrainingWindow(index, window, kept_boxes, kept_labels))
    return out


def jittered_window(
    rng: random.Random,
    image_size: tuple[int, int],
    boxes: Sequence[tuple[str, Sequence[float]]],
    *,
    slice_height: int,
    slice_width: int,
    min_area_ratio: float,
) -> tuple[Window, tuple[Box, ...], tuple[str, ...]]:
    """A window of the slice size at a random place around a random object (anywhere when
    the image has none), with its boxes clipped as in ``training_windows``.

    The grid of ``training_windows`` shows each object at one or two fixed offsets; drawn
    windows show it anywhere in the window, and its neighbours at other cuts, which is what
    a small label set needs most (the augmentation sahi's slicing-aided fine-tuning relies on).
    """
    width, height = image_size
    sw, sh = min(slice_width, width), min(slice_height, height)
    if boxes:
        _, (x1, y1, x2, y2) = boxes[rng.randrange(len(boxes))]
        # Any offset that keeps the object's centre inside the window.
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left = rng.uniform(max(0.0, cx - sw), min(cx, width - sw))
        top = rng.uniform(max(0.0, cy - sh), min(cy, height - sh))
    else:
        left, top = rng.uniform(0, width - sw), rng.uniform(0, height - sh)
    window: Window = (int(left), int(top), int(left) + sw, int(top) + sh)
    parsed = [
        (str(label), (float(b[0]), float(b[1]), float(b[2]), float(b[3]))) for label, b in boxes
    ]
    return (window, *_clip_all(parsed, window, min_area_ratio))


def _clip_all(
    boxes: Sequence[tuple[str, Box]], window: Window, min_area_ratio: float
) -> tuple[tuple[Box, ...], tuple[str, ...]]:
    """The boxes ``_clip`` keeps in ``window`` (window coordinates), and their labels."""
    kept = [(clipped, label) for label, box in boxes
            if (clipped := _clip(box, window, min_area_ratio)) is not None]  # fmt: skip
    return tuple(b for b, _ in kept), tuple(label for _, label in kept)


def crop(image: Image.Image, window: Sequence[int]) -> Image.Image:
    """The pixels of ``window`` ``(x1, y1, x2, y2)`` as a new image."""
    x1, y1, x2, y2 = (int(v) for v in window)
    if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
        raise ValueError(f"window {window} is not inside the {image.width}x{image.height} image")
    return image.crop((x1, y1, x2, y2))
