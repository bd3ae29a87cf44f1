"""Slice windows and merging, checked against sahi's own implementation."""

from __future__ import annotations

import pytest
import torch
from sahi.postprocess.combine import GreedyNMMPostprocess, NMMPostprocess, NMSPostprocess
from sahi.prediction import ObjectPrediction
from sahi.slicing import get_slice_bboxes

from label_studio_sahi.inference import slicing
from label_studio_sahi.inference.slicing import (
    Detections,
    auto_slice_size,
    clip_boxes,
    merge_detections,
    pairwise_overlap,
    slice_windows,
    windows_per_side,
)
from label_studio_sahi.settings import MatchMetric
from testkit.sahi_reference import assert_same_detections

SAHI_POSTPROCESS = {"NMS": NMSPostprocess, "NMM": NMMPostprocess, "GREEDYNMM": GreedyNMMPostprocess}


@pytest.mark.parametrize(
    ("height", "width", "size", "overlap"),
    [
        (3000, 4000, 512, 0.2),
        (1500, 2000, 640, 0.25),
        (512, 512, 512, 0.2),
        (300, 200, 512, 0.2),
        (1000, 1030, 256, 0.0),
        (999, 1001, 333, 0.5),
    ],
)
def test_windows_equal_sahis(height: int, width: int, size: int, overlap: float) -> None:
    ours = slice_windows(height, width, size, size, overlap, overlap).tolist()
    theirs = get_slice_bboxes(height, width, size, size, False, overlap, overlap)
    assert ours == theirs


def test_windows_cover_the_image_and_stay_inside() -> None:
    windows = slice_windows(3000, 4000, 512, 512, 0.2, 0.2)
    assert windows[:, 0].min() == 0 and windows[:, 1].min() == 0
    assert windows[:, 2].max() == 4000 and windows[:, 3].max() == 3000
    assert ((windows[:, 2] - windows[:, 0]) == 512).all()
    assert len(windows) == windows_per_side(3000, 512, 0.2) * windows_per_side(4000, 512, 0.2)


def test_auto_slicing_keeps_small_images_whole_and_cuts_large_ones() -> None:
    assert auto_slice_size(600, 800) == (600, 800)
    assert slice_windows(600, 800, None, None).tolist() == [[0, 0, 800, 600]]
    assert auto_slice_size(3000, 4000) == (1024, 1024)
    assert auto_slice_size(1500, 2000) == (750, 750)
    assert len(slice_windows(3000, 4000, None, None, 0.2, 0.2)) > 1


def test_bad_overlap_is_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        slice_windows(100, 100, 50, 50, 1.0, 0.2)


def test_ios_is_intersection_over_the_smaller_box() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 7.0, 7.0]])
    assert pairwise_overlap(boxes, "IOS")[0, 1] == pytest.approx(1.0)
    assert pairwise_overlap(boxes, "IOU")[0, 1] == pytest.approx(4 / 100)


def test_clip_boxes() -> None:
    clipped = clip_boxes(torch.tensor([[-5.0, 2.0, 120.0, 50.0]]), width=100, height=40)
    assert clipped.tolist() == [[0.0, 2.0, 100.0, 40.0]]


def _random_detections(seed: int, n: int = 60) -> Detections:
    """Clusters of jittered boxes, as windows' duplicates of the same objects look."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(8, 2, generator=g) * 900 + 50
    pick = torch.randint(0, 8, (n,), generator=g)
    wh = torch.rand(n, 2, generator=g) * 60 + 10
    xy = centers[pick] + torch.randn(n, 2, generator=g) * 8
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1).clamp(min=0)
    scores = torch.rand(n, generator=g) * 0.7 + 0.3
    labels = torch.randint(0, 3, (n,), generator=g)
    return Detections(boxes, scores, labels)


def _sahi_merge(
    det: Detections, kind: str, metric: str, threshold: float, agnostic: bool
) -> Detections:
    preds = [
        ObjectPrediction(bbox=b, category_id=int(c), score=float(s), category_name=str(int(c)))
        for b, s, c in zip(
            det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
        )
    ]
    merged = SAHI_POSTPROCESS[kind](
        match_threshold=threshold, match_metric=metric, class_agnostic=agnostic
    )(preds)
    return Detections(
        torch.tensor([p.bbox.to_xyxy() for p in merged], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([p.score.value for p in merged], dtype=torch.float32),
        torch.tensor([p.category.id for p in merged], dtype=torch.int64),
    )


@pytest.mark.parametrize("kind", ["NMS", "NMM", "GREEDYNMM"])
@pytest.mark.parametrize("metric", ["IOU", "IOS"])
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_equals_sahis(kind: str, metric: str, agnostic: bool, seed: int) -> None:
    det = _random_detections(seed)
    ours = merge_detections(det, kind, metric, 0.5, agnostic)  # type: ignore[arg-type]
    theirs = _sahi_merge(det, kind, metric, 0.5, agnostic)
    assert_same_detections(ours, theirs)


def test_greedy_merge_unions_boxes_and_keeps_the_best_score_and_label() -> None:
    det = Detections(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 12.0, 12.0], [50.0, 50.0, 60.0, 60.0]]),
        torch.tensor([0.9, 0.6, 0.8]),
        torch.tensor([1, 1, 1]),
    )
    merged = merge_detections(det, "GREEDYNMM", "IOS", 0.5, False)
    assert merged.boxes.tolist() == [[0.0, 0.0, 12.0, 12.0], [50.0, 50.0, 60.0, 60.0]]
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8])


def test_class_aware_merge_keeps_overlapping_boxes_of_other_classes() -> None:
    det = Detections(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([0, 1]),
    )
    assert len(merge_detections(det, "NMS", "IOU", 0.5, class_agnostic=False)) == 2
    assert len(merge_detections(det, "NMS", "IOU", 0.5, class_agnostic=True)) == 1


@pytest.mark.parametrize("metric", ["IOS", "IOU"])
def test_a_merge_of_more_boxes_than_one_block_matches_the_whole_matrix_at_once(
    metric: MatchMetric, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The overlaps are built a block of rows at a time so that tens of thousands of boxes
    # fit in memory; the blocks must add up to the matrix computed in one go.
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=gen) * 30], dim=1)
    det = Detections(
        boxes, torch.rand(300, generator=gen), torch.randint(0, 3, (300,), generator=gen)
    )
    whole = merge_detections(det, "GREEDYNMM", metric, 0.3)
    monkeypatch.setattr(slicing, "MATCH_BLOCK_ROWS", 7)
    blocked = merge_detections(det, "GREEDYNMM", metric, 0.3)
    assert len(whole) < 300  # boxes were merged
    assert torch.equal(whole.boxes, blocked.boxes) and torch.equal(whole.labels, blocked.labels)
    assert torch.equal(slicing.nms_keep(det, metric, 0.3, False), nms_keep_whole(det, metric))


def nms_keep_whole(det: Detections, metric: MatchMetric) -> torch.Tensor:
    """NMS from the overlap matrix computed in one go, as a reference."""
    overlap = pairwise_overlap(det.boxes, metric) * (det.labels[:, None] == det.labels[None, :])
    suppressed = torch.zeros(len(det), dtype=torch.bool)
    keep: list[int] = []
    for idx in slicing.score_order(det).tolist():
        if not suppressed[idx]:
            keep.append(idx)
            suppressed |= overlap[idx] >= 0.3
    return torch.tensor(keep, dtype=torch.int64)
