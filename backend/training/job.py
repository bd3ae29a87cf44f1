"""The rq job: labels from Label Studio -> sliced fine-tuning -> held-out mAP -> maybe promote.

``train_project`` runs in an rq work horse (``ls-sahi worker``). Label Studio is the source
of truth: the job pulls the project's annotations itself, so a missed webhook never loses a
label. The job is idempotent: rq may run it twice (a retry after a worker died), and a run
whose version was already published returns that version. Progress (stage, step, loss, ETA)
is in the job's ``meta``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rq import get_current_job

from backend.classifier import Classifier
from backend.detector import Detector
from backend.images import ImageLoader
from backend.labeling import ControlTag, parse_label_config
from backend.predict import SliceConfig, sliced_detect
from backend.redis_server import connect, ensure_redis
from backend.registry import Registry, model_version
from backend.service import project_bundle
from backend.settings import Settings, get_settings
from backend.slicing import Detections
from backend.studio import StudioClient
from backend.training.dataset import (
    LabelledTask,
    crop,
    labelled_tasks,
    split_holdout,
    training_windows,
)
from backend.training.evaluate import classification_accuracy, detection_metrics
from backend.training.finetune import (
    DetectionSample,
    Progress,
    relabel_head,
    train_classifier,
    train_detector,
)

log = logging.getLogger(__name__)

EVAL_SCORE_THRESHOLD = 0.05  # mAP needs the low-score tail of the precision-recall curve
PROGRESS_EVERY = 2.0  # seconds between progress writes to Redis


@dataclass
class JobContext:
    """What a run needs besides its arguments; tests build one, rq runs build it from env."""

    settings: Settings
    registry: Registry
    job: Any = None  # the rq job, when running under rq
    _last_progress: float = 0.0

    def step_reporter(self, stage: str) -> Progress:
        """A training-loop callback that writes step, loss and ETA under ``stage``."""

        def report(step: int, steps: int, loss: float, eta: float) -> None:
            self.progress(
                stage, step=step, steps=steps, loss=round(loss, 4), eta_seconds=round(eta, 1)
            )

        return report

    def progress(self, stage: str, force: bool = False, **values: Any) -> None:
        if self.job is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        self.job.meta.update({"stage": stage, **values})
        self.job.save_meta()


def train_project(project: str, reason: str = "", run_id: str = "") -> dict[str, Any]:
    """rq entry point (``backend.training.job.train_project``)."""
    settings = get_settings()
    job = get_current_job()
    if job is not None:
        client = job.connection
    else:
        url, _ = ensure_redis(settings.redis_url, settings.model_dir)
        client = connect(url)
    context = JobContext(settings, Registry(settings.model_dir / "projects", client), job)
    return run_training(context, str(project), reason, run_id or (job.id if job else "manual"))


def run_training(ctx: JobContext, project: str, reason: str, run_id: str) -> dict[str, Any]:
    settings, registry = ctx.settings, ctx.registry
    registry.clean_temporary(project)
    done = next((v for v in registry.versions(project) if v.meta.get("run_id") == run_id), None)
    if done is not None:
        log.info("train_already_done project=%s run=%s version=%s", project, run_id, done.name)
        return _summary(done.meta, done.name, project)

    ctx.progress("fetching labels", force=True)
    with StudioClient(settings) as studio:
        config = parse_label_config(studio.project(project)["label_config"])
        export = studio.export(project)
    tasks = labelled_tasks(export, config)
    train, held = split_holdout(tasks, settings.holdout_fraction)
    stats = {"labelled_tasks": len(tasks), "train_tasks": len(train), "heldout_tasks": len(held)}
    if not held or not train:
        ctx.progress("skipped", force=True)
        return {
            "status": "skipped",
            "project": project,
            "detail": "need at least 2 labelled tasks (one is held out)",
            **stats,
        }

    ctx.progress("loading images", force=True)
    with ImageLoader(settings) as loader:
        images = {t.task_id: loader.load(t.image_url, t.task_id) for t in [*train, *held]}

    live_name = registry.live(project)
    parent = project_bundle(settings, registry, project)
    slicing = SliceConfig.from_settings(settings)
    curves: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    candidate_detector: Detector | None = None
    candidate_classifier: Classifier | None = None

    rect = config.rectangles[0] if config.rectangles else None
    if rect is not None and parent.detector is not None and any(t.boxes for t in train):
        candidate_detector, curves["detector"], stats["windows"] = _finetune_detector(
            ctx, parent.detector, rect, train, images
        )
        ctx.progress("evaluating", force=True)
        metrics["candidate"] = _evaluate_detector(
            candidate_detector, rect, held, images, slicing, own_labels=True
        )
        metrics["live"] = _evaluate_detector(
            parent.detector, rect, held, images, slicing, own_labels=False
        )

    choice = config.choices[0] if config.choices else None
    if choice is not None and parent.classifier is not None and any(t.choices for t in train):
        candidate_classifier, curves["classifier"] = _finetune_classifier(
            ctx, parent.classifier, choice, train, images
        )
        metrics["candidate_accuracy"] = _accuracy(
            candidate_classifier, choice, held, images, own_labels=True
        )
        metrics["live_accuracy"] = _accuracy(
            parent.classifier, choice, held, images, own_labels=False
        )

    if candidate_detector is None and candidate_classifier is None:
        return {
            "status": "skipped",
            "project": project,
            "detail": "no boxes or choices to train on",
            **stats,
        }

    better_boxes = (
        candidate_detector is not None and metrics["candidate"]["map"] > metrics["live"]["map"]
    )
    better_classes = (
        candidate_classifier is not None
        and metrics["candidate_accuracy"] > metrics["live_accuracy"]
    )
    accepted = better_boxes if candidate_detector is not None else better_classes
    meta = {
        "status": "accepted" if accepted else "rejected",
        "project": project,
        "parent": model_version(project, live_name) if live_name else parent.version,
        "run_id": run_id,
        "reason": reason,
        "metrics": metrics,
        "labels": list(rect.labels) if rect else [],
        "choices": list(choice.labels) if choice else [],
        "dataset": stats,
        "curves": curves,
        "settings": {
            k: getattr(settings, k)
            for k in (
                "train_steps",
                "train_batch_size",
                "learning_rate",
                "backbone_learning_rate",
                "slice_height",
                "slice_width",
            )
        },
    }
    detector_to_save = candidate_detector or parent.detector
    classifier_to_save = (
        candidate_classifier if better_classes or candidate_detector is None else None
    )

    def write(folder: Path) -> None:
        if detector_to_save is not None:
            detector_to_save.model.save_pretrained(folder / "detector")
            detector_to_save.processor.save_pretrained(folder / "detector")
        if classifier_to_save is not None:
            classifier_to_save.model.save_pretrained(folder / "classifier")
            classifier_to_save.processor.save_pretrained(folder / "classifier")
        _plot_curves(curves, folder / "curves.png")

    version = registry.publish(project, write, meta)
    if accepted:
        registry.set_live(project, version.name)
    registry.prune(project, settings.keep_versions)
    ctx.progress("done", force=True, version=version.name)
    return _summary(meta, version.name, project)


def _summary(meta: dict[str, Any], name: str, project: str) -> dict[str, Any]:
    return {
        "status": meta.get("status"),
        "project": project,
        "version": name,
        "model_version": model_version(project, name),
        "metrics": meta.get("metrics"),
        "dataset": meta.get("dataset"),
    }


def _finetune_detector(
    ctx: JobContext,
    live: Detector,
    tag: ControlTag,
    train: list[LabelledTask],
    images: dict[int, Image.Image],
) -> tuple[Detector, list[float], int]:
    settings = ctx.settings
    labels = list(tag.labels)
    model = copy.deepcopy(live.model).float()
    relabel_head(model, "class_labels_classifier", labels, tag.label_for)
    windows = training_windows(
        [images[t.task_id].size for t in train],
        [[(label, box) for label, box in t.boxes if label in labels] for t in train],
        slice_height=settings.slice_height,
        slice_width=settings.slice_width,
        overlap_height_ratio=settings.overlap_height_ratio,
        overlap_width_ratio=settings.overlap_width_ratio,
        min_area_ratio=settings.min_area_ratio,
        negative_ratio=settings.negative_window_ratio,
    )
    samples = [
        DetectionSample(
            crop(images[train[w.task_index].task_id], w.window),
            w.boxes,
            [labels.index(n) for n in w.labels],
        )
        for w in windows
    ]

    progress = ctx.step_reporter("training detector")
    curve = train_detector(model, live.processor, samples, settings, live.device, progress)
    candidate = Detector(model, live.processor, live.device, live.dtype, version="candidate")
    return candidate, curve, len(samples)


def _evaluate_detector(
    detector: Detector,
    tag: ControlTag,
    held: list[LabelledTask],
    images: dict[int, Image.Image],
    slicing: SliceConfig,
    own_labels: bool,
) -> dict[str, Any]:
    """Sliced mAP on held-out tasks; a live model's classes are mapped to labels as in serving."""
    labels = list(tag.labels)
    names = detector.id2label
    predictions, truths, sizes = [], [], []
    for task in held:
        image = images[task.task_id]
        found = sliced_detect(
            detector, np.array(image.convert("RGB")), slicing, EVAL_SCORE_THRESHOLD
        )
        mapped = [
            (i, labels.index(label))
            for i, label in enumerate(
                names[int(c)] if own_labels else tag.label_for(names[int(c)])
                for c in found.labels.tolist()
            )
            if label in labels
        ]
        keep = [i for i, _ in mapped]
        predictions.append(
            Detections(
                found.boxes[keep],
                found.scores[keep],
                found.labels.new_tensor([c for _, c in mapped]),
            )
        )
        truth = [(box, labels.index(label)) for label, box in task.boxes if label in labels]
        truths.append(([b for b, _ in truth], [c for _, c in truth]))
        sizes.append(image.size)
    return detection_metrics(predictions, truths, len(labels), image_sizes=sizes)


def _finetune_classifier(
    ctx: JobContext,
    live: Classifier,
    tag: ControlTag,
    train: list[LabelledTask],
    images: dict[int, Image.Image],
) -> tuple[Classifier, list[float]]:
    labels = list(tag.labels)
    model = copy.deepcopy(live.model).float()
    relabel_head(model, "classifier", labels, tag.label_for)
    chosen = [
        (images[t.task_id], labels.index(t.choices[0]))
        for t in train
        if t.choices and t.choices[0] in labels
    ]

    progress = ctx.step_reporter("training classifier")
    curve = train_classifier(
        model, live.processor, [i for i, _ in chosen], [c for _, c in chosen], ctx.settings, live.device,
        steps=max(1, ctx.settings.train_steps // 2), progress=progress,
    )  # fmt: skip
    return Classifier(model, live.processor, live.device, live.dtype, version="candidate"), curve


def _accuracy(
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


def _plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display in workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
