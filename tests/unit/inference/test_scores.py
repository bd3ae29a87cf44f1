"""Task scores: each method computes what the README says, from what the models answered,
and a project picks its own in its labeling config."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch

from label_studio_sahi.errors import LabelConfigError
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.scores import agreement, task_score
from label_studio_sahi.inference.sliced import merge_passes, sliced_passes
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor
from label_studio_sahi.settings import TaskScore
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import make_settings
from testkit.tiny_models import draw_scene

BOXES = (
    '<View{attr}><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="car"/><Label value="person"/>'
    "</RectangleLabels></View>"
)


def dets(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return Detections(t[:, :4], t[:, 4], t[:, 5].long())


def test_each_method_reduces_the_items_as_documented() -> None:
    scores, margins = [0.9, 0.4, 0.8], [0.5, 0.3, 0.05]
    assert task_score("least_confidence", scores, margins) == 0.4
    assert task_score("margin", scores, margins) == 0.05
    assert task_score("mean_confidence", scores, margins) == pytest.approx(0.7)
    # 1 / (1 + 0.1 + 0.6 + 0.2): about one suggestion in doubt.
    assert task_score("total_uncertainty", scores, margins) == pytest.approx(1 / 1.9)
    assert task_score("disagreement", scores, margins, agreement=0.25) == 0.25
    for method in ("least_confidence", "margin", "mean_confidence", "total_uncertainty"):
        assert task_score(method, [], []) == 0.0  # nothing found: look at it
    assert task_score("disagreement", [], [], agreement=None) == 1.0  # one view: no conflict


def test_agreement_matches_boxes_one_to_one_by_label_and_iou() -> None:
    whole = dets((0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 1))
    assert agreement(whole, whole) == 1.0
    assert agreement(Detections.empty(), Detections.empty()) == 1.0
    assert agreement(whole, Detections.empty()) == 0.0
    # Same place, other label: no match; one of two matched: 2 x 1 / (2 + 2).
    sliced = dets((0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0))
    assert agreement(whole, sliced) == 0.5
    # Two sliced boxes on one whole-image box: only one can match it.
    doubled = dets((0, 0, 10, 10, 0.9, 0), (1, 1, 10, 10, 0.7, 0))
    assert agreement(dets((0, 0, 10, 10, 0.9, 0)), doubled) == pytest.approx(2 / 3)


def test_a_project_picks_its_score_in_its_labeling_config() -> None:
    assert parse_label_config(BOXES.format(attr="")).task_score is None
    assert parse_label_config(BOXES.format(attr=' task_score="Margin"')).task_score == "margin"
    with pytest.raises(LabelConfigError) as err:
        parse_label_config(BOXES.format(attr=' task_score="entropy"'))
    assert "task_score='entropy'" in str(err.value) and "disagreement" in str(err.value)


def test_box_margins_are_the_querys_best_minus_second_best_class_probability(
    detector: Detector,
) -> None:
    pixels = np.array(draw_scene(128, 128, 4, random.Random(0)).image)
    inputs = detector.preprocess([pixels])
    outputs = detector.forward(inputs)
    found = detector.postprocess(outputs, [(128, 128)], threshold=0.05)[0]
    assert len(found) > 0 and found.margins is not None
    probs = outputs.logits[0].float().sigmoid()  # Conditional DETR: independent sigmoids
    top = probs.topk(2, dim=-1).values
    per_query = (top[:, 0] - top[:, 1]).tolist()
    for score, margin in zip(found.scores.tolist(), found.margins.tolist(), strict=True):
        assert 0.0 <= margin <= score + 1e-6
        assert any(abs(margin - m) < 1e-5 for m in per_query)  # one of the queries' margins


def predictor(bundle: ModelBundle, pixels: np.ndarray, **settings: Any) -> Predictor:
    return Predictor(bundle, make_settings(**settings), lambda _url, _task: pixels)


@pytest.fixture
def scene() -> np.ndarray:
    return np.array(draw_scene(384, 256, 6, random.Random(3)).image)


def test_the_task_score_is_the_chosen_methods_over_the_suggested_boxes(
    detector: Detector, scene: np.ndarray
) -> None:
    bundle = ModelBundle(detector, None)
    config = parse_label_config(BOXES.format(attr=""))
    task = {"id": 1, "data": {"image": "scene.png"}}
    by_method = {}
    for method in get_args(TaskScore):
        answer = predictor(bundle, scene, task_score=method).predict_task(task, config)
        assert answer.error is None and answer.result
        by_method[method] = answer
    box_scores = [r["score"] for r in by_method["least_confidence"].result]
    assert by_method["least_confidence"].score == pytest.approx(min(box_scores))
    assert by_method["mean_confidence"].score == pytest.approx(sum(box_scores) / len(box_scores))
    doubt = sum(1 - s for s in box_scores)
    assert by_method["total_uncertainty"].score == pytest.approx(1 / (1 + doubt))
    assert 0.0 <= by_method["margin"].score <= by_method["least_confidence"].score + 1e-6
    # Disagreement from the two passes themselves, at the serving threshold.
    slicing = predictor(bundle, scene).slicing
    windows, whole = sliced_passes(detector, scene, slicing, 0.3)
    sliced = merge_passes(windows, slicing)
    want = agreement(sliced.select(sliced.scores >= 0.3), whole[0].select(whole[0].scores >= 0.3))
    assert by_method["disagreement"].score == pytest.approx(want)
    # The project's own choice wins over the setting.
    own = parse_label_config(BOXES.format(attr=' task_score="mean_confidence"'))
    answer = predictor(bundle, scene, task_score="margin").predict_task(task, own)
    assert answer.score == pytest.approx(by_method["mean_confidence"].score)


def test_a_classifiers_margin_is_its_best_minus_second_best(
    classifier_dir: Path, scene: np.ndarray
) -> None:
    from label_studio_sahi.inference.classifier import Classifier

    clf = Classifier.load(str(classifier_dir), device="cpu")
    names = list(clf.id2label.values())
    config = parse_label_config(
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
        + "".join(f'<Choice value="{n}"/>' for n in names)
        + "</Choices></View>"
    )
    answer = predictor(ModelBundle(None, clf), scene, task_score="margin").predict_task(
        {"data": {"image": "x"}}, config
    )
    ranked = clf.classify([scene], top_k=len(names))[0]
    assert answer.score == pytest.approx(ranked[0][1] - ranked[1][1])
