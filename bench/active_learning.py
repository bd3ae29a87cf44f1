"""Is the task score worth sorting by? Its rank correlation with the live model's error.

    python -m bench.active_learning --tasks 40 --finetuned 10

An active-learning loop labels the tasks Label Studio lists first when sorted by
prediction score ascending, so a score is worth sorting by when a low score marks a task
the live model gets wrong. On the learning benchmark (``bench/quality.py``: its base, or
the base fine-tuned by the real job on ``--finetuned`` labels of seed 0's project), this
predicts an unlabelled pool (seed 1's project tasks, with ground truth the bench knows) as
served, computes every task score of ``scores.py`` from the same predictions, and prints
Spearman's rank correlation between each score's *uncertainty* (1 - score) and the task's
error (1 - F1 of its boxes at the serving threshold: misses and wrong boxes alike, IoU >=
0.5 with the right label). Positive: the score puts the model's mistakes first.

Not measured here: labels needed to reach random order's final mAP (rounds through the
real job per score), which needs hours of this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from scipy.stats import spearmanr
from torchvision.ops import box_iou

from bench import quality
from bench import quality_data as data
from label_studio_sahi.detector import Detector
from label_studio_sahi.labeling import parse_label_config
from label_studio_sahi.predict import ModelBundle, Predictor, ScoreInputs, SliceConfig
from label_studio_sahi.settings import Settings, TaskScore


def f1_error(result: list[dict], truth: tuple[list, list], width: int, height: int) -> float:
    """1 - F1 of a task's suggested boxes against its true boxes (IoU >= 0.5, same label)."""
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
    if not pred and not boxes:
        return 0.0
    if not pred or not boxes:
        return 1.0
    iou = box_iou(torch.tensor([p[0] for p in pred]), torch.tensor(boxes, dtype=torch.float32))
    taken: set[int] = set()
    for i in sorted(range(len(pred)), key=lambda i: -pred[i][2]):
        free = [j for j in range(len(boxes)) if j not in taken and labels[j] == pred[i][1]]
        best = max(free, key=lambda j: float(iou[i, j]), default=None)
        if best is not None and float(iou[i, best]) >= 0.5:
            taken.add(best)
    return 1 - 2 * len(taken) / (len(pred) + len(boxes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=40, help="tasks in the unlabelled pool")
    parser.add_argument("--finetuned", type=int, metavar="LABELS", default=0)
    args = parser.parse_args(argv)

    model = quality.COMMITTED_BASE
    if args.finetuned:
        work = Path(tempfile.mkdtemp(prefix="ls-sahi-al-"))
        split = quality.test_split(1)  # run_seed scores its live model on it; unused here
        rows = quality.run_seed(0, [args.finetuned], split, model, work, {"train_steps": 600})
        assert rows[-1]["status"] == "accepted", rows[-1]
        model = next((work / "models-0").glob("projects/*/v1/detector"))
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
    pool = [data.target_scene(s) for s in data.project_seeds(1, args.tasks)]
    images = [np.array(scene.image) for scene in pool]
    predictor = Predictor(ModelBundle(detector, None), settings, lambda url, _t: images[int(url)])
    assert SliceConfig.from_settings(settings) == predictor.slicing
    methods: tuple[TaskScore, ...] = get_args(TaskScore)
    by_method: dict[str, list[float]] = {m: [] for m in methods}
    errors = []
    for i, scene in enumerate(pool):
        inputs = ScoreInputs()
        result = predictor.predict_image(images[i], config, "image", None, inputs)
        truth = (
            [list(b) for b in scene.boxes],
            [data.LABELS.index(data.LABEL_OF[c]) for c in scene.classes],
        )
        errors.append(f1_error(result, truth, scene.image.width, scene.image.height))
        for method in methods:
            by_method[method].append(inputs.score(method))
    predictor.close()

    print(
        f"model {model}; {len(pool)} tasks; median error (1 - F1) {statistics.median(errors):.3f}"
    )
    print("\n| score | Spearman rho (uncertainty vs error) | p |")
    print("|---|---|---|")
    for method, values in by_method.items():
        rho, p = spearmanr([1 - v for v in values], errors)
        print(f"| {method} | {rho:+.3f} | {p:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
