"""The job fine-tunes every DETR family that ``AutoModelForObjectDetection`` builds.

Each family scores classes in its own layers (DETR's one classifier, Deformable DETR's
tied per-layer heads, RT-DETR's encoder head and label embedding); the job must relabel
all of them to the project's labels, train, and publish a checkpoint that loads and serves.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from labelled_project import labelled_project
from stack import stack_settings

from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.training.finetune import DETECTOR_HEADS, relabel_head
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import FAMILIES, draw_scene, new_detector, random_detr

STEPS = 60


@pytest.mark.parametrize("family", FAMILIES)
def test_every_class_layer_of_a_family_gets_the_projects_labels(family: str) -> None:
    model, _ = new_detector(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The base's "car" and "truck" are both the project's Vehicle; Cyclist is new.
    model.config.id2label = {0: "car", 1: "truck"}
    mapping = {"car": "Vehicle", "truck": "Vehicle"}
    relabel_head(model, DETECTOR_HEADS, ["Vehicle", "Cyclist", "Bus"], mapping.get)

    heads = {n: p for n, p in model.named_parameters() if set(n.split(".")) & set(DETECTOR_HEADS)}
    assert heads, "the family has class layers the job knows of"
    for name, param in heads.items():
        old = before[name]
        assert param.shape[0] == old.shape[0] + 1, name  # 2 classes became 3 (+ any extra row)
        assert torch.allclose(param[0], old[:2].mean(dim=0)), name  # Vehicle from car and truck
        if old.shape[0] == 3:  # the row past the classes (no-object, padding) is kept
            assert torch.equal(param[3], old[2]), name
    with torch.no_grad():
        out = model(pixel_values=torch.rand(1, 3, 128, 128))
    assert out.logits.shape[-1] in (3, 4)  # 3 labels (+ DETR's no-object)
    assert model.config.id2label == {0: "Vehicle", 1: "Cyclist", 2: "Bus"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_job_fine_tunes_and_publishes_each_family(
    family: str, fake: FakeStudio, tmp_path: Path, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=6)
    base = random_detr(tmp_path / family, seed=1, family=family)
    settings = stack_settings(
        fake, None, base, tmp_path / "models", train_steps=STEPS, train_min_steps=STEPS
    )
    registry = Registry.for_settings(settings, redis_client)

    summary = run_training(JobContext(settings, registry), str(project.id), "test", "run-1")

    version = registry.get(str(project.id), summary["version"])  # published, kept or not
    curve = version.meta["curves"]["detector"]
    assert len(curve) == STEPS
    # It learnt: the loss of the last steps is well below that of the first.
    assert statistics.mean(curve[-10:]) < 0.8 * statistics.mean(curve[:10]), curve
    served = Detector.load(str(version.path / "detector"), device="cpu")
    assert served.model.config.model_type == family
    assert served.model.config.id2label == {0: "Vehicle", 1: "Person"}
    scene = draw_scene(128, 128, 3, random.Random(0))
    found = served.detect([np.array(scene.image)], threshold=0.0)[0]
    assert len(found.boxes) > 0 and set(found.labels.tolist()) <= {0, 1}
