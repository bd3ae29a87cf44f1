"""Is the task score worth sorting by? Its rank correlation with the live model's error,
and an active-learning simulation through the real job.

    python -m bench.active_learning --tasks 40 --finetuned 10
    python -m bench.active_learning --simulate --seeds 0 1 --jobs 2

An active-learning loop labels the tasks Label Studio lists first when sorted by
prediction score ascending, so a score is worth sorting by when a low score marks a task
the live model gets wrong. On the learning benchmark (``bench/quality.py``: its base, or
the base fine-tuned by the real job on ``--finetuned`` labels of ``--train-seed``'s project), this
predicts an unlabelled pool (``--pool-seed``'s project tasks, ground truth known) as
served, computes every task score of ``scores.py`` from the same predictions, and prints
Spearman's rank correlation between each score's *uncertainty* (1 - score) and the task's
error (1 - F1 of its boxes at the serving threshold: misses and wrong boxes alike, IoU >=
0.5 with the right label). Positive: the score puts the model's mistakes first.

``--simulate``: per seed, a project of ``--pool`` tasks is labelled round by round
(``--rounds``, cumulative labels) through the real job (``bench.quality.run_seed``: export,
windows, fine-tune, gate, publish), in the order each score proposes or at random (or
``grouped``: ``total_uncertainty`` with variety, ``grouped_order``). Each
round the live models predict the unlabelled tasks as served, and the tasks Label Studio
lists first when sorted by prediction score ascending are labelled; random order draws
them (seeded). After each round the live model is scored on the learning benchmark's fixed
test split (``--judge-candidate``: each round's candidate too, the model trained on the
labels so far whether or not the gate promoted it). Prints the rows with what each round's
picks hold, the median curve per order and, per score, the labels it needs to reach random
order's final test mAP@.5, as a share of the labels random order needed to get there (per
seed and on the median curves); plots test mAP@.5 against labels. The base is the committed
Conditional DETR, or with ``--family`` (``--base-steps``) another family's, trained on the
source domain into ``OUT/cache`` once (Deformable DETR learns far more from a few labels).

The project (pool and test split alike) is iid scenes of the target domain, or one scene in
N on a ground the base never saw (``--subdomain-every``), or one scene in N crowded and the
others nearly empty, as a survey's frames are (``--crowded-every``; also for the rank
correlation's pool).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from scipy.stats import spearmanr

from bench import quality
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.scores import one_to_one_matches
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor, ScoreInputs
from label_studio_sahi.settings import Settings, TaskScore
from label_studio_sahi.training.evaluate import truth_detections
from label_studio_sahi.versions.bundles import ModelBundle
from testkit import scenes as data


@dataclass(frozen=True)
class TaskErrors:
    """A task's suggested boxes against its true ones: how many matched (IoU >= 0.5, same
    label, surest first), of how many suggested and how many true."""

    matched: int
    suggested: int
    true: int

    @property
    def error(self) -> float:
        """1 - F1: the share of the task the model got wrong (0 when both are empty)."""
        total = self.suggested + self.true
        return 1 - 2 * self.matched / total if total else 0.0

    @property
    def corrections(self) -> int:
        """Boxes the annotator deletes or draws: the wrong suggestions and the misses."""
        return self.suggested + self.true - 2 * self.matched


def task_errors(
    result: list[dict], truth: tuple[list, list], width: int, height: int
) -> TaskErrors:
    """Match a task's suggested boxes (Label Studio results) to its true boxes, one to one
    as the gate's ``corrections`` does."""
    boxes, labels = truth
    pred = [
        (
            [r["value"]["x"] * width / 100, r["value"]["y"] * height / 100,
             (r["value"]["x"] + r["value"]["width"]) * width / 100,
             (r["value"]["y"] + r["value"]["height"]) * height / 100],
            data.LABELS.index(r["value"]["rectanglelabels"][0]),
            r["score"],
        )
        for r in result
    ]  # fmt: skip
    suggested = Detections(
        torch.tensor([p[0] for p in pred], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([p[2] for p in pred], dtype=torch.float32),
        torch.tensor([p[1] for p in pred], dtype=torch.int64),
    )
    matched = one_to_one_matches(suggested, truth_detections(boxes, labels))
    return TaskErrors(matched, len(pred), len(boxes))


@dataclass(frozen=True)
class ScoreOrder:
    """Label Studio's order with the data manager sorted by prediction score ascending: the
    live models predict each unlabelled task as served, with ``method`` as the task score;
    the lowest scores first, ties in task order."""

    method: TaskScore

    def __call__(self, now: quality.Round) -> list[int]:
        answers = served(now, self.method)
        scored = [(score, i) for i, (score, _) in zip(now.unlabelled, answers, strict=True)]
        return [i for _, i in sorted(scored)[: now.count]]


def served(now: quality.Round, method: TaskScore) -> list[tuple[float, list[dict]]]:
    """Each unlabelled task as the live models serve it: its score by ``method`` and its
    Label Studio results."""
    settings = now.settings.model_copy(update={"task_score": method})
    predictor = Predictor(
        now.bundle, settings, lambda url, _t: np.array(now.scenes[int(url)].image)
    )
    config = parse_label_config(data.LABEL_CONFIG)
    answers = []
    try:
        for i in now.unlabelled:
            inputs = ScoreInputs()
            image = np.array(now.scenes[i].image)
            result = predictor.predict_image(image, config, "image", None, inputs)
            answers.append((inputs.score(method), result))
    finally:
        predictor.close()
    return answers


def grouped_order(
    task_scores: Sequence[float], looks: Sequence[Sequence[float]], groups: int, seed: int = 0
) -> list[int]:
    """A pool's tasks (indices), the ones most worth labelling first, with variety.

    Sorting by a task score alone labels one kind of task first: ``total_uncertainty`` puts
    every crowded frame ahead of the sparse ones, though the sparse frames hold the ground and
    the distractors that false boxes come from. So the pool is split into ``groups`` groups
    of tasks that look alike (k-means, seeded, over ``looks``: one vector per task, for
    example what the model suggests in it), and the order takes the least sure task (lowest
    score) of every group, then the second of every group, and so on; within a layer, the
    least sure first, ties in task order. The first N of the order hold up to N kinds.
    """
    if len(task_scores) != len(looks):
        raise ValueError("one look per task")
    if not task_scores:
        return []
    points = np.asarray(looks, dtype=np.float64).reshape(len(looks), -1)
    k = min(groups, len(np.unique(points, axis=0)))
    if k > 1:
        _, group_of = kmeans2(points, k, seed=seed, minit="++")
    else:
        group_of = np.zeros(len(points), dtype=np.int64)
    members: dict[int, list[int]] = {}
    for i in sorted(range(len(task_scores)), key=lambda i: (task_scores[i], i)):
        members.setdefault(int(group_of[i]), []).append(i)
    order: list[int] = []
    for depth in range(max(len(m) for m in members.values())):
        layer = [m[depth] for m in members.values() if len(m) > depth]
        order += sorted(layer, key=lambda i: (task_scores[i], i))
    return order


def looks(result: list[dict]) -> list[float]:
    """What the model suggests in a task, as a vector to group tasks by: log(1 + boxes) per
    label (a crowded frame and an empty field look different; so do cars and lorries)."""
    counts = [0] * len(data.LABELS)
    for r in result:
        counts[data.LABELS.index(r["value"]["rectanglelabels"][0])] += 1
    return [float(np.log1p(c)) for c in counts]


@dataclass(frozen=True)
class GroupedOrder:
    """``grouped_order``: the least sure task (``method``) of each of ``groups``
    groups of tasks the live model sees alike (``looks``), then the second of each, ..."""

    method: TaskScore
    groups: int
    seed: int

    def __call__(self, now: quality.Round) -> list[int]:
        answers = served(now, self.method)
        ranked = grouped_order(
            [score for score, _ in answers], [looks(result) for _, result in answers],
            self.groups, self.seed,
        )  # fmt: skip
        return [now.unlabelled[j] for j in ranked[: now.count]]


@dataclass(frozen=True)
class RandomOrder:
    """Tasks drawn at random (seeded by the seed and the round)."""

    seed: int

    def __call__(self, now: quality.Round) -> list[int]:
        draw = random.Random(self.seed * 100_003 + len(now.unlabelled))
        return draw.sample(now.unlabelled, now.count)


@dataclass(frozen=True)
class WarmStart:
    """The first ``labels`` drawn at random (the same draw for every order), then ``then``:
    the untrained base's scores carry no signal here (its error is about 1 on every task)."""

    labels: int
    seed: int
    then: quality.Chooser

    def __call__(self, now: quality.Round) -> list[int]:
        first = len(now.scenes) - len(now.unlabelled) < self.labels
        return (RandomOrder(self.seed) if first else self.then)(now)


@dataclass(frozen=True)
class OneInN:
    """A target-domain project (pool and test split alike) with one scene in ``every`` of
    another kind, the same scenes for every order."""

    every: int

    def other(self, seed: int) -> bool:
        return seed % self.every == self.every - 1


@dataclass(frozen=True)
class SubDomain(OneInN):
    """One scene in ``every`` on another ground (dark asphalt): a site the model has not seen."""

    ground: tuple[int, int, int] = (62, 64, 66)

    def __call__(self, seed: int) -> data.Scene:
        return data.target_scene(seed, ground=self.ground if self.other(seed) else data.GROUND)


@dataclass(frozen=True)
class Crowded(OneInN):
    """One scene in ``every`` crowded, the others nearly empty, as frames of a survey are
    (a car park among fields). With the defaults a task holds 9.5 objects on average, as the
    iid project's 6-14 do: the same labels' worth per random task, spread unevenly."""

    crowded: tuple[int, int] = (24, 40)
    sparse: tuple[int, int] = (0, 4)

    def __call__(self, seed: int) -> data.Scene:
        return data.target_scene(seed, objects=self.crowded if self.other(seed) else self.sparse)


def project(subdomain_every: int = 0, crowded_every: int = 0) -> quality.SceneMaker:
    """The project's scenes: iid, or one in N on another ground or crowded."""
    if subdomain_every and crowded_every:
        raise ValueError("a project has another ground or crowded scenes, not both")
    if subdomain_every:
        return SubDomain(subdomain_every)
    return Crowded(crowded_every) if crowded_every else data.target_scene


# Orders that are not one task score: "grouped" is total_uncertainty with variety.
GROUPED = "grouped"
GROUPS = 4


def order(strategy: str, seed: int, warm_start: int = 0) -> quality.Chooser:
    chosen: quality.Chooser
    if strategy == "random":
        chosen = RandomOrder(seed)
    elif strategy == GROUPED:
        chosen = GroupedOrder("total_uncertainty", GROUPS, seed)
    else:
        chosen = ScoreOrder(cast(TaskScore, strategy))
    return WarmStart(warm_start, seed, chosen) if warm_start else chosen


def labels_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The fewest labels after which test mAP@.5 is at least ``target`` (points: labels, mAP)."""
    return next((n for n, value in points if value >= target - 1e-9), None)


# The curves a simulation can report: the row key of each round's test mAP@.5, and whose.
CURVES = {
    "map_50": "the live model (a rejected round leaves its parent live)",
    "candidate_map_50": "the model trained on the labels so far (each round's candidate, "
    "promoted or not)",
}


def simulate(args: argparse.Namespace) -> int:
    strategies = ["random", *args.orders]
    rounds = sorted(args.rounds)
    assert rounds[-1] <= args.pool, "the last round cannot label more than the pool"
    assert not args.warm_start or args.warm_start in rounds, "a warm start is a round's labels"
    overrides: dict[str, Any] = {
        "train_steps": args.max_steps,
        "train_min_steps": min(args.max_steps, 200),  # 200: the setting's default
    }
    make = project(args.subdomain_every, args.crowded_every)
    split = quality.test_split(args.test_images, make)
    # The committed Conditional DETR, or another family's base trained (seeded) into the
    # cache once: a family whose learning curve still rises over the labels counted.
    base = quality.base_model(args.out / "cache", args.family, args.base_steps)
    served = Settings(_env_file=None, slice_height=quality.SLICE, slice_width=quality.SLICE)  # type: ignore[call-arg]
    base_score = quality.score(Detector.load(str(base), device="cpu"), quality.TAG, split,
                               SliceConfig.from_settings(served), served.score_threshold)  # fmt: skip
    plan = [(strategy, seed) for seed in args.seeds for strategy in strategies]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="ls-sahi-al-sim-") as tmp,
        # Spawned, not forked: a fork of a process with running threads (torch's, a test
        # run's servers) can hang in the child.
        ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        runs = [
            pool.submit(quality.run_seed, seed, rounds, split, base, Path(tmp) / f"{strategy}-{seed}",
                        overrides, base_score, args.pool, order(strategy, seed, args.warm_start),
                        make, args.judge_candidate)
            for strategy, seed in plan
        ]  # fmt: skip
        for (strategy, seed), run in zip(plan, runs, strict=True):
            scene_seeds = data.project_seeds(seed, args.pool)
            for row in run.result():
                if isinstance(make, OneInN) and "picked" in row:
                    # How many of the round's picks were of the other kind.
                    row["picked_other"] = sum(make.other(scene_seeds[i]) for i in row["picked"])
                rows.append({"order": strategy, **row})
            print(f"{strategy} {seed}: done", flush=True)
    print(f"simulation wall time {time.monotonic() - started:.0f} s\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulation.json").write_text(json.dumps(rows, indent=2, default=str))
    report(rows, args.out)
    return 0


def _value(row: dict[str, Any], key: str) -> float:
    # Round 0 is the base: no candidate, its own score.
    return float(row["map_50"] if row["labels"] == 0 else row[key])


def report(rows: list[dict[str, Any]], out: Path) -> None:
    """The simulation's tables and plot from its rows (``--report simulation.json`` again)."""
    strategies = list(dict.fromkeys(r["order"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    keys = [k for k in CURVES if all(k in r for r in rows if r["labels"] > 0)]
    print("| order | seed | labels | status | version | map | map_50 | accept | edit "
          "| candidate map_50 | objects in the picks | picks of the one-in-N kind |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cand = r.get("candidate_map_50")
        print(f"| {r['order']} | {r['seed']} | {r['labels']} | {r['status']} | {r['version']} "
              f"| {r['map']:.3f} | {r['map_50']:.3f} | {r['accept']:.3f} | {r['edit']:.1f} "
              f"| {'-' if cand is None else f'{cand:.3f}'} | {r.get('picked_objects', '-')} "
              f"| {r.get('picked_other', '-')} |")  # fmt: skip
    print("\nWhat each order labelled (all seeds, every round): true objects per labelled task, "
          "and the share of tasks of the one-in-N kind (other ground or crowded):\n")  # fmt: skip
    print("| order | objects per task | of the one-in-N kind |")
    print("|---|---|---|")
    for strategy in strategies:
        picks = [r for r in rows if r["order"] == strategy and "picked_objects" in r]
        tasks = sum(len(r["picked"]) for r in picks)
        other = [r["picked_other"] for r in picks if "picked_other" in r]
        print(f"| {strategy} | {sum(r['picked_objects'] for r in picks) / max(1, tasks):.2f} "
              f"| {f'{sum(other) / tasks:.0%}' if other else '-'} |")  # fmt: skip
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        curves.setdefault((r["order"], r["seed"]), []).append(r)
    for key in keys:
        print(f"\n### Test mAP@.5 of {CURVES[key]}\n")
        median_curves = {}
        print("| order | " + " | ".join(str(r["labels"]) for r in curves["random", seeds[0]])
              + " | mean over rounds (median of seeds) |")  # fmt: skip
        print("|---|" + "---|" * (len(curves["random", seeds[0]]) + 1))
        for strategy in strategies:
            labels = [r["labels"] for r in curves[strategy, seeds[0]]]
            median_curves[strategy] = [
                (n, statistics.median(_value(curves[strategy, s][i], key) for s in seeds))
                for i, n in enumerate(labels)
            ]
            # The whole curve, not one crossing: mean test mAP@.5 over the labelled rounds.
            area = statistics.median(
                statistics.fmean(_value(r, key) for r in curves[strategy, s] if r["labels"] > 0)
                for s in seeds
            )
            print(f"| {strategy} | " + " | ".join(f"{v:.3f}" for _, v in median_curves[strategy])
                  + f" | {area:.3f} |")  # fmt: skip
        print("\nLabels to reach random order's final test mAP@.5, and their share of the "
              "labels random order needed to get there (per seed, and on the median curves):\n")  # fmt: skip
        print("| order | " + " | ".join(f"seed {s}" for s in seeds) + " | median curves |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for strategy in strategies:
            cells = []
            for seed in seeds:
                points = {o: [(r["labels"], _value(r, key)) for r in curves[o, seed]]
                          for o in ("random", strategy)}  # fmt: skip
                cells.append(_reach(points["random"], points[strategy]))
            cells.append(_reach(median_curves["random"], median_curves[strategy]))
            print(f"| {strategy} | " + " | ".join(cells) + " |")
    for key in keys:
        name = "active_learning.png" if key == "map_50" else f"active_learning_{key}.png"
        plot(rows, strategies, seeds, out / name, key)
        print(f"\nwrote {out / name}")


def _reach(random_curve: list[tuple[int, float]], curve: list[tuple[int, float]]) -> str:
    """ "N of M (share)": the labels ``curve`` needs to reach random's final value, of the M
    random needed."""
    target = random_curve[-1][1]
    need_random = labels_to_reach(random_curve, target)
    need = labels_to_reach(curve, target)
    share = None if need is None or not need_random else need / need_random
    return (f"{need if need is not None else 'not reached'} of {need_random}"
            f" ({'-' if share is None else f'{share:.0%}'})")  # fmt: skip


def plot(
    rows: list[dict[str, Any]], strategies: list[str], seeds: list[int], path: Path, key: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for strategy in strategies:
        mine = [r for r in rows if r["order"] == strategy]
        xs = sorted({r["labels"] for r in mine})
        ys = [statistics.median(_value(r, key) for r in mine if r["labels"] == n) for n in xs]
        style = {"color": "black", "linestyle": "--"} if strategy == "random" else {}
        ax.plot(xs, ys, marker="o", label=strategy, **style)  # type: ignore[arg-type]
    ax.set_xlabel("labelled images")
    ax.set_ylabel(f"test mAP@.5 (median of {len(seeds)} seeds)")
    whose = "live model" if key == "map_50" else "model trained on the labels so far"
    ax.set_title(f"Labelling order through the real job: {whose}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=40, help="tasks in the unlabelled pool")
    parser.add_argument("--finetuned", type=int, metavar="LABELS", default=0)
    parser.add_argument("--train-seed", type=int, default=0, help="project the labels come from")
    parser.add_argument("--pool-seed", type=int, default=1, help="project the pool comes from")
    parser.add_argument("--simulate", action="store_true",
                        help="instead: label rounds in each score's order vs at random")  # fmt: skip
    parser.add_argument("--report", type=Path, metavar="SIMULATION_JSON",
                        help="instead: the tables and plot of a simulation's saved rows")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pool", type=int, default=24, help="tasks in each seed's project")
    parser.add_argument("--rounds", type=int, nargs="+", default=[4, 8, 12, 16, 20])
    parser.add_argument("--orders", nargs="+", default=list(get_args(TaskScore)),
                        choices=[*get_args(TaskScore), GROUPED],
                        help="the scores compared with random; grouped: total_uncertainty's "
                        f"least sure task of each of {GROUPS} groups the model sees alike")  # fmt: skip
    parser.add_argument("--warm-start", type=int, default=0, metavar="LABELS",
                        help="the first LABELS drawn at random for every order (the first round's)")  # fmt: skip
    parser.add_argument("--subdomain-every", type=int, default=0, metavar="N",
                        help="one scene in N (pool and test split) on another ground")  # fmt: skip
    parser.add_argument("--crowded-every", type=int, default=0, metavar="N",
                        help="one scene in N (pool and test split) crowded, the others nearly empty")  # fmt: skip
    parser.add_argument("--judge-candidate", action="store_true",
                        help="also score each round's candidate on the test split (promoted or not)")  # fmt: skip
    parser.add_argument("--test-images", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=600, help="TRAIN_STEPS per job")
    parser.add_argument("--family", default="conditional_detr",
                        help="the simulation's base: the committed Conditional DETR, or a family "
                        "of tests/tiny_models trained on the source domain into OUT/cache")  # fmt: skip
    parser.add_argument(
        "--base-steps",
        type=int,
        default=3000,
        help="source-domain steps of a --family base (3000: the committed one)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one core each")
    parser.add_argument("--out", type=Path,
                        default=quality.ROOT / "bench" / "results" / "active_learning")  # fmt: skip
    args = parser.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()), args.report.parent)
        return 0
    if args.simulate:
        torch.set_num_threads(1)
        return simulate(args)

    model = quality.COMMITTED_BASE
    if args.finetuned:
        # run_seed scores its live model on a test split; one image, unused here.
        model = quality.finetuned_base(args.train_seed, args.finetuned, quality.test_split(1))
    detector = Detector.load(str(model), device="cpu")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        slice_height=quality.SLICE,
        slice_width=quality.SLICE,
        device="cpu",
        classifier_model="",
        task_score="disagreement",  # so that the passes' agreement is computed too
    )
    config = parse_label_config(data.LABEL_CONFIG)
    make = project(args.subdomain_every, args.crowded_every)
    pool = [make(s) for s in data.project_seeds(args.pool_seed, args.tasks)]
    images = [np.array(scene.image) for scene in pool]
    predictor = Predictor(ModelBundle(detector, None), settings, lambda url, _t: images[int(url)])
    assert SliceConfig.from_settings(settings) == predictor.slicing
    methods: tuple[TaskScore, ...] = get_args(TaskScore)
    by_method: dict[str, list[float]] = {m: [] for m in methods}
    errors: list[TaskErrors] = []
    for i, scene in enumerate(pool):
        inputs = ScoreInputs()
        result = predictor.predict_image(images[i], config, "image", None, inputs)
        truth = (
            [list(b) for b in scene.boxes],
            [data.LABELS.index(data.LABEL_OF[c]) for c in scene.classes],
        )
        errors.append(task_errors(result, truth, scene.image.width, scene.image.height))
        for method in methods:
            by_method[method].append(inputs.score(method))
    predictor.close()

    error = [e.error for e in errors]
    fixes = [e.corrections for e in errors]
    lowest = max(1, len(pool) // 4)
    print(f"model {model}; {len(pool)} tasks; median error (1 - F1) {statistics.median(error):.3f}; "
          f"{statistics.fmean(fixes):.2f} corrections per task")  # fmt: skip
    print("\nSpearman's rho between each score's uncertainty (1 - score) and the task's error "
          "(1 - F1) and its corrections (boxes to delete or draw); and what the "
          f"{lowest} tasks the score lists first hold, against all {len(pool)}:\n")  # fmt: skip
    print("| score | rho vs error | p | rho vs corrections | p | their error | their corrections "
          "| their objects |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print(f"| (all tasks) | | | | | {statistics.fmean(error):.3f} | {statistics.fmean(fixes):.2f} "
          f"| {statistics.fmean(e.true for e in errors):.2f} |")  # fmt: skip
    for method, values in by_method.items():
        doubt = [1 - v for v in values]
        rho, p = spearmanr(doubt, error)
        rho_fix, p_fix = spearmanr(doubt, fixes)
        first = [errors[i] for i in sorted(range(len(pool)), key=lambda i: values[i])[:lowest]]
        print(f"| {method} | {rho:+.3f} | {p:.3g} | {rho_fix:+.3f} | {p_fix:.3g} "
              f"| {statistics.fmean(e.error for e in first):.3f} "
              f"| {statistics.fmean(e.corrections for e in first):.2f} "
              f"| {statistics.fmean(e.true for e in first):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
