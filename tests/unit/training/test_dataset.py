"""Training data: annotation choice, held-out split, training windows and held-out metrics."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from PIL import Image
from sahi.slicing import process_coco_annotations
from sahi.utils.coco import CocoAnnotation

from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.training.dataset import (
    LabelledTask,
    crop,
    holdout_hash,
    labelled_tasks,
    split_holdout,
    training_windows,
)
from label_studio_sahi.training.evaluate import classification_accuracy, detection_metrics

CONFIG = parse_label_config(
    """
    <View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="car"/><Label value="person"/>
      </RectangleLabels>
      <Choices name="scene" toName="image">
        <Choice value="street"/><Choice value="field"/>
      </Choices>
    </View>
    """
)


def rect(label: str, x: float, y: float, w: float, h: float, from_name: str = "label") -> dict:
    """A rectangle on a 1000x500 image, given in pixels."""
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 1000,
        "original_height": 500,
        "value": {
            "x": x / 10,
            "y": y / 5,
            "width": w / 10,
            "height": h / 5,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def choice(value: str) -> dict:
    return {
        "from_name": "scene",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [value]},
    }


def annotation(
    ann_id: int,
    result: list[dict],
    updated_at: str = "2024-01-01T00:00:00Z",
    *,
    cancelled: bool = False,
    ground_truth: bool = False,
) -> dict:
    return {
        "id": ann_id,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": ground_truth,
        "updated_at": updated_at,
    }


def task(task_id: int, *annotations: dict, image: Any = "/data/upload/1/a.png") -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": list(annotations)}


# --------------------------------------------------------------------------- labelled tasks


def test_cancelled_annotations_are_dropped() -> None:
    export = [
        task(
            1,
            annotation(10, [rect("car", 0, 0, 10, 10)], "2024-01-01T00:00:00Z"),
            annotation(11, [rect("person", 0, 0, 10, 10)], "2024-06-01T00:00:00Z", cancelled=True),
        ),
        task(2, annotation(20, [rect("car", 0, 0, 10, 10)], cancelled=True)),
    ]
    tasks = labelled_tasks(export, CONFIG)
    assert [t.task_id for t in tasks] == [1]
    assert tasks[0].annotation_id == 10
    assert tasks[0].boxes == (("car", (0.0, 0.0, 10.0, 10.0)),)


def test_ground_truth_is_preferred_over_a_newer_annotation() -> None:
    export = [
        task(
            1,
            annotation(10, [rect("car", 0, 0, 10, 10)], "2024-01-01T00:00:00Z", ground_truth=True),
            annotation(11, [rect("person", 0, 0, 10, 10)], "2025-01-01T00:00:00Z"),
        )
    ]
    (only,) = labelled_tasks(export, CONFIG)
    assert only.annotation_id == 10
    assert only.updated_at == "2024-01-01T00:00:00Z"
    assert [label for label, _ in only.boxes] == ["car"]


def test_the_most_recent_annotation_is_chosen_otherwise() -> None:
    export = [
        task(
            1,
            annotation(12, [rect("car", 0, 0, 10, 10)], "2024-03-01T08:00:00.000000Z"),
            annotation(11, [rect("person", 5, 5, 10, 10)], "2024-03-01T09:30:00.123456Z"),
            annotation(10, [choice("field")], "2024-02-01T00:00:00Z"),
        )
    ]
    (only,) = labelled_tasks(export, CONFIG)
    assert only.annotation_id == 11
    assert only.boxes == (("person", (5.0, 5.0, 15.0, 15.0)),)
    assert only.choices == ()


def test_tasks_without_usable_labels_are_dropped() -> None:
    export = [
        task(5, annotation(50, [choice("street")])),
        task(4, annotation(40, [])),  # empty annotation
        task(3),  # no annotation
        task(2, annotation(20, [rect("car", 0, 0, 10, 10)]), image=None),  # no image URL
        task(1, annotation(10, [rect("car", 0, 0, 10, 10)]), image=123),
        # the newest annotation is empty: the task is dropped, not trained on an older one
        task(
            6,
            annotation(60, [rect("car", 0, 0, 10, 10)], "2024-01-01T00:00:00Z"),
            annotation(61, [], "2024-02-01T00:00:00Z"),
        ),
        task(0, annotation(1, [rect("car", 0, 0, 10, 10)])),
    ]
    tasks = labelled_tasks(export, CONFIG)
    assert [t.task_id for t in tasks] == [0, 5]  # sorted by id
    assert tasks[1].choices == ("street",)
    assert tasks[1].boxes == ()
    assert all(isinstance(t, LabelledTask) for t in tasks)


def test_labels_not_in_the_config_are_dropped() -> None:
    other_tag = rect("car", 0, 0, 10, 10, from_name="other")
    export = [
        task(1, annotation(10, [rect("truck", 0, 0, 10, 10), choice("forest"), other_tag])),
        task(
            2,
            annotation(20, [rect("truck", 0, 0, 10, 10), rect("car", 100, 50, 200, 100)]),
        ),
    ]
    (only,) = labelled_tasks(export, CONFIG)
    assert only.task_id == 2
    assert only.boxes == (("car", (100.0, 50.0, 300.0, 150.0)),)


def test_choices_only_config_takes_the_image_from_the_choices_tag() -> None:
    config = parse_label_config(
        '<View><Image name="img" value="$photo"/>'
        '<Choices name="scene" toName="img"><Choice value="street"/></Choices></View>'
    )
    export = [
        {
            "id": 7,
            "data": {"photo": "http://x/p.jpg"},
            "annotations": [annotation(1, [choice("street")])],
        }
    ]
    (only,) = labelled_tasks(export, config)
    assert (only.image_url, only.choices, only.boxes) == ("http://x/p.jpg", ("street",), ())


# --------------------------------------------------------------------------- split


def ids(tasks: list[LabelledTask]) -> set[int]:
    return {t.task_id for t in tasks}


def make_tasks(task_ids: range | list[int]) -> list[LabelledTask]:
    return [LabelledTask(i, f"/img/{i}.png", (), ("street",), None, None) for i in task_ids]


def test_split_is_deterministic_and_by_hash_of_the_task_id() -> None:
    tasks = make_tasks(range(1, 201))
    train, held = split_holdout(tasks, 0.2)
    assert split_holdout(list(reversed(tasks)), 0.2)[1] == list(reversed(held))
    assert ids(held) == {t.task_id for t in tasks if holdout_hash(t.task_id) < 0.2}
    assert ids(train) | ids(held) == set(range(1, 201))
    assert not ids(train) & ids(held)
    assert 20 <= len(held) <= 60  # about a fifth
    assert all(0.0 <= holdout_hash(i) < 1.0 for i in range(1000))


def test_existing_tasks_keep_their_side_when_tasks_are_added() -> None:
    before_train, before_held = split_holdout(make_tasks(range(1, 51)), 0.2)
    assert before_train and before_held
    after_train, after_held = split_holdout(make_tasks(range(1, 501)), 0.2)
    assert ids(before_train) <= ids(after_train)
    assert ids(before_held) <= ids(after_held)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.99, 1.0])
def test_split_never_leaves_either_side_empty_for_two_or_more_tasks(
    count: int, fraction: float
) -> None:
    for start in range(0, 200, 7):
        train, held = split_holdout(make_tasks(range(start, start + count)), fraction)
        assert held and train
        assert len(train) + len(held) == count


def test_split_moves_the_smallest_hash_into_held_out_when_none_falls_there() -> None:
    tasks = make_tasks([3, 4])
    smallest = min(tasks, key=lambda t: holdout_hash(t.task_id))
    assert split_holdout(tasks, 0.0)[1] == [smallest]


def test_a_single_task_trains_and_nothing_is_held_out() -> None:
    (one,) = make_tasks([1])
    assert split_holdout([one], 0.99) == ([one], [])
    assert split_holdout([], 0.2) == ([], [])


# --------------------------------------------------------------------------- windows


def windows_of(
    size: tuple[int, int],
    boxes: Sequence[tuple[str, Sequence[float]]],
    **kwargs: Any,
) -> list:
    options: dict[str, Any] = {
        "slice_height": 100,
        "slice_width": 100,
        "overlap_height_ratio": 0.0,
        "overlap_width_ratio": 0.0,
        "min_area_ratio": 0.1,
        "negative_ratio": 1.0,
        "include_full_image": False,
    }
    options.update(kwargs)
    return training_windows([size], [boxes], **options)


def test_a_box_cut_by_a_window_edge_is_kept_when_enough_of_it_remains() -> None:
    # 200x100 image: windows (0,0,100,100) and (100,0,200,100). The box has 70 % of its
    # area in the left window and 30 % in the right one.
    result = windows_of((200, 100), [("car", (30.0, 10.0, 130.0, 20.0))], min_area_ratio=0.3)
    assert [(w.window, w.boxes, w.labels) for w in result] == [
        ((0, 0, 100, 100), ((30.0, 10.0, 100.0, 20.0),), ("car",)),
        ((100, 0, 200, 100), ((0.0, 10.0, 30.0, 20.0),), ("car",)),
    ]


def test_a_box_cut_by_a_window_edge_is_dropped_when_too_little_remains() -> None:
    result = windows_of(
        (200, 100), [("car", (30.0, 10.0, 130.0, 20.0))], min_area_ratio=0.31, negative_ratio=0.0
    )
    assert [(w.window, w.boxes) for w in result] == [
        ((0, 0, 100, 100), ((30.0, 10.0, 100.0, 20.0),))
    ]


def test_boxes_are_given_in_window_coordinates() -> None:
    # 300x300 image, 3x3 windows; a box fully inside the centre window.
    result = windows_of((300, 300), [("person", (120.5, 140.0, 180.0, 190.25))], negative_ratio=0)
    (only,) = result
    assert only.window == (100, 100, 200, 200)
    assert only.boxes == ((20.5, 40.0, 80.0, 90.25),)
    assert only.labels == ("person",)
    assert only.task_index == 0


def test_a_box_touching_a_window_only_at_its_edge_is_not_in_it() -> None:
    result = windows_of((200, 100), [("car", (50.0, 10.0, 100.0, 20.0))], min_area_ratio=0.0)
    assert [w.window for w in result if w.boxes] == [(0, 0, 100, 100)]


def test_the_full_image_is_added_as_a_window_when_the_image_is_sliced() -> None:
    boxes = [("car", (30.0, 10.0, 130.0, 20.0))]
    result = windows_of((200, 100), boxes, include_full_image=True, min_area_ratio=0.5)
    assert [w.window for w in result] == [(0, 0, 100, 100), (100, 0, 200, 100), (0, 0, 200, 100)]
    assert result[-1].boxes == ((30.0, 10.0, 130.0, 20.0),)
    # One window already is the full image: not added twice.
    small = windows_of((80, 60), boxes, include_full_image=True)
    assert [w.window for w in small] == [(0, 0, 80, 60)]


def test_window_clipping_matches_sahis_slice_rule_for_integer_boxes() -> None:
    rng = random.Random(3)
    width, height = 250, 180
    corners: list[tuple[int, int, int, int]] = []
    for _ in range(40):
        x, y = rng.randrange(0, width - 5), rng.randrange(0, height - 5)
        w, h = rng.randrange(1, 90), rng.randrange(1, 90)
        corners.append((x, y, min(width, x + w), min(height, y + h)))
    boxes = [("car", tuple(float(v) for v in c)) for c in corners]
    for ratio in (0.0, 0.1, 0.5, 0.9):
        ours = windows_of(
            (width, height), boxes, slice_height=64, slice_width=96,
            overlap_height_ratio=0.25, overlap_width_ratio=0.2, min_area_ratio=ratio,
        )  # fmt: skip
        assert len(ours) == 12  # negatives kept: every window is there
        coco = [
            CocoAnnotation(bbox=[x1, y1, x2 - x1, y2 - y1], category_id=0, category_name="car")
            for x1, y1, x2, y2 in corners
        ]
        for window in ours:
            theirs = process_coco_annotations(coco, list(window.window), ratio)
            expected = sorted(tuple(float(v) for v in a.bbox) for a in theirs)
            got = sorted((x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in window.boxes)
            assert got == expected


def test_negative_windows_are_kept_at_the_configured_ratio() -> None:
    sizes = [(1000, 1000)] * 4  # 100 windows each, all empty
    boxes: list[list] = [[]] * 4
    options: dict[str, Any] = {
        "slice_height": 100,
        "slice_width": 100,
        "overlap_height_ratio": 0.0,
        "overlap_width_ratio": 0.0,
        "min_area_ratio": 0.1,
        "include_full_image": False,
    }

    def keys(ratio: float, seed: int = 0) -> list[tuple[int, tuple[int, ...]]]:
        kept = training_windows(sizes, boxes, negative_ratio=ratio, seed=seed, **options)
        assert all(w.boxes == () and w.labels == () for w in kept)
        return [(w.task_index, w.window) for w in kept]

    assert keys(0.0) == []
    assert len(keys(1.0)) == 400
    quarter = keys(0.25)
    assert 70 <= len(quarter) <= 130
    assert keys(0.25) == quarter  # deterministic for a seed
    assert keys(0.25, seed=1) != quarter
    assert set(quarter) <= set(keys(0.5))  # a higher ratio keeps a superset


def test_windows_with_boxes_are_always_kept() -> None:
    boxes = [("car", (10.0, 10.0, 20.0, 20.0)), ("person", (310.0, 210.0, 330.0, 240.0))]
    result = windows_of((400, 300), boxes, negative_ratio=0.0)
    assert [(w.window, w.labels) for w in result] == [
        ((0, 0, 100, 100), ("car",)),
        ((300, 200, 400, 300), ("person",)),
    ]


def test_windows_index_their_image() -> None:
    result = training_windows(
        [(100, 100), (200, 100)],
        [[("car", (0.0, 0.0, 50.0, 50.0))], [("car", (150.0, 0.0, 190.0, 50.0))]],
        slice_height=100,
        slice_width=100,
        overlap_height_ratio=0.0,
        overlap_width_ratio=0.0,
        min_area_ratio=0.1,
        negative_ratio=0.0,
    )
    assert [(w.task_index, w.window) for w in result] == [
        (0, (0, 0, 100, 100)),
        (1, (100, 0, 200, 100)),
        (1, (0, 0, 200, 100)),
    ]
    with pytest.raises(ValueError, match="box lists"):
        training_windows([(10, 10)], [], slice_height=8, slice_width=8, overlap_height_ratio=0,
                         overlap_width_ratio=0, min_area_ratio=0.1, negative_ratio=0)  # fmt: skip


def test_crop_cuts_the_window_out() -> None:
    image = Image.new("RGB", (50, 40))
    image.putpixel((12, 7), (255, 0, 0))
    piece = crop(image, (10, 5, 30, 25))
    assert piece.size == (20, 20)
    assert piece.getpixel((2, 2)) == (255, 0, 0)
    with pytest.raises(ValueError, match="not inside"):
        crop(image, (0, 0, 60, 10))


# --------------------------------------------------------------------------- metrics


def dets(
    boxes: list[list[float]], labels: list[int], scores: list[float] | None = None
) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores or [0.9] * len(boxes), dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


LARGE = [(0.0, 0.0, 100.0, 100.0), (200.0, 50.0, 300.0, 130.0)]


def test_perfect_predictions_score_one() -> None:
    truths = [(LARGE, [0, 1]), ([], [])]  # the second image has nothing, and nothing is found
    predictions = [dets([list(b) for b in LARGE], [0, 1]), Detections.empty()]
    metrics = detection_metrics(predictions, truths, num_classes=2)
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map_small"] is None  # no small objects
    assert (metrics["images"], metrics["boxes"]) == (2, 2)


def test_no_predictions_score_zero() -> None:
    truths = [(LARGE, [0, 1]), ([(5.0, 5.0, 15.0, 15.0)], [0])]
    metrics = detection_metrics([Detections.empty(), Detections.empty()], truths, num_classes=2)
    assert (metrics["map"], metrics["map_50"], metrics["map_small"]) == (0.0, 0.0, 0.0)


def test_no_ground_truth_at_all_scores_zero_with_no_boxes() -> None:
    metrics = detection_metrics([dets([[0, 0, 10, 10]], [0])], [([], [])], num_classes=1)
    assert metrics == {"map": 0.0, "map_50": 0.0, "map_small": None, "images": 1, "boxes": 0}
    assert detection_metrics([], [], num_classes=1)["images"] == 0


def test_shifted_boxes_score_at_iou_half_but_not_on_average() -> None:
    # Shifted by a fifth of the width: IoU 8000 / 12000 = 0.67, matched at 0.50 ... 0.65.
    truths = [([(0.0, 0.0, 100.0, 100.0)], [0])]
    metrics = detection_metrics([dets([[20, 0, 120, 100]], [0])], truths, num_classes=1)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(0.4)


def test_small_objects_have_their_own_ap() -> None:
    small = [(10.0, 10.0, 30.0, 30.0), (400.0, 400.0, 420.0, 425.0)]  # 400 and 500 px²
    truths = [(small + LARGE, [0, 0, 0, 1])]
    found = dets([list(b) for b in small + LARGE], [0, 0, 0, 1])
    metrics = detection_metrics([found], truths, num_classes=2, image_sizes=[(640, 480)])
    assert metrics["map_small"] == pytest.approx(1.0)
    only_large = dets([list(b) for b in LARGE], [0, 1])
    assert detection_metrics([only_large], truths, num_classes=2)["map_small"] == 0.0


def test_a_wrong_class_prediction_scores_zero() -> None:
    truths = [([(0.0, 0.0, 100.0, 100.0)], [0])]
    metrics = detection_metrics([dets([[0, 0, 100, 100]], [1])], truths, num_classes=2)
    assert (metrics["map"], metrics["map_50"]) == (0.0, 0.0)


def test_detection_metrics_refuse_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="ground truths"):
        detection_metrics([Detections.empty()], [], num_classes=1)
    with pytest.raises(ValueError, match="outside"):
        detection_metrics([Detections.empty()], [([(0.0, 0.0, 1.0, 1.0)], [3])], num_classes=2)


def test_classification_accuracy() -> None:
    assert classification_accuracy(["a", None, "b", "c"], ["a", "b", "b", "a"]) == 0.5
    assert classification_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        classification_accuracy(["a"], [])
