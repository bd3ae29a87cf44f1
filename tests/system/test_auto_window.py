"""SLICE_*=auto, the default: windows of the detector's input size (at most 512 px), the same
for serving, for the job's training windows and for its held-out scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from labelled_project import labelled_project
from stack import stack_settings

from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.inference.slicing import model_window
from label_studio_sahi.serving.pipeline import Predictor
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.servers import make_settings
from testkit.tiny_models import detr_processor


def test_the_auto_window_is_the_input_size_never_more_than_512() -> None:
    assert model_window(128, 128) == 128  # the tiny test models
    assert model_window(800, 800) == 512  # DETR-R50: sahi's 512, upscaled 1.6x
    assert model_window(640, 640) == 512  # RT-DETR
    assert model_window(384, 640) == 384


def test_auto_is_the_default_and_resolves_to_the_detectors_window(detector: Detector) -> None:
    settings = make_settings(slice_height=None, slice_width=None)
    assert settings.slice_width is None and settings.slice_height is None
    slicing = SliceConfig.from_settings(settings, detector)
    assert detector.input_shape() == (128, 128)
    assert (slicing.slice_height, slicing.slice_width) == (128, 128)
    # A 1600x1200 image in 128 px windows at 20 % overlap: 16 x 12 windows of 128 px.
    windows = slicing.windows(1200, 1600)
    assert len(windows) == 16 * 12
    assert {(int(w[2] - w[0]), int(w[3] - w[1])) for w in windows} == {(128, 128)}


def test_a_detector_with_a_larger_input_gets_sahis_512_px_windows(detector: Detector) -> None:
    r50_like = Detector(
        detector.model, detr_processor(800), detector.device, detector.dtype, version="r50"
    )
    slicing = SliceConfig.from_settings(
        make_settings(slice_height=None, slice_width=None), r50_like
    )
    assert (slicing.slice_height, slicing.slice_width) == (512, 512)


def test_a_set_window_side_is_kept_and_only_the_auto_one_resolved(detector: Detector) -> None:
    fixed = SliceConfig.from_settings(make_settings(slice_height=512, slice_width=512), detector)
    assert (fixed.slice_height, fixed.slice_width) == (512, 512)
    half = SliceConfig.from_settings(make_settings(slice_height=256, slice_width=None), detector)
    assert (half.slice_height, half.slice_width) == (256, 128)
    # No detector (a classifier-only project): windows are chosen per image, as before.
    assert (
        SliceConfig.from_settings(make_settings(slice_height=None, slice_width=None)).slice_width
        is None
    )


def test_serving_slices_with_its_models_window(bundle: Any) -> None:
    predictor = Predictor(
        bundle, make_settings(slice_height=None, slice_width=None), load_image=lambda *_: None
    )
    try:
        assert (predictor.slicing.slice_height, predictor.slicing.slice_width) == (128, 128)
    finally:
        predictor.close()


@pytest.mark.slow
def test_the_job_trains_and_scores_at_the_window_it_serves_with_and_records_it(
    fake: FakeStudio, tmp_path: Path, redis_client: Any, detector_dir: Path
) -> None:
    project = labelled_project(fake, n_tasks=6)
    settings = stack_settings(
        fake, None, detector_dir, tmp_path / "models",
        slice_height=None, slice_width=None, train_steps=4, train_min_steps=4,
    )  # fmt: skip
    registry = Registry.for_settings(settings, redis_client)

    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")

    meta = json.loads(
        (registry.get(str(project.id), summary["version"]).path / "meta.json").read_text()
    )
    assert meta["dataset"]["window"] == [128, 128]
    assert meta["settings"]["slice_width"] is None  # what was set: auto
    # This parent finds the squares on the training tasks: its average with the candidate
    # was scored too, and the held-out tasks chose one (the share it took is recorded).
    assert meta["dataset"]["parent_weight_share"] in (0.0, 0.5)


def test_a_window_set_larger_than_the_input_is_said_once_per_model(
    bundle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="label_studio_sahi.serving.pipeline"):
        Predictor(bundle, make_settings(slice_height=512, slice_width=512), lambda *_: None).close()
        Predictor(
            bundle, make_settings(slice_height=None, slice_width=None), lambda *_: None
        ).close()
    [line] = [r.getMessage() for r in caplog.records if "slice_window_shrunk" in r.getMessage()]
    assert "window=512x512 input=128 shrink=4.0x" in line


def test_the_held_out_tasks_choose_between_the_candidate_and_its_average_with_the_parent(
    fake: FakeStudio, tmp_path: Path, detector: Detector, detector_dir: Path
) -> None:
    import copy

    import torch

    from label_studio_sahi.training.candidates import FineTuned, better_of
    from label_studio_sahi.training.finetune import DETECTOR_HEADS, relabel_head
    from label_studio_sahi.training.job import gather

    project = labelled_project(fake, n_tasks=4)
    settings = stack_settings(fake, None, detector_dir, tmp_path / "models")
    data = gather(JobContext(settings, Registry.for_settings(settings, None)), str(project.id))
    tag = data.config.rectangles[0]
    tasks = data.train + data.held
    slicing = SliceConfig.from_settings(settings, detector)
    model = copy.deepcopy(detector.model)
    relabel_head(model, DETECTOR_HEADS, list(tag.labels), tag.label_for)  # as the job does
    knows = Detector(model, detector.processor, detector.device, detector.dtype, version="k")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a fine-tune that forgot everything
    forgot = Detector(broken, detector.processor, detector.device, detector.dtype, version="x")

    # Its start knew the squares: the average (mostly the start) scores higher, and is taken.
    chosen, scored, share = better_of(
        FineTuned(forgot, [], 0, good), 0.99, tag, tasks, data.images, slicing
    )
    assert share == 0.99 and chosen is not forgot and scored.metrics["map_50"] > 0
    # A good candidate from a start that knew nothing: the candidate itself is kept.
    noise = {k: v.clone() for k, v in broken.state_dict().items()}
    chosen, _, share = better_of(
        FineTuned(knows, [], 0, noise), 0.99, tag, tasks, data.images, slicing
    )
    assert share == 0.0 and chosen is knows
    # No share: nothing else is scored.
    assert (
        better_of(FineTuned(forgot, [], 0, good), 0.0, tag, tasks, data.images, slicing)[2] == 0.0
    )
