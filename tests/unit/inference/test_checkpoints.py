"""Loading detectors and classifiers from folders (and refusing what must be refused)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

from label_studio_sahi.errors import ModelLoadError
from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from testkit.tiny_models import SCENE_COLOURS, draw_scene, random_detr


def test_detector_loads_from_a_folder_and_names_its_version(detector_dir: Path) -> None:
    det = Detector.load(str(detector_dir), device="cpu")
    assert det.version.startswith(f"{detector_dir.name}@") and len(det.version.split("@")[1]) == 8
    assert det.id2label == {0: "car", 1: "person"}
    assert det.dtype == torch.float32  # half precision is for CUDA only


def test_new_weights_give_a_new_version(detector_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / detector_dir.name
    shutil.copytree(detector_dir, copy)
    before = Detector.load(str(copy), device="cpu").version
    random_detr(copy, seed=3)
    assert Detector.load(str(copy), device="cpu").version != before


def test_detector_finds_squares_in_a_window(detector: Detector) -> None:
    scene = draw_scene(128, 128, 2, random.Random(4))
    [found] = detector.detect([np.asarray(scene.image)], threshold=0.3)
    assert len(found) >= 1
    assert found.boxes.min() >= 0 and found.boxes[:, 2].max() <= 128


def test_a_pickled_checkpoint_is_refused_not_unpickled(detector_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(detector_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="DETECTOR_MODEL"):
        Detector.load(str(folder), device="cpu")


def test_a_folder_without_config_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        Detector.load(str(tmp_path), device="cpu")


def test_unreachable_hub_says_so_in_one_line_and_how_to_use_a_local_folder() -> None:
    with pytest.raises(ModelLoadError) as info:
        Detector.load("facebook/detr-resnet-50", device="cpu")
    message = info.value.message
    assert "\n" not in message and "could not be reached" in message and "local folder" in message


def test_cli_prints_the_hub_error_as_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    draw_scene(64, 64, 1, random.Random(0)).image.save(image)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "label_studio_sahi.cli",
            "predict",
            str(image),
            "--detector",
            "facebook/detr-resnet-50",
        ],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ls-sahi: error: cannot load DETECTOR_MODEL=facebook/detr-resnet-50")
    assert "local folder" in last


def test_classifier_ranks_scene_classes(classifier: Classifier) -> None:
    rng = random.Random(9)
    street = np.asarray(draw_scene(64, 48, 2, rng, background=SCENE_COLOURS["street"]).image)
    beach = np.asarray(draw_scene(64, 48, 2, rng, background=SCENE_COLOURS["beach"]).image)
    ranked = classifier.classify([street, beach], top_k=2)
    assert [r[0][0] for r in ranked] == ["street", "beach"]
    assert all(abs(sum(p for _, p in r) - 1) < 1e-5 for r in ranked)  # softmax over 2 classes


def test_timm_checkpoints_load_as_classifiers(tmp_path: Path) -> None:
    config = TimmWrapperConfig(
        architecture="resnet10t",
        pretrained_cfg={
            "input_size": [3, 32, 32],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "crop_pct": 1.0,
        },
        num_labels=2,
        id2label={0: "street", 1: "beach"},
        label2id={"street": 0, "beach": 1},
    )
    TimmWrapperForImageClassification(config).save_pretrained(tmp_path)
    clf = Classifier.load(str(tmp_path), device="cpu")
    [ranked] = clf.classify([np.zeros((30, 40, 3), dtype=np.uint8)], top_k=1)
    assert ranked[0][0] in {"street", "beach"} and 0 <= ranked[0][1] <= 1


def test_one_query_decoded_with_two_labels_keeps_its_best_label() -> None:
    from label_studio_sahi.inference.detector import best_class_per_box
    from label_studio_sahi.inference.slicing import Detections

    det = Detections(
        torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 9.0, 9.0]]),
        torch.tensor([0.33, 0.36, 0.9]),
        torch.tensor([1, 0, 1]),
    )
    kept = best_class_per_box(det)
    assert kept.labels.tolist() == [0, 1] and kept.scores.tolist() == pytest.approx([0.36, 0.9])
