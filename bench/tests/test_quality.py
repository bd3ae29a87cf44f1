"""The learning benchmark's path stays alive: a tiny run of bench/quality.py through the real
job, and its data generator. Its numbers are checked for sanity, not for quality (that is
the benchmark's job, on its full size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import quality
from label_studio_sahi.labelstudio.label_config import parse_label_config
from testkit import scenes as quality_data


def test_the_generator_is_seeded_and_its_export_is_label_studio_s() -> None:
    a, b = quality_data.target_scene(5), quality_data.target_scene(5)
    assert a.boxes == b.boxes and a.image.tobytes() == b.image.tobytes()
    assert quality_data.target_scene(6).boxes != a.boxes
    assert a.image.size in {(1600, 1200), (1800, 1350), (2048, 1536)} and 6 <= len(a.boxes) <= 14
    # 8-48 px on the long side; persons and trucks are half as wide as long.
    assert all(8 <= max(x2 - x1, y2 - y1) <= 48 for x1, y1, x2, y2 in a.boxes)
    config = parse_label_config(quality_data.LABEL_CONFIG)
    from label_studio_sahi.labelstudio.label_config import annotation_boxes

    boxes = annotation_boxes(quality_data.export_result(a), config.rectangles[0].name)
    assert len(boxes) == len(a.boxes)
    (label, (x1, y1, x2, y2)) = boxes[0]
    assert label == quality_data.LABEL_OF[a.classes[0]]
    assert (round(x1), round(y1), round(x2), round(y2)) == a.boxes[0]


def test_the_test_split_never_meets_a_project_image() -> None:
    project = set(quality_data.project_seeds(0, 100)) | set(quality_data.project_seeds(2, 100))
    assert not project & set(quality_data.test_seeds(50))


def test_acceptance_counts_boxes_an_annotator_need_not_draw() -> None:
    import numpy as np
    import torch

    from label_studio_sahi.inference.slicing import Detections

    split = quality.TestSplit(
        [np.zeros((10, 10, 3))], [([(0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0)], [0, 1])],
        [(40, 40)],
    )  # fmt: skip
    found = Detections(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 30, 9, 39]]),
        torch.tensor([0.9, 0.8, 0.7]),
        torch.tensor([0, 0, 1]),  # the second box has the wrong label; the third is nothing
    )
    accept, edit = quality.acceptance_and_edits([found], split, threshold=0.5)
    assert accept == 0.5 and edit == 2.0
    assert quality.acceptance_and_edits([found], split, threshold=0.95) == (0.0, 0.0)


def test_set_changes_any_setting_the_job_reads_the_window_size_included() -> None:
    from label_studio_sahi.settings import Settings

    values = quality.served_values(
        {"slice_width": "512", "slice_height": "512", "train_epochs": "6"}
    )
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type]
    assert (settings.slice_width, settings.slice_height, settings.train_epochs) == (512, 512, 6.0)
    # Unset, the windows are the defaults a user gets: the detector's own size.
    assert Settings(_env_file=None, **quality.served_values({})).slice_width is None  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_tiny_benchmark_run_produces_sane_numbers(tmp_path: Path, source_base_dir: Path) -> None:
    assert source_base_dir.is_dir()
    out = tmp_path / "quality"
    code = quality.main(
        ["--seeds", "0", "--rounds", "4", "--test-images", "2", "--tiny", "--out", str(out)]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["labels"] for r in rows] == [0, 4]
    assert rows[0]["status"] == "base" and rows[1]["status"] in {"accepted", "rejected"}
    for row in rows:
        assert 0 <= row["map"] <= row["map_50"] <= 1 and 0 <= row["accept"] <= 1
        assert row["edit"] >= 0
    # The base stands in for a pretrained checkpoint: it already finds objects (about a
    # fifth of them at the serving threshold, among many false ones).
    assert rows[0]["accept"] > 0.1 and rows[0]["map_50"] > 0, rows[0]
    assert rows[1]["windows"] > 0 and rows[1]["steps"] == 20
    assert (out / "learning_curve.png").stat().st_size > 5000


def test_a_promoted_round_that_scores_below_its_parent_is_reported() -> None:
    rows = [
        {"seed": 0, "labels": 0, "status": "base", "map_50": 0.10},
        {"seed": 0, "labels": 10, "status": "accepted", "map_50": 0.30},
        {"seed": 0, "labels": 25, "status": "rejected", "map_50": 0.30},
        {"seed": 0, "labels": 50, "status": "accepted", "map_50": 0.25},
        {"seed": 1, "labels": 0, "status": "base", "map_50": 0.10},
        {"seed": 1, "labels": 10, "status": "accepted", "map_50": 0.12},
    ]
    assert quality.promoted_below_parent(rows) == ["seed 0, 50 labels: 0.250 < 0.300"]
