"""Task scores: the one number per task that Label Studio sorts and filters tasks by.

Every score is a confidence: higher means the models are surer of the task, 0 means
nothing was found or the image failed. Sorting the data manager by *Prediction score*
ascending therefore puts the tasks the models are least sure of first, whichever score is
chosen (``TASK_SCORE``, or ``task_score="..."`` on any tag of a project's labeling config):

* ``total_uncertainty`` (the default): 1 / (1 + the sum of (1 - score) over everything
  suggested). The sum is about how many suggestions are wrong, so the task with the most
  to correct comes first: a label is worth what the annotator corrects in it. On the
  learning benchmark its order follows the corrections a task needs (boxes to delete or
  draw) far better than any other score's (bench/LOG.md, "active_learning").
* ``mean_confidence``: the mean score of everything suggested: the task as a whole. Its
  order follows the live model's error *rate* (1 - F1), but a crowded task and a sparse
  one of the same doubt score alike, and labelling in its order was no better than
  random order on the benchmark.
* ``least_confidence``: the score of the least confident box or class suggested. One
  doubtful box makes the task doubtful; but on a task with a few boxes it sits just above
  the serving threshold, whatever the task, so it ranks poorly there.
* ``margin``: the smallest gap, over the boxes and class suggestions, between the best
  class probability and the second best. A small gap is a model torn between two
  labels (a truck or a car?), even when both are likely.
* ``disagreement``: how much the whole-image pass and the sliced pass agree, 2 x matched
  boxes / (boxes of one + boxes of the other), boxes matched one to one with the same
  label at IoU >= 0.5; 1 when both find nothing. A sliced backend sees every image twice,
  at two scales: where the two views disagree, the model is unsure of what it sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.settings import TaskScore

MATCH_IOU = 0.5


def task_score(
    method: TaskScore,
    scores: Sequence[float],
    margins: Sequence[float],
    agreement: float | None = None,
) -> float:
    """The task's score by ``method`` from its items' scores and margins (one each per box
    and class suggestion) and, for ``disagreement``, the two passes' agreement."""
    if method == "disagreement":
        return 1.0 if agreement is None else agreement
    values = list(margins if method == "margin" else scores)
    if not values:
        return 0.0
    if method == "mean_confidence":
        return sum(values) / len(values)
    if method == "total_uncertainty":
        return 1 / (1 + sum(1 - v for v in values))
    return min(values)


def one_to_one_matches(a: Detections, b: Detections) -> int:
    """How many of ``a``'s boxes match one of ``b``'s, one to one: the same label, IoU >=
    MATCH_IOU, ``a``'s surest first, each taking the best overlap still free (as an
    annotator accepts suggestions against what is there)."""
    if len(a) == 0 or len(b) == 0:
        return 0
    iou = box_iou(a.boxes.float(), b.boxes.float())
    iou[a.labels[:, None] != b.labels[None, :]] = 0
    taken = torch.zeros(len(b), dtype=torch.bool)
    for i in torch.argsort(a.scores, descending=True).tolist():
        row = iou[i].clone()
        row[taken] = 0
        j = int(row.argmax())
        if row[j] >= MATCH_IOU:
            taken[j] = True
    return int(taken.sum())


def agreement(a: Detections, b: Detections) -> float:
    """2 x one-to-one matches (same label, IoU >= MATCH_IOU, surest first) / (|a| + |b|)."""
    if len(a) + len(b) == 0:
        return 1.0
    return 2 * one_to_one_matches(a, b) / (len(a) + len(b))
