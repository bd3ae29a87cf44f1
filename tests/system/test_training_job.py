"""The fine-tuning job, run in-process against a Label Studio stand-in and a real Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from labelled_project import labelled_project
from safetensors.torch import load_file
from stack import stack_settings

from label_studio_sahi.names import LIVE_KEY
from label_studio_sahi.training.finetune import training_steps
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import random_detr


def _settings(fake: FakeStudio, detector: Path, model_dir: Path, **overrides: Any) -> Any:
    return stack_settings(fake, None, detector, model_dir, **overrides)


def test_fine_tuning_raises_held_out_map_and_publishes_the_version(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=8)
    untrained = random_detr(tmp_path / "untrained", seed=1)
    settings = _settings(fake, untrained, tmp_path / "models")
    registry = Registry.for_settings(settings, redis_client)

    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")

    candidate, live = summary["metrics"]["candidate"], summary["metrics"]["live"]
    assert candidate["map_50"] > live["map_50"] and candidate["map"] > live["map"], summary[
        "metrics"
    ]
    assert summary["status"] == "accepted" and summary["model_version"] == f"p{project.id}-v1"
    assert summary["dataset"]["train_tasks"] + summary["dataset"]["heldout_tasks"] == 8
    assert registry.live(str(project.id)) == "v1"
    folder = registry.get(str(project.id), "v1").path
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["labels"] == ["Vehicle", "Person"] and meta["parent"].startswith("untrained@")
    steps = training_steps(meta["dataset"]["windows"], settings)
    assert (
        len(meta["curves"]["detector"]) == steps and (folder / "curves.png").stat().st_size > 1000
    )
    assert (
        meta["decision"]["detector"]["promoted"]
        and "bootstrap" in meta["decision"]["detector"]["why"]
    )
    assert meta["settings"]["grad_clip"] == settings.grad_clip  # every setting that shaped it
    # A random parent finds nothing on the training tasks: nothing of it is averaged back in.
    assert meta["dataset"]["parent_weight_share"] == 0.0
    config = json.loads((folder / "detector" / "config.json").read_text())
    assert config["id2label"] == {
        "0": "Vehicle",
        "1": "Person",
    }  # relabelled to the project's labels
    assert load_file(
        folder / "detector" / "model.safetensors"
    )  # safetensors, loadable without pickle


def test_a_second_run_of_the_same_job_returns_what_the_first_published(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=4)
    settings = _settings(
        fake, random_detr(tmp_path / "untrained"), tmp_path / "models", train_steps=5
    )
    registry = Registry.for_settings(settings, redis_client)
    first = run_training(JobContext(settings, registry), str(project.id), "test", "run-7")
    exports = fake.export_calls
    again = run_training(JobContext(settings, registry), str(project.id), "test", "run-7")
    assert again["version"] == first["version"] and len(registry.versions(str(project.id))) == 1
    assert fake.export_calls == exports  # nothing recomputed


def test_a_candidate_that_is_not_better_is_kept_as_rejected(
    fake: FakeStudio, tmp_path: Path, redis_client: Any, detector_dir: Path
) -> None:
    project = labelled_project(fake, n_tasks=4)
    # One step at a learning rate of 1e-9 leaves the trained detector as it was: the
    # candidate scores the same as live, which is not better, so it is not promoted.
    settings = _settings(
        fake,
        detector_dir,
        tmp_path / "models",
        train_steps=1,
        learning_rate=1e-9,
        backbone_learning_rate=1e-9,
    )
    registry = Registry.for_settings(settings, redis_client)
    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")
    metrics = summary["metrics"]
    assert metrics["candidate"]["map"] == pytest.approx(metrics["live"]["map"], abs=1e-6)
    assert metrics["live"]["map_50"] > 0.1, metrics  # the trained detector really detects
    # The same boxes leave the annotator as many corrections: a tie is not broken for it.
    assert metrics["candidate"]["corrections"] == metrics["live"]["corrections"], metrics
    assert summary["status"] == "rejected"
    assert registry.live(str(project.id)) is None
    assert registry.get(str(project.id), "v1").status == "rejected"


def test_a_live_pointer_to_a_version_this_model_dir_lacks_trains_from_the_base(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    # Another volume's version, or a deleted one: serving falls back to the base, and so
    # must the job (it used to fail in publish, retried until rq gave up).
    project = labelled_project(fake, n_tasks=4)
    settings = _settings(
        fake, random_detr(tmp_path / "untrained"), tmp_path / "models", train_steps=5,
        promote_confidence=0,
    )  # fmt: skip
    registry = Registry.for_settings(settings, redis_client)
    redis_client.set(LIVE_KEY.format(project=project.id), "v7")
    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")
    version = registry.get(str(project.id), summary["version"])
    assert version.meta["parent"].startswith("untrained@"), version.meta["parent"]
    assert version.meta["parent_live"] is None
    assert registry.live(str(project.id)) == ("v1" if summary["status"] == "accepted" else "v7")


def test_too_few_labels_skip_training(fake: FakeStudio, tmp_path: Path, redis_client: Any) -> None:
    project = labelled_project(fake, n_tasks=1)
    settings = _settings(fake, random_detr(tmp_path / "untrained"), tmp_path / "models")
    summary = run_training(
        JobContext(settings, Registry.for_settings(settings, redis_client)),
        str(project.id),
        "t",
        "r",
    )
    assert summary["status"] == "skipped" and "at least 2" in summary["detail"]


def test_choices_fine_tune_the_classifier_too(
    fake: FakeStudio, tmp_path: Path, redis_client: Any, classifier_dir: Path
) -> None:
    project = labelled_project(fake, n_tasks=8, scenes=True)
    settings = _settings(
        fake, random_detr(tmp_path / "untrained", seed=1), tmp_path / "models",
        classifier_model=str(classifier_dir), train_steps=60,
    )  # fmt: skip
    registry = Registry.for_settings(settings, redis_client)
    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")
    metrics = summary["metrics"]
    assert 0 <= metrics["candidate_accuracy"] <= 1 and 0 <= metrics["live_accuracy"] <= 1
    meta = json.loads((registry.get(str(project.id), "v1").path / "meta.json").read_text())
    trained_on = summary["dataset"]["train_tasks"]
    assert len(meta["curves"]["classifier"]) == training_steps(trained_on, settings)
    assert meta["choices"] == ["Street", "Beach"]
    # The scene classifier already knows street from beach (the live one maps through names).
    assert metrics["live_accuracy"] == 1.0
    # Judged on its own: a classifier that is not better is not promoted, whatever the boxes.
    assert meta["decision"]["classifier"]["promoted"] == (
        metrics["candidate_accuracy"] > metrics["live_accuracy"]
    )


def test_an_unreadable_image_is_skipped_and_counted_not_fatal(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=6)
    gone = fake.add_task(project.id, {"image": f"/data/upload/{project.id}/deleted.png"})
    fake.add_annotation(gone, fake.tasks[project.task_ids[0]]["annotations"][0]["result"])
    settings = _settings(
        fake, random_detr(tmp_path / "untrained"), tmp_path / "models", train_steps=5
    )
    registry = Registry.for_settings(settings, redis_client)

    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")

    assert summary["dataset"]["unreadable_tasks"] == 1
    assert summary["dataset"]["train_tasks"] + summary["dataset"]["heldout_tasks"] == 6


def test_a_retry_after_a_crash_before_set_live_promotes_the_published_version(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=8)
    settings = _settings(fake, random_detr(tmp_path / "untrained", seed=1), tmp_path / "models")
    registry = Registry.for_settings(settings, redis_client)
    first = run_training(JobContext(settings, registry), str(project.id), "test", "run-9")
    assert first["status"] == "accepted"
    registry.set_live(str(project.id), None)  # as if the worker died before set_live

    again = run_training(JobContext(settings, registry), str(project.id), "test", "run-9")

    assert again["version"] == first["version"]
    assert registry.live(str(project.id)) == first["version"]
