"""The candidates a job makes from the live model: fine-tuned on the project's windows, and
its average with the parent (WiSE-FT) where the parent already finds the objects; the
better of the two on the held-out tasks goes to the gate.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.labelstudio.label_config import ControlTag
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.dataset import (
    LabelledTask,
    crop,
    jittered_window,
    training_windows,
)
from label_studio_sahi.training.evaluate import HeldOutScore, evaluate_detector
from label_studio_sahi.training.finetune import (
    CLASSIFIER_HEADS,
    DETECTOR_HEADS,
    DetectionSample,
    Progress,
    average_into,
    relabel_head,
    train_classifier,
    train_detector,
    training_steps,
)
from label_studio_sahi.training.gate import GATE_METRIC


@dataclass
class FineTuned:
    """A fine-tuned candidate, its loss curve, its training windows, and the weights it
    started from (the parent, relabelled to the project's labels)."""

    detector: Detector
    curve: list[float]
    windows: int
    start: dict[str, Any]

    def averaged(self, share: float) -> Detector:
        """A copy of the candidate with ``share`` of its start averaged back in (WiSE-FT)."""
        model = copy.deepcopy(self.detector.model)
        average_into(model, self.start, share)
        d = self.detector
        return Detector(model, d.processor, d.device, d.dtype, version="candidate-averaged")


def better_of(
    tuned: FineTuned,
    share: float,
    tag: ControlTag,
    held: list[LabelledTask],
    images: dict[int, Image.Image],
    slicing: SliceConfig,
) -> tuple[Detector, HeldOutScore, float]:
    """The fine-tuned candidate, or its average with the parent when ``share`` > 0 and that
    scores a higher held-out mAP@.5: with its held-out score and the share it took.

    Averaging keeps what a parent that already detects knew (a few labels pull the
    fine-tuned weights away from it: bench/LOG.md, "Geometry"), and keeps a weak parent's
    false boxes too: which of the two a project needs, its held-out tasks say. The pick is
    between two points of one training run; the gate then asks the same of it as of any
    candidate."""
    scored = evaluate_detector(tuned.detector, tag, held, images, slicing, own_labels=True)
    if share <= 0:
        return tuned.detector, scored, 0.0
    averaged = tuned.averaged(share)
    other = evaluate_detector(averaged, tag, held, images, slicing, own_labels=True)
    if other.metrics[GATE_METRIC] > scored.metrics[GATE_METRIC]:
        return averaged, other, share
    return tuned.detector, scored, 0.0


def finetune_detector(
    settings: Settings,
    live: Detector,
    tag: ControlTag,
    train: list[LabelledTask],
    images: dict[int, Image.Image],
    progress: Progress | None = None,
) -> FineTuned:
    """A copy of ``live`` relabelled to ``tag``'s labels, fine-tuned on the boxes of
    ``train`` (slicing-aided: windows of the slice size), with the weights it started from
    (``FineTuned.averaged`` blends them back in). No gate, nothing published:
    ``run_training`` does that."""
    labels = list(tag.labels)
    model = copy.deepcopy(live.model).float()
    relabel_head(model, DETECTOR_HEADS, labels, tag.label_for)
    parent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    boxes = [[(label, box) for label, box in t.boxes if label in labels] for t in train]
    # The windows it is served with (SLICE_*=auto: the detector's own window size).
    slicing = SliceConfig.from_settings(settings, live)
    windows = training_windows(
        [images[t.task_id].size for t in train],
        boxes,
        slice_height=slicing.slice_height,
        slice_width=slicing.slice_width,
        overlap_height_ratio=settings.overlap_height_ratio,
        overlap_width_ratio=settings.overlap_width_ratio,
        min_area_ratio=settings.min_area_ratio,
        negative_ratio=settings.negative_window_ratio,
        include_full_image=settings.train_full_image,
    )
    samples = [
        DetectionSample(
            crop(images[train[w.task_index].task_id], w.window),
            w.boxes,
            [labels.index(n) for n in w.labels],
        )
        for w in windows
    ]
    if not samples:
        raise ValueError("no training windows")
    # Windows drawn at random places need a fixed window size; automatic slicing has none.
    jitter = settings.train_augment and slicing.slice_height and slicing.slice_width

    def draw(rng: random.Random) -> DetectionSample:
        if not jitter or rng.random() < 0.5:
            return samples[rng.randrange(len(samples))]
        index = rng.randrange(len(train))
        image = images[train[index].task_id]
        window, kept, names_ = jittered_window(
            rng,
            image.size,
            boxes[index],
            slice_height=int(slicing.slice_height or 0),
            slice_width=int(slicing.slice_width or 0),
            min_area_ratio=settings.min_area_ratio,
        )
        return DetectionSample(crop(image, window), kept, [labels.index(n) for n in names_])

    steps = training_steps(len(samples), settings)
    curve = train_detector(model, live.processor, draw, settings, live.device, steps, progress)
    candidate = Detector(model, live.processor, live.device, live.dtype, version="candidate")
    return FineTuned(candidate, curve, len(samples), parent)


PARENT_CHECK_TASKS = 8  # training tasks the parent is scored on before averaging with it


def parent_share(
    settings: Settings,
    live: Detector,
    tag: ControlTag,
    train: list[LabelledTask],
    images: dict[int, Image.Image],
    slicing: SliceConfig,
) -> float:
    """``PARENT_WEIGHT_SHARE`` when the parent finds some of the training tasks' objects
    (mAP@.5 above 0 on at most ``PARENT_CHECK_TASKS`` of them, images it has never been
    trained on), else 0: a parent that finds nothing has nothing to keep, and its average
    with the candidate is not worth scoring."""
    if settings.parent_weight_share <= 0:
        return 0.0
    scored = evaluate_detector(
        live, tag, train[:PARENT_CHECK_TASKS], images, slicing, own_labels=False
    )
    return settings.parent_weight_share if scored.metrics[GATE_METRIC] > 0 else 0.0


def finetune_classifier(
    settings: Settings,
    live: Classifier,
    tag: ControlTag,
    train: list[LabelledTask],
    images: dict[int, Image.Image],
    progress: Progress | None = None,
) -> tuple[Classifier, list[float]]:
    """A copy of ``live`` relabelled to ``tag``'s choices and fine-tuned on ``train``'s first
    choice per image; its loss curve."""
    labels = list(tag.labels)
    model = copy.deepcopy(live.model).float()
    relabel_head(model, CLASSIFIER_HEADS, labels, tag.label_for)
    chosen = [
        (images[t.task_id], labels.index(t.choices[0]))
        for t in train
        if t.choices and t.choices[0] in labels
    ]
    curve = train_classifier(
        model, live.processor, [i for i, _ in chosen], [c for _, c in chosen], settings, live.device,
        steps=training_steps(len(chosen), settings), progress=progress,
    )  # fmt: skip
    return Classifier(model, live.processor, live.device, live.dtype, version="candidate"), curve
