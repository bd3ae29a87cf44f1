"""The active-learning benchmark's orders are the ones they claim to be: a score's order is
Label Studio's data manager sorted by the score /predict serves, ascending; random order
and the warm start are seeded draws; and a tiny simulation runs through the real job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import active_learning, quality
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor, TaskPrediction
from label_studio_sahi.versions.bundles import ModelBundle
from testkit import scenes as data
from testkit.servers import make_settings


@pytest.fixture(scope="module")
def pool() -> quality.Round:
    detector = Detector.load(str(quality.COMMITTED_BASE), device="cpu")
    scenes = [data.target_scene(seed, size=(512, 384)) for seed in range(6)]
    settings = make_settings(
        slice_height=quality.SLICE, slice_width=quality.SLICE, classifier_model=""
    )
    return quality.Round(ModelBundle(detector, None), settings, scenes, [0, 1, 2, 3, 4, 5], 3)


def as_served(pool: quality.Round) -> list[TaskPrediction]:
    """The pool's tasks through /predict's own path, with the default score."""
    import numpy as np

    images = [np.array(scene.image) for scene in pool.scenes]
    predictor = Predictor(pool.bundle, pool.settings, lambda url, _t: images[int(url)])
    config = parse_label_config(data.LABEL_CONFIG)
    tasks = [{"id": i, "data": {"image": str(i)}} for i in pool.unlabelled]
    try:
        return predictor.predict_tasks(tasks, config)
    finally:
        predictor.close()


def test_a_score_order_is_the_data_manager_sorted_by_the_served_score(
    pool: quality.Round,
) -> None:
    served = [p.score for p in as_served(pool)]  # the default score
    assert len(set(served)) > 1, served  # a real ranking, not a tie kept in task order
    ascending = sorted(pool.unlabelled, key=lambda i: (served[i], i))
    default = pool.settings.task_score
    assert active_learning.ScoreOrder(default)(pool) == ascending[: pool.count]


def test_the_grouped_order_takes_the_least_sure_task_of_each_kind_first() -> None:
    # Three crowded frames the model is unsure of and four sparse ones it is surer of: the
    # score alone lists every crowded frame first, the grouped order one of each kind.
    scores = [0.05, 0.9, 0.10, 0.6, 0.08, 0.7, 0.95]
    looks = [[30.0], [1.0], [28.0], [2.0], [33.0], [0.0], [1.0]]
    assert sorted(range(7), key=lambda i: scores[i])[:3] == [0, 4, 2]
    order = active_learning.grouped_order(scores, looks, groups=2)
    assert order[:2] == [0, 3]  # the least sure crowded frame, then the least sure sparse one
    assert sorted(order) == list(range(7))  # every task, once
    # Then the second of each kind, and so on, the kind that ran out dropping out.
    assert order[2:4] == [4, 5] and order[4:] == [2, 1, 6]
    # As many groups as tasks that look alike at most; one group is the score's own order.
    assert active_learning.grouped_order(scores, [[1.0]] * 7, groups=4) == sorted(
        range(7), key=scores.__getitem__
    )
    assert active_learning.grouped_order([], [], groups=4) == []
    with pytest.raises(ValueError):
        active_learning.grouped_order([0.5], [], groups=2)


def test_the_grouped_order_groups_tasks_by_what_the_live_model_suggests_in_them(
    pool: quality.Round,
) -> None:
    import numpy as np

    answers = as_served(pool)
    seen = [active_learning.looks(a.result) for a in answers]
    counts = [len(a.result) for a in answers]
    # log(1 + boxes) per label, of every box suggested; the tasks differ in what they hold.
    assert [sum(round(float(np.expm1(x))) for x in v) for v in seen] == counts
    assert len(set(counts)) > 1, counts
    assert pool.settings.task_score == "total_uncertainty"
    want = active_learning.grouped_order([a.score for a in answers], seen, groups=2, seed=5)
    chosen = active_learning.GroupedOrder("total_uncertainty", 2, seed=5)(pool)
    assert chosen == [pool.unlabelled[j] for j in want[: pool.count]]


def test_random_order_and_the_warm_start_are_seeded_draws(pool: quality.Round) -> None:
    draw = active_learning.RandomOrder(seed=7)(pool)
    assert draw == active_learning.RandomOrder(seed=7)(pool) != active_learning.RandomOrder(8)(pool)
    assert len(set(draw)) == pool.count and set(draw) <= set(pool.unlabelled)
    by_score = active_learning.ScoreOrder("mean_confidence")
    warm = active_learning.WarmStart(labels=3, seed=7, then=by_score)
    assert warm(pool) == draw  # nothing labelled yet: every order draws the same tasks
    later = quality.Round(pool.bundle, pool.settings, pool.scenes, [0, 2, 4], 1)
    assert warm(later) == by_score(later)  # 3 labelled: the score decides from here on


@pytest.mark.slow
def test_a_tiny_simulation_labels_rounds_through_the_real_job(tmp_path: Path) -> None:
    out = tmp_path / "al"
    code = active_learning.main(
        ["--simulate", "--seeds", "0", "--pool", "4", "--rounds", "2", "4", "--warm-start",
         "2", "--max-steps", "10", "--test-images", "1", "--orders", "grouped",
         "--judge-candidate", "--subdomain-every", "2", "--out", str(out),
         "--family", "detr", "--base-steps", "2"]
    )  # fmt: skip
    assert code == 0
    # The base of another family was trained into the cache, saved as a checkpoint folder.
    assert (out / "cache" / "source-base-detr-2" / "model.safetensors").is_file()
    rows = json.loads((out / "simulation.json").read_text())
    for order in ("random", "grouped"):
        mine = [r for r in rows if r["order"] == order]
        assert [r["labels"] for r in mine] == [0, 2, 4]
        assert mine[0]["status"] == "base"
        assert all(r["status"] in {"accepted", "rejected"} for r in mine[1:])
        assert all(0 <= r["map_50"] <= 1 for r in mine)
        # Each round's candidate is scored too; a promoted one is the live model.
        for r in mine[1:]:
            assert 0 <= r["candidate_map_50"] <= 1
            if r["status"] == "accepted":
                assert r["candidate_map_50"] == r["map_50"]
        # Every task labelled once; with one scene in 2 on the other ground, 2 of the 4.
        assert sorted(mine[1]["picked"] + mine[2]["picked"]) == [0, 1, 2, 3]
        assert mine[1]["picked_other"] + mine[2]["picked_other"] == 2
        scenes = [active_learning.SubDomain(2)(s) for s in data.project_seeds(0, 4)]
        objects = sum(len(scene.boxes) for scene in scenes)
        assert mine[1]["picked_objects"] + mine[2]["picked_objects"] == objects
    # The warm start labels the same 2 tasks first for both orders: the same first model.
    first = [r for r in rows if r["labels"] == 2]
    assert first[0]["picked"] == first[1]["picked"]
    assert first[0]["map_50"] == first[1]["map_50"]
    assert (out / "active_learning.png").stat().st_size > 5000
    assert (out / "active_learning_candidate_map_50.png").stat().st_size > 5000
    assert active_learning.main(["--report", str(out / "simulation.json")]) == 0


def test_a_crowded_project_has_one_crowded_scene_in_n_and_the_rest_nearly_empty() -> None:
    make = active_learning.project(crowded_every=4)
    assert isinstance(make, active_learning.Crowded)
    counts = [len(make(seed).boxes) for seed in data.project_seeds(0, 4)]
    assert [make.other(seed) for seed in data.project_seeds(0, 4)] == [False, False, False, True]
    assert all(0 <= n <= 4 for n in counts[:3]) and 24 <= counts[3] <= 40, counts
    # The test split is drawn by the same maker: crowded where the pool would be.
    split = quality.test_split(4, make)
    assert len(split.truths[3][0]) >= 24 > 4 >= max(len(t[0]) for t in split.truths[:3])
    with pytest.raises(ValueError, match="not both"):
        active_learning.project(subdomain_every=4, crowded_every=4)


def test_a_tasks_errors_count_what_the_annotator_deletes_and_draws() -> None:
    def box(x1: float, y1: float, x2: float, y2: float, label: str, score: float) -> dict:
        # Label Studio's percent units on a 200 x 100 image.
        return {"score": score, "value": {"x": x1 / 2, "y": y1, "width": (x2 - x1) / 2,
                                          "height": y2 - y1, "rectanglelabels": [label]}}  # fmt: skip

    truth = ([[0, 0, 20, 20], [100, 50, 120, 70], [150, 0, 170, 10]], [0, 0, 1])
    suggested = [
        box(0, 0, 20, 20, "Vehicle", 0.9),  # right
        box(1, 1, 21, 21, "Vehicle", 0.8),  # a second box on a taken object: wrong
        box(100, 50, 120, 70, "Lorry", 0.7),  # right place, wrong label: wrong, and a miss
    ]
    errors = active_learning.task_errors(suggested, truth, 200, 100)
    assert (errors.matched, errors.suggested, errors.true) == (1, 3, 3)
    assert errors.corrections == 2 + 2  # two boxes to delete, two to draw
    assert errors.error == pytest.approx(1 - 2 * 1 / 6)
    nothing = active_learning.task_errors([], ([], []), 200, 100)
    assert (nothing.error, nothing.corrections) == (0.0, 0)
    assert active_learning.task_errors([], truth, 200, 100).error == 1.0
