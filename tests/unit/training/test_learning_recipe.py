"""The pieces of the fine-tuning recipe: drawn windows, augmentation, step budget, the
relabelled head, and the promotion gate."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.dataset import jittered_window
from label_studio_sahi.training.evaluate import (
    bootstrap_fewer,
    corrections,
    detection_metrics,
    paired_bootstrap,
    sign_test_fewer,
)
from label_studio_sahi.training.finetune import (
    DetectionSample,
    augment,
    learning_rate_factor,
    relabel_head,
    training_steps,
)
from label_studio_sahi.training.gate import Candidates, decide
from testkit.servers import make_settings


def test_a_drawn_window_holds_the_object_it_was_drawn_around_in_window_pixels() -> None:
    rng = random.Random(0)
    boxes = [("car", (900.0, 700.0, 930.0, 720.0))]
    for _ in range(50):
        window, kept, labels = jittered_window(
            rng, (1600, 1200), boxes, slice_height=128, slice_width=128, min_area_ratio=0.1
        )
        x1, y1, x2, y2 = window
        assert (x2 - x1, y2 - y1) == (128, 128) and x1 >= 0 and x2 <= 1600 and y2 <= 1200
        assert labels == ("car",)
        bx1, by1, bx2, by2 = kept[0]
        assert 0 <= bx1 < bx2 <= 128 and 0 <= by1 < by2 <= 128
        # The kept box is the object's part inside the window, shifted by the window.
        assert bx1 == max(900 - x1, 0) and by2 == min(720 - y1, 128)


def test_drawn_windows_move_the_object_around_the_window() -> None:
    rng = random.Random(1)
    boxes = [("car", (900.0, 700.0, 930.0, 720.0))]
    lefts = {
        jittered_window(rng, (1600, 1200), boxes, slice_height=128, slice_width=128,
                        min_area_ratio=0.1)[0][0]
        for _ in range(30)
    }  # fmt: skip
    assert len(lefts) > 10


def test_an_image_without_objects_gives_an_empty_window_inside_it() -> None:
    window, kept, labels = jittered_window(
        random.Random(0), (300, 200), [], slice_height=128, slice_width=128, min_area_ratio=0.1
    )
    assert kept == () and labels == () and window[2] <= 300 and window[3] <= 200


def test_a_flip_mirrors_the_boxes_with_the_pixels() -> None:
    image = Image.new("RGB", (100, 50))
    image.paste((255, 0, 0), (10, 5, 30, 25))
    sample = DetectionSample(image, [(10.0, 5.0, 30.0, 25.0)], [0])
    flipped = [s for s in (augment(sample, random.Random(i)) for i in range(20))
               if s.boxes[0][0] != 10.0]  # fmt: skip
    assert flipped, "half of the draws flip"
    x1, y1, x2, y2 = flipped[0].boxes[0]
    assert (x1, y1, x2, y2) == (70.0, 5.0, 90.0, 25.0)
    assert flipped[0].image.getpixel((80, 15))[0] > 150  # the red square moved with its box


def test_steps_follow_the_data_between_a_floor_and_a_cap() -> None:
    settings = make_settings(
        train_epochs=2, train_batch_size=4, train_min_steps=50, train_steps=400
    )
    assert training_steps(10, settings) == 50  # few windows: the floor
    assert training_steps(400, settings) == 200  # 2 passes over 400 windows, 4 a step
    assert training_steps(10_000, settings) == 400  # many: the cap
    assert training_steps(10, make_settings(train_steps=5, train_min_steps=50)) == 5


def test_the_default_cap_gives_a_hundred_labels_their_three_passes() -> None:
    # 100 labels of the learning benchmark cut into 5,860-6,120 windows at 128 px: capped at
    # 2000 steps they got about one pass, and the rounds past 25 labels rose on 1 seed of 3.
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    assert training_steps(6_000, defaults) == 4_500


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {})()
        self.config.id2label = {0: "car", 1: "person", 2: "truck"}
        self.head = nn.Linear(4, 3)


def test_a_label_that_stands_for_several_classes_starts_from_all_of_them() -> None:
    model: Any = _Model()
    old = model.head.weight.detach().clone()
    labels = ["Vehicle", "Person"]
    mapping = {"car": "Vehicle", "truck": "Vehicle", "person": "Person"}
    relabel_head(model, ["head"], labels, mapping.get)
    assert torch.allclose(model.head.weight[0], (old[0] + old[2]) / 2)
    assert torch.allclose(model.head.weight[1], old[1])
    assert model.config.id2label == {0: "Vehicle", 1: "Person"}


def _dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.zeros(len(boxes), dtype=torch.int64),
    )


TRUTHS = [([(10.0, 10.0, 30.0, 30.0)], [0]) for _ in range(6)]
HIT = [[10.0, 10.0, 30.0, 30.0]]
MISS = [[60.0, 60.0, 80.0, 80.0]]


def test_a_candidate_better_on_every_image_wins_every_draw() -> None:
    better = [_dets(HIT, [0.9]) for _ in TRUTHS]
    worse = [_dets(MISS, [0.9]) for _ in TRUTHS]
    assert paired_bootstrap(better, worse, TRUTHS, 1) == 1.0
    assert paired_bootstrap(worse, better, TRUTHS, 1) == 0.0


def test_a_gain_on_one_image_of_six_is_not_a_sure_gain() -> None:
    live = [_dets(MISS, [0.9]) for _ in TRUTHS]
    candidate = [_dets(HIT, [0.9]), *live[1:]]
    share = paired_bootstrap(candidate, live, TRUTHS, 1, resamples=400)
    assert 0.5 < share < 0.8  # one image in six is missing from about a third of the draws


def _noisy_detections(rng: random.Random, truth: tuple[list[Any], list[int]]) -> Detections:
    """Each true box found or not, shifted a little, plus false boxes; random scores."""
    boxes, labels = [], []
    for (x1, y1, x2, y2), label in zip(*truth, strict=True):
        if rng.random() < 0.7:
            dx, dy = rng.uniform(-6, 6), rng.uniform(-6, 6)
            boxes.append([x1 + dx, y1 + dy, x2 + dx, y2 + dy])
            labels.append(label if rng.random() < 0.8 else rng.randrange(3))
    for _ in range(rng.randrange(4)):
        x, y, side = rng.uniform(0, 300), rng.uniform(0, 200), rng.uniform(8, 60)
        boxes.append([x, y, x + side, y + side])
        labels.append(rng.randrange(3))
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor([rng.random() for _ in boxes], dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


@pytest.mark.parametrize("metric", ["map_50", "map", "map_small"])
def test_each_bootstrap_draw_is_scored_as_cocoeval_scores_the_drawn_images(metric: str) -> None:
    rng = random.Random(3)
    truths: list[tuple[list[Any], list[int]]] = []
    for _ in range(6):
        boxes = []
        for _ in range(rng.randrange(7)):
            x, y, side = rng.uniform(0, 300), rng.uniform(0, 200), rng.uniform(8, 60)
            boxes.append((x, y, x + side, y + side))
        truths.append((boxes, [rng.randrange(3) for _ in boxes]))
    candidate = [_noisy_detections(rng, t) for t in truths]
    live = [_noisy_detections(rng, t) for t in truths]

    # The reference: pycocotools run anew on each draw's images (the same draws: same seed).
    draws = random.Random(7)
    wins = 0
    for _ in range(40):
        pick = [draws.randrange(6) for _ in range(6)]
        chosen = [truths[i] for i in pick]
        a = detection_metrics([candidate[i] for i in pick], chosen, 3)[metric] or 0.0
        b = detection_metrics([live[i] for i in pick], chosen, 3)[metric] or 0.0
        wins += a > b
    share = paired_bootstrap(candidate, live, truths, 3, metric=metric, resamples=40, seed=7)
    assert share == wins / 40
    assert 0.0 < share < 1.0  # the draws disagree: the comparison above is not vacuous


def test_an_equal_candidate_never_wins() -> None:
    same = [_dets(HIT, [0.9]) for _ in TRUTHS]
    assert paired_bootstrap(same, same, TRUTHS, 1) == 0.0


def _candidates(candidate: float, live: float, sure: float) -> Candidates:
    metrics = {
        "candidate": {"map_50": candidate, "images": 6},
        "live": {"map_50": live, "images": 6},
        "bootstrap_better": sure,
    }
    return Candidates(detector=object(), metrics=metrics)  # type: ignore[arg-type]


def test_the_gate_promotes_a_gain_that_holds_across_the_held_out_images() -> None:
    settings = make_settings(promote_confidence=0.8)
    decision = decide(_candidates(0.5, 0.3, 0.95), settings)["detector"]
    assert decision["promoted"] and "+0.2000" in decision["why"] and "95%" in decision["why"]


def test_the_gate_refuses_a_gain_that_one_image_makes() -> None:
    decision = decide(_candidates(0.5, 0.3, 0.6), make_settings(promote_confidence=0.8))
    assert not decision["detector"]["promoted"] and "needs 80%" in decision["detector"]["why"]


def test_by_default_the_gate_refuses_a_gain_that_holds_in_five_draws_of_six() -> None:
    # Measured: such gains on 6 held-out images were losses on the test split
    # (bench/LOG.md, Geometry); the default asks for 95 % of the draws.
    assert not decide(_candidates(0.23, 0.19, 0.84), make_settings())["detector"]["promoted"]
    assert decide(_candidates(0.22, 0.13, 0.98), make_settings())["detector"]["promoted"]


def test_the_gate_refuses_a_loss_however_sure() -> None:
    assert not decide(_candidates(0.2, 0.3, 0.9), make_settings())["detector"]["promoted"]


def test_corrections_count_the_boxes_an_annotator_deletes_and_draws() -> None:
    truth = [([(10.0, 10.0, 30.0, 30.0), (60.0, 60.0, 80.0, 80.0)], [0, 1])]
    suggested = Detections(
        torch.tensor([[10, 10, 30, 30], [11, 11, 31, 31], [60, 60, 80, 80], [0, 0, 5, 5]],
                     dtype=torch.float32),
        torch.tensor([0.9, 0.8, 0.7, 0.1]),
        torch.tensor([0, 0, 0, 0]),
    )  # fmt: skip
    # Right; a second box on a taken object (delete); the right place with the wrong label
    # (delete, and draw the object); below the serving threshold (never shown).
    assert corrections([suggested], truth, threshold=0.3) == [2 + 1]
    assert corrections([suggested], truth, threshold=0.05) == [3 + 1]  # the faint box too
    assert corrections([_dets([], [])], truth, threshold=0.3) == [2]  # both drawn
    assert corrections([_dets([], [])], [([], [])], threshold=0.3) == [0]


def test_fewer_corrections_on_every_image_win_every_draw_and_a_tie_none() -> None:
    assert bootstrap_fewer([0, 1, 2], [5, 3, 3]) == 1.0
    assert bootstrap_fewer([2, 2, 2], [2, 2, 2]) == 0.0
    assert 0.0 < bootstrap_fewer([0, 9, 1], [3, 3, 3], resamples=400) < 0.8
    with pytest.raises(ValueError, match="2 candidate counts but 1"):
        bootstrap_fewer([1, 2], [1])


def test_a_sign_test_needs_five_images_fewer_to_be_sure_at_95_percent() -> None:
    assert sign_test_fewer([1, 1], [5, 5]) == 0.75  # a coin gives "fewer on both" 1 in 4
    assert sign_test_fewer([1] * 4, [5] * 4) == 1 - 1 / 16
    assert sign_test_fewer([1] * 5, [5] * 5) == 1 - 1 / 32  # the first count above 0.95
    assert sign_test_fewer([1, 1, 1, 1, 1, 9], [5] * 6) == 1 - 7 / 64  # 5 of 6: not sure
    assert sign_test_fewer([1, 1, 5], [5, 5, 5]) == 0.75  # an equal image is no evidence
    assert sign_test_fewer([5, 5], [5, 5]) == 0.0
    assert sign_test_fewer([9, 9], [5, 5]) == 0.0


def _tie(fewer: float, candidate: int, live: int, signs: float = 1.0) -> Candidates:
    tie = _candidates(0.0, 0.0, 0.0)
    tie.metrics["candidate"]["corrections"] = candidate
    tie.metrics["live"]["corrections"] = live
    tie.metrics["bootstrap_fewer_corrections"] = fewer
    tie.metrics["sign_fewer_corrections"] = signs
    return tie


def test_on_a_map_tie_the_gate_promotes_a_candidate_that_leaves_fewer_corrections() -> None:
    # Neither model finds the few held-out objects; live also sprays 3,600 false boxes.
    decision = decide(_tie(1.0, 3, 3604), make_settings(promote_confidence=0.8))["detector"]
    assert decision["promoted"]
    assert "a tie" in decision["why"] and "3 vs live 3604" in decision["why"]


def test_a_tie_on_two_held_out_images_is_never_promoted_at_the_default_confidence() -> None:
    # Measured: 512 px windows, 10 labels, both at held-out mAP 0, corrections 28 vs 60 on
    # both images (every bootstrap draw); on the test split the candidate scored below.
    signs = sign_test_fewer([10, 18], [25, 35])
    decision = decide(_tie(1.0, 28, 60, signs), make_settings())["detector"]
    assert not decision["promoted"]
    assert "75% by a sign test" in decision["why"], decision["why"]


def test_on_a_map_tie_fewer_corrections_must_hold_across_the_draws_too() -> None:
    settings = make_settings(promote_confidence=0.8)
    assert not decide(_tie(0.6, 10, 12), settings)["detector"]["promoted"]
    assert not decide(_tie(0.0, 5, 5), settings)["detector"]["promoted"]  # an equal candidate
    # Without the bootstrap (PROMOTE_CONFIDENCE=0) still only strictly fewer promotes.
    assert not decide(_tie(0.0, 5, 5), make_settings(promote_confidence=0))["detector"]["promoted"]


def test_detector_and_classifier_are_judged_separately() -> None:
    candidates = _candidates(0.2, 0.3, 0.0)
    candidates.classifier = object()  # type: ignore[assignment]
    candidates.metrics.update(candidate_accuracy=0.9, live_accuracy=0.5)
    decision = decide(candidates, make_settings())
    assert not decision["detector"]["promoted"] and decision["classifier"]["promoted"]


def test_the_cosine_schedule_warms_up_then_decays_to_a_twentieth() -> None:
    factors = [learning_rate_factor(i, 100, "cosine") for i in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0  # 10 warm-up steps
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.05, abs=0.01)
    assert {learning_rate_factor(i, 100, "constant") for i in range(100)} == {1.0}


def test_averaging_with_the_parent_moves_each_weight_that_share_of_the_way_back() -> None:
    from label_studio_sahi.training.finetune import average_into

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.add_(5)  # a counter, not a weight: kept as it is
    trained = model[0].weight.detach().clone()

    average_into(model, parent, 0.25)

    assert torch.allclose(model[0].weight, 0.75 * trained + 0.25 * parent["0.weight"])
    assert int(model[1].num_batches_tracked) == 5
    before = model[0].weight.detach().clone()
    average_into(model, parent, 0.0)  # the default: the fine-tuned weights as they are
    assert torch.equal(model[0].weight, before)
