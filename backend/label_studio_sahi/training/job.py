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
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from rq import get_current_job

from label_studio_sahi import names
from label_studio_sahi.errors import ImageError
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.inference.checkpoints import checkpoint_revision
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.onnx_engine import write_onnx
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.jobs.queueing import JobMetaWriter, job_redis
from label_studio_sahi.labelstudio.client import StudioClient
from label_studio_sahi.labelstudio.label_config import LabelConfig, parse_label_config
from label_studio_sahi.names import model_version
from label_studio_sahi.settings import VERSION_SETTINGS, Settings, get_settings
from label_studio_sahi.training.candidates import (
    better_of,
    finetune_classifier,
    finetune_detector,
    parent_share,
)
from label_studio_sahi.training.dataset import LabelledTask, labelled_tasks, split_holdout
from label_studio_sahi.training.evaluate import evaluate_detector, held_out_accuracy
from label_studio_sahi.training.finetune import Progress
from label_studio_sahi.training.gate import Candidates, decide, judge
from label_studio_sahi.training.plots import plot_curves
from label_studio_sahi.versions.bundles import ModelBundle, live_version, version_bundle
from label_studio_sahi.versions.registry import Registry, Version

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What a run needs besides its arguments; tests build one, rq runs build it from env."""

    settings: Settings
    registry: Registry
    progress: JobMetaWriter = field(default_factory=JobMetaWriter)

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


def train_project(project: str, reason: str = "", run_id: str = "") -> dict[str, Any]:
    """rq entry point (``names.TRAIN_JOB``)."""
    settings = get_settings()
    job = get_current_job()
    context = JobContext(
        settings, Registry.for_settings(settings, job_redis(settings)), JobMetaWriter(job)
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
        out.detector, candidate, data.stats["parent_weight_share"] = better_of(
            tuned, share, rect, data.held, data.images, slicing
        )
        live = evaluate_detector(
            parent.detector, rect, data.held, data.images, slicing, own_labels=False
        )
        threshold = rect.threshold(ctx.settings.score_threshold)  # as the tag is served
        out.metrics.update(judge(candidate, live, threshold, len(rect.labels), ctx.settings))
    choice = data.config.choices[0] if data.config.choices else None
    if choice is not None and parent.classifier is not None and any(t.choices for t in data.train):
        out.classifier, out.curves["classifier"] = finetune_classifier(
            ctx.settings, parent.classifier, choice, data.train, data.images,
            ctx.step_reporter("training classifier"),
        )  # fmt: skip
        out.metrics["candidate_accuracy"] = held_out_accuracy(
            out.classifier, choice, data.held, data.images, own_labels=True
        )
        out.metrics["live_accuracy"] = held_out_accuracy(
            parent.classifier, choice, data.held, data.images, own_labels=False
        )
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
            own = (
                ctx.registry.local(ctx.registry.get(project, live_name)).path / names.CLASSIFIER_DIR
            )
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
        plot_curves(candidates.curves, folder / names.CURVES_FILE)

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
