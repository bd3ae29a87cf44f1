"""ONNX Runtime serves the detector on a CPU with PyTorch's boxes, or is not used at all.

The engine is an exported graph of the checkpoint; what it must never do is answer
differently from the model. These tests pin that its boxes equal PyTorch's through the
whole sliced pipeline, that a graph published beside the weights is used as it is and one
made for other weights is not, and that a family whose traced graph differs stays on
PyTorch instead of serving wrong boxes.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from labelled_project import labelled_project
from stack import stack_settings

from label_studio_sahi.inference.checkpoints import checkpoint_revision
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.onnx_engine import ONNX_FILE, onnx_revision, write_onnx
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.bundles import load_base_bundle
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import draw_scene, random_detr

SLICING = SliceConfig(slice_height=96, slice_width=96, window_batch_size=2)


def scene_pixels(seed: int = 0) -> np.ndarray:
    return np.array(draw_scene(320, 224, 8, random.Random(seed)).image)


def torch_twin(detector: Detector) -> Detector:
    """The same model object served by PyTorch."""
    return Detector(detector.model, detector.processor, detector.device, detector.dtype, "twin")


@pytest.mark.parametrize("name", ["detector_dir", "detr_dir"])
def test_sliced_boxes_through_onnxruntime_equal_pytorchs(
    name: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(name)
    served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.engine == "onnxruntime"

    for seed in range(3):
        pixels = scene_pixels(seed)
        got = sliced_detect(served, pixels, SLICING, threshold=0.05)
        want = sliced_detect(torch_twin(served), pixels, SLICING, threshold=0.05)
        assert len(want) > 0
        assert got.labels.tolist() == want.labels.tolist()
        assert torch.allclose(got.boxes, want.boxes, atol=0.05)  # pixels
        assert torch.allclose(got.scores, want.scores, atol=1e-4)


def test_auto_is_onnxruntime_on_a_cpu_and_torch_when_asked(detector_dir: Path) -> None:
    base = dict(detector_model=str(detector_dir), classifier_model="", device="cpu")
    auto = load_base_bundle(Settings(_env_file=None, **base))  # type: ignore[call-arg]
    plain = load_base_bundle(Settings(_env_file=None, detector_engine="torch", **base))  # type: ignore[call-arg]
    assert auto.detector is not None and auto.detector.engine == "onnxruntime"
    assert plain.detector is not None and plain.detector.engine == "torch"
    assert auto.version == plain.version  # the engine is not a model version


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(ONNX_FILE))
    return folder


def test_a_graph_published_beside_the_weights_is_used_as_it_is(
    detector_dir: Path, tmp_path: Path
) -> None:
    folder = copy_checkpoint(detector_dir, tmp_path)
    plain = Detector.load(str(folder), device="cpu")
    assert write_onnx(
        plain.model, folder, checkpoint_revision(str(folder), plain.model), *plain.input_shape()
    )
    assert not list(folder.glob(".*.tmp"))  # renamed into place

    served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.runner is not None and served.runner.origin == "file"


def test_a_graph_of_other_weights_or_a_broken_file_is_exported_afresh(
    detector_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_checkpoint(detector_dir, tmp_path)
    plain = Detector.load(str(folder), device="cpu")
    write_onnx(plain.model, folder, "other-weights", *plain.input_shape())
    with caplog.at_level(logging.WARNING):
        served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.runner is not None and served.runner.origin == "export"
    assert "engine_file_stale" in caplog.text

    (folder / ONNX_FILE).write_bytes(b"\x08\x07 not a graph")
    served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.runner is not None and served.runner.origin == "export"
    pixels = scene_pixels()
    got = sliced_detect(served, pixels, SLICING, threshold=0.05)
    assert torch.allclose(got.boxes, sliced_detect(plain, pixels, SLICING, 0.05).boxes, atol=0.05)


def test_a_family_whose_graph_answers_otherwise_stays_on_pytorch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # RT-DETR's traced graph keeps the anchors of the size it was traced at: wrong at others.
    folder = random_detr(tmp_path / "rt", seed=1, family="rt_detr")
    with caplog.at_level(logging.WARNING):
        served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.engine == "torch"
    assert "engine_mismatch" in caplog.text
    assert not write_onnx(served.model, folder, "rev", *served.input_shape())
    assert not (folder / ONNX_FILE).exists()
    assert len(served.detect([scene_pixels()], threshold=0.0)[0]) > 0  # still serves


def test_the_worker_publishes_the_graph_so_a_swap_loads_it_ready(
    fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=8)
    untrained = random_detr(tmp_path / "untrained", seed=1)  # any fine-tune beats it
    settings = stack_settings(fake, None, untrained, tmp_path / "models")
    registry = Registry.for_settings(settings, redis_client)

    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")

    assert summary["status"] == "accepted", summary
    folder = registry.get(str(project.id), summary["version"]).path / "detector"
    served = Detector.load(str(folder), device="cpu", engine="onnxruntime")
    assert served.runner is not None and served.runner.origin == "file"
    graph = (folder / ONNX_FILE).read_bytes()
    assert onnx_revision(graph) == checkpoint_revision(str(folder), served.model)
