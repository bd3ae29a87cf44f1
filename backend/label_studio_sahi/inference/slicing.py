"""Slice windows and box merging for slicing-aided inference: pure tensor geometry.

Nothing here knows about models. Windows are ``(x1, y1, x2, y2)`` integer boxes in image
pixels; detections are float ``(x1, y1, x2, y2)`` boxes with a score and an integer label.
The window layout and the three merge strategies follow sahi's definitions
(``sahi.slicing.get_slice_bboxes``, ``sahi.postprocess.combine``) so that results are
comparable box for box; tests check this against sahi itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, box_area, box_iou, nms

# The merge names are settings (MERGE_TYPE, MERGE_METRIC); settings.py defines them once,
# free of torch, and the geometry here uses them.
from label_studio_sahi.settings import MatchMetric, MergeType

# Automatic slicing: windows near the input size DETR-family models are trained at, never
# smaller than AUTO_MIN_SLICE (objects would be cut too often) nor larger than AUTO_MAX_SLICE.
AUTO_MIN_SLICE = 320
AUTO_MAX_SLICE = 1024
# Images whose longer side fits in this many pixels are run whole: slicing gains nothing.
AUTO_NO_SLICE_BELOW = 1024
# SLICE_*=auto with a detector: windows of its input size, at most sahi's 512 px. A window
# larger than the input is shrunk into it, objects with it, and fine-tuning stops paying:
# with a 128 px input, 256 and 512 px windows gained nothing from 10 labels (median of 3
# seeds) where 64 and 128 px ones gained 6-25x the base's test mAP@.5 (bench/LOG.md,
# "Geometry").
AUTO_MAX_WINDOW = 512
# Rows of the box-to-box overlap computed at once when merging: 1024 x N floats at a time.
MATCH_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class Detections:
    """Boxes ``[N, 4]`` (x1, y1, x2, y2 float), scores ``[N]`` and labels ``[N]`` (int64);
    ``margins`` ``[N]``, when the detector gives them: the box's best class probability
    minus its second best (the margin task score)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    margins: torch.Tensor | None = None

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Detections:
        return Detections(
            torch.zeros((0, 4), device=device),
            torch.zeros((0,), device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
        )

    @staticmethod
    def cat(parts: list[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        margins = [p.margins for p in parts]
        return Detections(
            torch.cat([p.boxes.float() for p in parts]),
            torch.cat([p.scores.float() for p in parts]),
            torch.cat([p.labels for p in parts]),
            None if any(m is None for m in margins) else torch.cat(margins),  # type: ignore[arg-type]
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        margins = None if self.margins is None else self.margins.to(device)
        return Detections(
            self.boxes.to(device), self.scores.to(device), self.labels.to(device), margins
        )

    def select(self, index: torch.Tensor) -> Detections:
        margins = None if self.margins is None else self.margins[index]
        return Detections(self.boxes[index], self.scores[index], self.labels[index], margins)

    def shifted(self, dx: int, dy: int) -> Detections:
        offset = torch.tensor([dx, dy, dx, dy], dtype=self.boxes.dtype, device=self.boxes.device)
        return Detections(self.boxes + offset, self.scores, self.labels, self.margins)


def _axis_starts(length: int, size: int, overlap: int) -> list[int]:
    """Window starts along one axis: step ``size - overlap``, last window flush with the edge."""
    starts: list[int] = []
    start = 0
    while True:
        end = start + size
        if end >= length:
            # The last window is moved back to end at the edge, so every window has the
            # full size (sahi does the same); an image smaller than a window gets one.
            starts.append(max(0, length - size))
            return starts
        starts.append(start)
        start = end - overlap


def model_window(input_height: int, input_width: int) -> int:
    """The window side ``SLICE_*=auto`` gives a detector whose input is this size: its
    shorter side, at most ``AUTO_MAX_WINDOW`` (windows are upscaled or kept, never shrunk)."""
    return min(AUTO_MAX_WINDOW, input_height, input_width)


def shrink_factor(slice_size: int, input_side: int) -> float:
    """How many times a window's side is shrunk on its way into the model (1: not)."""
    return max(1.0, slice_size / input_side)


def auto_slice_size(height: int, width: int) -> tuple[int, int]:
    """Window size chosen from the image size alone (used when no size is configured).

    Images up to ``AUTO_NO_SLICE_BELOW`` px on their longer side are one window. Larger
    ones get square windows of half the shorter side, clamped to
    ``[AUTO_MIN_SLICE, AUTO_MAX_SLICE]``: a 4000x3000 photo gets 1024 px windows, a
    2000x1500 one 750 px windows.
    """
    if max(height, width) <= AUTO_NO_SLICE_BELOW:
        return height, width
    side = min(AUTO_MAX_SLICE, max(AUTO_MIN_SLICE, min(height, width) // 2))
    return min(side, height), min(side, width)


def slice_windows(
    height: int,
    width: int,
    slice_height: int | None = 512,
    slice_width: int | None = 512,
    overlap_height_ratio: float = 0.2,
    overlap_width_ratio: float = 0.2,
) -> torch.Tensor:
    """Overlapping windows covering an image, row by row.

    Args:
        height, width: image size in pixels.
        slice_height, slice_width: window size; ``None`` for either picks both from the
            image size (``auto_slice_size``).
        overlap_height_ratio, overlap_width_ratio: overlap of neighbouring windows as a
            fraction of the window size (``int(ratio * size)`` pixels, as sahi rounds).

    Returns:
        ``[N, 4]`` int64 tensor of ``(x1, y1, x2, y2)``; windows of an image smaller than
        the window size are clipped to the image.

    Raises:
        ValueError: on a non-positive size or an overlap ratio outside ``[0, 1)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not (0 <= overlap_height_ratio < 1 and 0 <= overlap_width_ratio < 1):
        raise ValueError("overlap ratios must be in [0, 1)")
    if slice_height is None or slice_width is None:
        slice_height, slice_width = auto_slice_size(height, width)
    if slice_height <= 0 or slice_width <= 0:
        raise ValueError(f"slice size must be positive, got {slice_width}x{slice_height}")
    ys = _axis_starts(height, slice_height, int(overlap_height_ratio * slice_height))
    xs = _axis_starts(width, slice_width, int(overlap_width_ratio * slice_width))
    windows = [
        (x, y, min(width, x + slice_width), min(height, y + slice_height)) for y in ys for x in xs
    ]
    return torch.tensor(windows, dtype=torch.int64)


def pairwise_overlap(
    boxes: torch.Tensor, metric: MatchMetric, others: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, M]`` IoU, or intersection over the smaller box's area (IoS), of ``boxes``
    against ``others`` (against themselves, ``[N, N]``, when ``others`` is None)."""
    others = boxes if others is None else others
    if metric == "IOU":
        return box_iou(boxes, others)
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    smaller = torch.minimum(box_area(boxes)[:, None], box_area(others)[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp(min=1e-12), torch.zeros_like(inter))


def _overlap(a: list[float], b: list[float], metric: MatchMetric) -> float:
    """Overlap of two boxes given as lists; used while a merged box grows."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    denom = area_a + area_b - inter if metric == "IOU" else min(area_a, area_b)
    return inter / denom if denom > 0 else 0.0


def score_order(det: Detections) -> torch.Tensor:
    """Indices by score, highest first; ties broken by x1, y1, x2, y2 so runs repeat."""
    order = torch.arange(len(det), device=det.scores.device)
    # Stable sorts from the least to the most significant key give a lexicographic order.
    for key in (det.boxes[:, 3], det.boxes[:, 2], det.boxes[:, 1], det.boxes[:, 0], -det.scores):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _matches(
    det: Detections, metric: MatchMetric, threshold: float, class_agnostic: bool
) -> torch.Tensor:
    """``[N, N]`` booleans (on the CPU): boxes ``i`` and ``j`` are the same object.

    Built ``MATCH_BLOCK_ROWS`` rows at a time. The float overlaps of all pairs at once, with
    their temporaries, took about 36 bytes a pair: 2.3 GB for 8,000 boxes, and it grows with
    the square. A weak base at 64 px windows leaves 6,600 boxes per image above the serving
    threshold. The booleans take one byte a pair: that merge now peaks 0.5 GB above its
    input."""
    n = len(det)
    out = torch.empty((n, n), dtype=torch.bool)
    for start in range(0, n, MATCH_BLOCK_ROWS):
        rows = slice(start, start + MATCH_BLOCK_ROWS)
        overlap = pairwise_overlap(det.boxes[rows], metric, det.boxes)
        if not class_agnostic:
            # Boxes of different classes never match: the same as running per class.
            overlap = overlap * (det.labels[rows, None] == det.labels[None, :])
        out[rows] = (overlap >= threshold).cpu()
    return out


def nms_keep(
    det: Detections, metric: MatchMetric, threshold: float, class_agnostic: bool
) -> torch.Tensor:
    """Indices kept by non-maximum suppression, highest score first."""
    if len(det) == 0:
        return torch.zeros((0,), dtype=torch.int64)
    if metric == "IOU":
        # torchvision's kernels; they suppress at IoU > threshold (sahi: >=), which only
        # differs for exactly equal overlaps.
        if class_agnostic:
            return nms(det.boxes, det.scores, threshold)
        return batched_nms(det.boxes, det.scores, det.labels, threshold)
    matches = _matches(det, metric, threshold, class_agnostic)
    suppressed = torch.zeros(len(det), dtype=torch.bool)
    keep: list[int] = []
    for idx in score_order(det).tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        suppressed |= matches[idx]
    return torch.tensor(keep, dtype=torch.int64)


def _greedy_groups(matches: torch.Tensor, order: list[int]) -> dict[int, list[int]]:
    """Each unclaimed box, in score order, claims every lower unclaimed box it matches."""
    claimed = torch.zeros(matches.shape[0], dtype=torch.bool)
    rank = torch.empty(matches.shape[0], dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
    groups: dict[int, list[int]] = {}
    for idx in order:
        if claimed[idx]:
            continue
        candidates = matches[idx] & ~claimed & (rank > rank[idx])
        found = candidates.nonzero().flatten()
        members: list[int] = found[torch.argsort(rank[found])].tolist()
        claimed[found] = True
        groups[idx] = members
    return groups


def _transitive_groups(
    matches: torch.Tensor, order: list[int], det: Detections
) -> dict[int, list[int]]:
    """Like greedy groups, but a claimed box also claims for its keeper (chains merge)."""
    n = matches.shape[0]
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(n)
    scores, boxes = det.scores.cpu(), det.boxes.cpu()
    keeper_of = [-1] * n
    groups: dict[int, list[int]] = {}
    for idx in order:
        if keeper_of[idx] < 0:
            keeper_of[idx] = idx
            groups[idx] = []
        keeper = keeper_of[idx]
        others = matches[idx].nonzero().flatten()
        others = others[others != idx]
        # A box may claim those ranked after it (lower score, or equal score sorting later),
        # or an exact duplicate of it. Row by row, as the matches are: no N x N temporaries.
        later = rank[others] > rank[idx]
        duplicate = (scores[others] == scores[idx]) & (boxes[others] == boxes[idx]).all(dim=1)
        for other in others[later | duplicate].tolist():
            if keeper_of[other] < 0:
                keeper_of[other] = keeper
                groups[keeper].append(other)
    return groups


def merge_detections(
    det: Detections,
    merge_type: MergeType = "GREEDYNMM",
    metric: MatchMetric = "IOS",
    threshold: float = 0.5,
    class_agnostic: bool = False,
) -> Detections:
    """Merge boxes found by overlapping windows into one box per object.

    ``NMS`` keeps the best box of each overlapping group. ``GREEDYNMM`` lets each box, in
    score order, absorb the lower boxes it overlaps; ``NMM`` also follows chains (A
    overlaps B overlaps C). Merging replaces the kept box by the union of both boxes, keeps
    the higher score and the label of the higher-scoring box; a member is merged only while
    it still overlaps the growing box above ``threshold``, else dropped (sahi's rule).

    Args:
        det: detections in image coordinates.
        merge_type: ``"NMS"``, ``"NMM"`` or ``"GREEDYNMM"``.
        metric: ``"IOU"`` or ``"IOS"`` (intersection over the smaller box).
        threshold: overlap at which two boxes are the same object.
        class_agnostic: merge boxes of different labels too.

    Returns:
        The merged detections (on the CPU), highest score first.
    """
    det = det.to("cpu")
    if len(det) <= 1:
        return det
    if merge_type == "NMS":
        return det.select(nms_keep(det, metric, threshold, class_agnostic))
    if merge_type not in ("NMM", "GREEDYNMM"):
        raise ValueError(f"unknown merge type {merge_type!r}; use NMS, NMM or GREEDYNMM")
    matches = _matches(det, metric, threshold, class_agnostic)
    order = score_order(det).tolist()
    groups = (
        _greedy_groups(matches, order)
        if merge_type == "GREEDYNMM"
        else _transitive_groups(matches, order, det)
    )
    boxes, scores, labels = det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()
    margins = det.margins.tolist() if det.margins is not None else [0.0] * len(scores)
    out_boxes: list[list[float]] = []
    out_scores: list[float] = []
    out_labels: list[int] = []
    out_margins: list[float] = []
    for keeper, members in groups.items():
        box, score, label = boxes[keeper], scores[keeper], labels[keeper]
        margin = margins[keeper]
        for m in members:
            if _overlap(box, boxes[m], metric) > threshold:
                box = [
                    min(box[0], boxes[m][0]),
                    min(box[1], boxes[m][1]),
                    max(box[2], boxes[m][2]),
                    max(box[3], boxes[m][3]),
                ]
                if score <= scores[m]:  # the label (and its margin) of the surer box
                    label, margin = labels[m], margins[m]
                score = max(score, scores[m])
        out_boxes.append(box)
        out_scores.append(score)
        out_labels.append(label)
        out_margins.append(margin)
    merged = Detections(
        torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(out_scores, dtype=torch.float32),
        torch.tensor(out_labels, dtype=torch.int64),
        torch.tensor(out_margins, dtype=torch.float32) if det.margins is not None else None,
    )
    return merged.select(torch.argsort(merged.scores, descending=True, stable=True))


def clip_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Boxes clamped to ``[0, width] x [0, height]``."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), limits)


def windows_per_side(length: int, size: int, overlap_ratio: float) -> int:
    """How many windows cover ``length`` (for reporting and memory estimates)."""
    if size >= length:
        return 1
    step = size - int(overlap_ratio * size)
    return 1 + math.ceil((length - size) / step)
