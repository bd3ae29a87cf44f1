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
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rq import get_current_job

from label_studio_sahi import names
from label_studio_sahi.errors import ImageError
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.inference.checkpoints import checkpoint_revision
from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.onnx_engine import write_onnx
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.jobs.queueing import ProgressWriter, job_redis
from label_studio_sahi.labelstudio.client import StudioClient
from label_studio_sahi.labelstudio.label_config import ControlTag, LabelConfig, parse_label_config
from label_studio_sahi.names import model_version
from label_studio_sahi.settings import VERSION_SETTINGS, Settings, get_settings
from label_studio_sahi.training.dataset import (
    LabelledTask,
    crop,
    jittered_window,
    labelled_tasks,
    split_holdout,
    training_windows,
)
from label_studio_sahi.training.evaluate import (
    bootstrap_fewer,
    classification_accuracy,
    corrections,
    detection_metrics,
    in_project_labels,
    paired_bootstrap,
    sign_test_fewer,
)
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
from label_studio_sahi.versions.bundles import ModelBundle, live_version, version_bundle
from label_studio_sahi.versions.registry import Registry, Version

log = logging.getLogger(__name__)

EVAL_SCORE_THRESHOLD = 0.05  # mAP needs the low-score tail of the precision-recall curve
GATE_METRIC = "map_50"  # what promotion compares: a box found at IoU 0.5 is one not drawn


@dataclass
class JobContext:
    """What a run needs besides its arguments; tests build one, rq runs build it from env."""

    settings: Settings
    registry: Registry
    progress: ProgressWriter = field(default_factory=ProgressWriter)

    def step_reporter(self, stage: str) -> Progress:
        """A training-loop callback that writes step, loss and ETA under ``stage``."""

        def report(step: int, steps: int, loss: float, eta: float) -> None:
            self.progress(
                stage=stage, step=step, steps=steps, loss=round(loss, 4), eta_seconds=round(eta, 1)
            )

        return report

    def stage(self, stage: str) -> None:
        self.progress(force=True, stage=stage)


@dataclass
class TrainingData:
    """A project's labels as the job uses them: config, train / held-out tasks, images."""

    config: LabelConfig
    train: list[LabelledTask]
    held: list[LabelledTask]
    images: dict[int, Image.Image]
    stats: dict[str, Any]


@dataclass
class Candidates:
    """What fine-tuning produced, with its scores and the live models' on the same tasks."""

    detector: Detector | None = None
    classifier: Classifier | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)


def train_project(project: str, reason: str = "", run_id: str = "") -> dict[str, Any]:
    """rq entry point (``names.TRAIN_JOB``)."""
    settings = get_settings()
    job = get_current_job()
    context = JobContext(
        settings, Registry.for_settings(settings, job_redis(settings)), ProgressWriter(job)
    )
    return run_training(context, str(project), reason, run_id or (job.id if job else "manual"))


def run_training(ctx: JobContext, project: str, reason: str, run_id: str) -> dict[str, Any]:
    """Gather labels, fine-tune, evaluate against live, publish (live only when better).

    One run per project at a time (a Redis lock, when the registry has Redis)."""
    client = ctx.registry.redis
    if client is None:
        return _run(ctx, project, reason, run_id)
    with _run_lock(client, project):
        return _run(ctx, project, reason, run_id)


RUN_LOCK_TTL = 60.0  # a killed run's lock frees itself within this; a live run renews it


@contextmanager
def _run_lock(client: Any, project: str) -> Iterator[None]:
    """The project's run lock, renewed while the run lives. A second run waits for it; if a
    run holding it died (a killed work horse), it expires and the retry goes ahead."""
    lock = client.lock(
        names.RUN_LOCK_KEY.format(project=project),
        timeout=RUN_LOCK_TTL,
        blocking_timeout=3 * RUN_LOCK_TTL,
        thread_local=False,  # renewed from another thread
    )
    if not lock.acquire():
        raise RuntimeError(
            f"another training run of project {project} holds its lock; retrying later"
        )
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RUN_LOCK_TTL / 3):
            with suppress(Exception):  # a lost renewal only shortens the lock
                lock.reacquire()

    renewer = threading.Thread(target=renew, name="run-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        with suppress(Exception):  # expired meanwhile: nothing to release
            lock.release()


def _name(version: Version | None) -> str | None:
    """A version's name; None for the base models (as ``live_version`` gives them)."""
    return version.name if version is not None else None


def _run(ctx: JobContext, project: str, reason: str, run_id: str) -> dict[str, Any]:
    registry = ctx.registry
    registry.clean_temporary(project)
    done = registry.find_by_run(project, run_id)
    if done is not None:
        log.info("train_already_done project=%s run=%s version=%s", project, run_id, done.name)
        # A crash between publish and set_live: promote now, if nothing moved the project.
        if (
            done.status == "accepted"
            and names.META_PARENT_LIVE in done.meta
            and _name(live_version(registry, project)) == done.meta[names.META_PARENT_LIVE]
        ):
            registry.set_live(project, done.name)
        return _summary(done.meta, done.name, project)

    data = gather(ctx, project)
    if not data.held or not data.train:
        ctx.stage("skipped")
        return {
            "status": "skipped",
            "project": project,
            "detail": "need at least 2 labelled tasks (one is held out)",
            **data.stats,
        }
    # Read once: the parent's name and its models are the same version.
    live = live_version(registry, project)
    live_name = _name(live)
    # The parent as it trains (and is judged beside its candidate): in PyTorch.
    parent = version_bundle(ctx.settings.model_copy(update={"detector_engine": "torch"}), live)
    candidates = train_and_evaluate(ctx, data, parent)
    if candidates.detector is None and candidates.classifier is None:
        return {
            "status": "skipped",
            "project": project,
            "detail": "no boxes or choices to train on",
            **data.stats,
        }
    version = publish(ctx, project, run_id, reason, data, parent, live_name, candidates)
    ctx.progress(force=True, stage="done", version=version.name)
    return _summary(version.meta, version.name, project)


def gather(ctx: JobContext, project: str) -> TrainingData:
    """The project's labels from Label Studio (the source of truth), split, with images."""
    ctx.stage("fetching labels")
    with StudioClient.from_settings(ctx.settings) as studio:
        config = parse_label_config(studio.project(project)["label_config"])
        export = studio.export(project)
    tasks = labelled_tasks(export, config)
    train, held = split_holdout(tasks, ctx.settings.holdout_fraction)
    stats: dict[str, Any] = {
        "labelled_tasks": len(tasks),
        "train_tasks": len(train),
        "heldout_tasks": len(held),
    }
    images: dict[int, Image.Image] = {}
    if train and held:
        ctx.stage("loading images")
        unreadable = 0
        with ImageLoader(ctx.settings) as loader:
            for task in [*train, *held]:
                try:
                    images[task.task_id] = loader.load(task.image_url, task.task_id)
                except ImageError as exc:  # one bad image must not fail every retry
                    unreadable += 1
                    log.warning(
                        "train_task_skipped project=%s task=%s error=%s detail=%s",
                        project, task.task_id, exc.code, exc.message,
                    )  # fmt: skip
        train = [t for t in train if t.task_id in images]
        held = [t for t in held if t.task_id in images]
        stats.update(unreadable_tasks=unreadable, train_tasks=len(train), heldout_tasks=len(held))
    return TrainingData(config, train, held, images, stats)


def train_and_evaluate(ctx: JobContext, data: TrainingData, parent: ModelBundle) -> Candidates:
    """Fine-tune the detector on boxes and the classifier on choices; score both, and the
    live models, on the held-out tasks."""
    out = Candidates()
    rect = data.config.rectangles[0] if data.config.rectangles else None
    if rect is not None and parent.detector is not None and any(t.boxes for t in data.train):
        slicing = SliceConfig.from_settings(ctx.settings, parent.detector)
        data.stats["window"] = [slicing.slice_width, slicing.slice_height]
        ctx.stage("scoring the parent")
        share = parent_share(ctx.settings, parent.detector, rect, data.train, data.images, slicing)
        tuned = finetune_detector(
            ctx.settings, parent.detector, rect, data.train, data.images,
            ctx.step_reporter("training detector"),
        )  # fmt: skip
        out.curves["detector"], data.stats["windows"] = tuned.curve, tuned.windows
        ctx.stage("evaluating")
        out.detector, candidate, data.stats["parent_weight_share"] = _better_of(
            tuned, share, rect, data.held, data.images, slicing
        )
        live = _evaluate_detector(
            parent.detector, rect, data.held, data.images, slicing, own_labels=False
        )
        out.metrics["candidate"], out.metrics["live"] = candidate.metrics, live.metrics
        threshold = rect.threshold(ctx.settings.score_threshold)  # as the tag is served
        fixes = {
            side: corrections(scored.predictions, scored.truths, threshold)
            for side, scored in (("candidate", candidate), ("live", live))
        }
        for side, counts in fixes.items():
            out.metrics[side]["corrections"] = sum(counts)
        gain = candidate.metrics[GATE_METRIC] - live.metrics[GATE_METRIC]
        resample = ctx.settings.promote_confidence > 0
        # Re-drawing the held-out images only matters for a gain the gate would weigh.
        out.metrics["bootstrap_better"] = (
            paired_bootstrap(
                candidate.predictions, live.predictions, candidate.truths, len(rect.labels),
                candidate.sizes, metric=GATE_METRIC,
            )
            if gain > 0 and resample
            else float(gain > 0)
        )  # fmt: skip
        if gain == 0:  # a tie on mAP: the gate weighs the annotator's corrections (decide)
            out.metrics["bootstrap_fewer_corrections"] = (
                bootstrap_fewer(fixes["candidate"], fixes["live"])
                if resample
                else float(sum(fixes["candidate"]) < sum(fixes["live"]))
            )
            out.metrics["sign_fewer_corrections"] = (
                sign_test_fewer(fixes["candidate"], fixes["live"]) if resample else 1.0
            )
    choice = data.config.choices[0] if data.config.choices else None
    if choice is not None and parent.classifier is not None and any(t.choices for t in data.train):
        out.classifier, out.curves["classifier"] = finetune_classifier(
            ctx.settings, parent.classifier, choice, data.train, data.images,
            ctx.step_reporter("training classifier"),
        )  # fmt: skip
        out.metrics["candidate_accuracy"] = _accuracy(
            out.classifier, choice, data.held, data.images, own_labels=True
        )
        out.metrics["live_accuracy"] = _accuracy(
            parent.classifier, choice, data.held, data.images, own_labels=False
        )
    return out


def decide(candidates: Candidates, settings: Settings) -> dict[str, dict[str, Any]]:
    """Per model, whether to promote it and why; detector and classifier independently.

    The detector must score higher than live on held-out mAP@.5 *and* do so on at least
    ``PROMOTE_CONFIDENCE`` of the paired bootstrap draws of the held-out images (a few
    images are noise). On a tie (most often both 0: a few sparse held-out images where
    neither model finds the objects), it must instead leave the annotator fewer corrections
    at the serving threshold, in as many bootstrap draws and by a sign test over the images
    (a tie on 2 held-out images never promotes: chance makes one model lower on both once in
    four): mAP does not see a live model that sprays false boxes, an annotator deletes every
    one. The classifier must have a higher held-out accuracy.
    """
    m = candidates.metrics
    out: dict[str, dict[str, Any]] = {}
    if candidates.detector is not None:
        gain = m["candidate"][GATE_METRIC] - m["live"][GATE_METRIC]
        needs = f"(needs {settings.promote_confidence:.0%})"
        images = m["candidate"]["images"]
        held = (
            f"held-out {GATE_METRIC} {m['candidate'][GATE_METRIC]:.4f} vs live "
            f"{m['live'][GATE_METRIC]:.4f} ({gain:+.4f})"
        )
        if gain == 0 and "bootstrap_fewer_corrections" in m:
            fewer, signs = m["bootstrap_fewer_corrections"], m["sign_fewer_corrections"]
            promoted = fewer > 0 and min(fewer, signs) >= settings.promote_confidence
            why = (
                f"{held}, a tie; corrections at the serving threshold "
                f"{m['candidate']['corrections']} vs live {m['live']['corrections']}, fewer in "
                f"{fewer:.0%} of bootstrap draws of {images} images and {signs:.0%} by a sign "
                f"test over them {needs}"
            )
        else:
            sure = m["bootstrap_better"]
            promoted = gain > 0 and sure >= settings.promote_confidence
            why = f"{held}; better in {sure:.0%} of bootstrap draws of {images} images {needs}"
        out["detector"] = {"promoted": promoted, "why": why}
    if candidates.classifier is not None:
        a, b = m["candidate_accuracy"], m["live_accuracy"]
        out["classifier"] = {
            "promoted": a > b,
            "why": f"held-out accuracy {a:.3f} vs live {b:.3f}",
        }
    return out


def publish(
    ctx: JobContext,
    project: str,
    run_id: str,
    reason: str,
    data: TrainingData,
    parent: ModelBundle,
    live_name: str | None,
    candidates: Candidates,
) -> Version:
    """Write the version (accepted or rejected) and make it live when it is better.

    A version holds the promoted candidates and, for a model whose candidate lost, the
    parent's model: a better classifier is kept even when the detector's candidate lost.
    """
    decision = decide(candidates, ctx.settings)
    better_boxes = decision.get("detector", {}).get("promoted", False)
    better_classes = decision.get("classifier", {}).get("promoted", False)
    accepted = better_boxes or better_classes
    rect = data.config.rectangles[0] if data.config.rectangles else None
    choice = data.config.choices[0] if data.config.choices else None
    meta = {
        names.META_STATUS: "accepted" if accepted else "rejected",
        "project": project,
        names.META_PARENT: model_version(project, live_name) if live_name else parent.version,
        names.META_PARENT_LIVE: live_name,
        names.META_RUN_ID: run_id,
        "reason": reason,
        names.META_METRICS: candidates.metrics,
        "decision": decision,
        "labels": list(rect.labels) if rect else [],
        "choices": list(choice.labels) if choice else [],
        "dataset": data.stats,
        "curves": candidates.curves,
        # Everything that shaped this version, as timm keeps its args beside a checkpoint.
        "settings": {name: getattr(ctx.settings, name) for name in VERSION_SETTINGS},
    }
    if accepted:
        # What serves: each model's candidate if it won, else the parent's. A version
        # without a classifier folder is served with the base classifier, so a parent's
        # own (fine-tuned) classifier goes along when the candidate did not beat it.
        detector = candidates.detector if better_boxes else parent.detector
        classifier = candidates.classifier if better_classes else None
        if classifier is None and live_name is not None:
            own = ctx.registry.get(project, live_name).path / names.CLASSIFIER_DIR
            classifier = parent.classifier if own.is_dir() else None
    else:  # kept for inspection, never served
        detector = candidates.detector or parent.detector
        classifier = candidates.classifier

    def write(folder: Path) -> None:
        for model, sub in ((detector, names.DETECTOR_DIR), (classifier, names.CLASSIFIER_DIR)):
            if model is not None:
                model.model.save_pretrained(folder / sub)
                model.processor.save_pretrained(folder / sub)
        if accepted and detector is not None and ctx.settings.detector_engine != "torch":
            export_engine(detector, folder / names.DETECTOR_DIR)
        _plot_curves(candidates.curves, folder / names.CURVES_FILE)

    version = ctx.registry.publish(project, write, meta)
    if accepted:
        ctx.registry.set_live(project, version.name)
    ctx.registry.prune(project, ctx.settings.keep_versions)
    return version


def export_engine(detector: Detector, folder: Path) -> None:
    """The ONNX graph beside the weights, so that serving processes swap to it ready.
    A model the exporter cannot take is published without one (served by PyTorch)."""
    model = detector.model if detector.device.type == "cpu" else copy.deepcopy(detector.model).cpu()
    try:
        write_onnx(
            model.float(), folder, checkpoint_revision(str(folder), model), *detector.input_shape()
        )
    except Exception as exc:
        log.warning("engine_export_failed error=%s: %s", type(exc).__name__, str(exc)[:200])


def _summary(meta: dict[str, Any], name: str, project: str) -> dict[str, Any]:
    return {
        "status": meta.get("status"),
        "project": project,
        "version": name,
        "model_version": model_version(project, name),
        "metrics": meta.get("metrics"),
        "dataset": meta.get("dataset"),
    }


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


def _better_of(
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
    fine-tuned weights away from it: bench/README.md, "Geometry"), and keeps a weak parent's
    false boxes too: which of the two a project needs, its held-out tasks say. The pick is
    between two points of one training run; the gate then asks the same of it as of any
    candidate."""
    scored = _evaluate_detector(tuned.detector, tag, held, images, slicing, own_labels=True)
    if share <= 0:
        return tuned.detector, scored, 0.0
    averaged = tuned.averaged(share)
    other = _evaluate_detector(averaged, tag, held, images, slicing, own_labels=True)
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
    scored = _evaluate_detector(
        live, tag, train[:PARENT_CHECK_TASKS], images, slicing, own_labels=False
    )
    return settings.parent_weight_share if scored.metrics[GATE_METRIC] > 0 else 0.0


@dataclass
class HeldOutScore:
    """A detector's boxes on the held-out tasks, the truth, and the COCO metrics."""

    predictions: list[Detections]
    truths: list[tuple[list[tuple[float, float, float, float]], list[int]]]
    sizes: list[tuple[int, int]]
    metrics: dict[str, Any]


def _evaluate_detector(
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
