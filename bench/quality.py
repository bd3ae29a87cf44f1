"""Does labelling make the model better? Rounds of labels through the real fine-tuning job.

    python -m bench.quality                       # 3 seeds, rounds 10 25 50 100 (CPU, ~20 min)
    python -m bench.quality --seeds 0 --rounds 4 8 --test-images 3 --tiny   # the CI path

Per seed, a Label Studio stand-in (``testkit/fake_studio.py``, real HTTP) holds a project of
large synthetic images (``testkit/scenes.py``). Round by round more of its tasks are
labelled and the real job runs on it (export, sliced windows, fine-tune, held-out gate,
publish, live pointer in a real Redis), starting from a base trained on another domain.
After each round the *live* model (the promoted one, or its parent when the candidate was
rejected) is scored on a fixed test split that no job and no choice ever saw:

* ``map``, ``map_50``, ``map_small``: COCO AP at IoU .50:.95, .50, and of small objects
  (boxes scored down to 0.05, as mAP needs the tail of the precision-recall curve);
* ``accept``: pre-annotation acceptance at the serving threshold: the share of true boxes
  a prediction already matches (IoU >= 0.5, right label): what the annotator need not draw;
* ``edit``: wrong boxes at the serving threshold per image: what the annotator deletes.

Prints a table per seed and the median over seeds, writes ``results.json`` and a learning
curve ``learning_curve.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from label_studio_sahi import names
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.scores import one_to_one_matches
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.evaluate import (
    EVAL_SCORE_THRESHOLD,
    detection_metrics,
    in_project_labels,
    truth_detections,
)
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.bundles import (
    ModelBundle,
    live_version,
    project_bundle,
    version_bundle,
)
from label_studio_sahi.versions.registry import Registry
from testkit import FIXTURES
from testkit import scenes as data
from testkit.fake_studio import FakeStudio

ROOT = Path(__file__).resolve().parent.parent
COMMITTED_BASE = FIXTURES / "source-base"
TAG = parse_label_config(data.LABEL_CONFIG).rectangles[0]


@dataclass(frozen=True)
class Round:
    """What a labelling round chooses from: the live models as served, the project's scenes,
    the indices of those not labelled yet, and how many to label now."""

    bundle: ModelBundle
    settings: Settings
    scenes: list[data.Scene]
    unlabelled: list[int]
    count: int


# Which unlabelled tasks (indices into the project's scenes) to label next.
Chooser = Callable[[Round], list[int]]
# A project's scene for a seed (the same seed, the same scene).
SceneMaker = Callable[[int], data.Scene]
SLICE = data.SOURCE_SIZE  # windows at the scale the base was trained at


@dataclass
class TestSplit:
    images: list[np.ndarray]
    truths: list[tuple[list[tuple[float, float, float, float]], list[int]]]
    sizes: list[tuple[int, int]]


def test_split(count: int, make: SceneMaker = data.target_scene) -> TestSplit:
    images, truths, sizes = [], [], []
    for seed in data.test_seeds(count):
        scene = make(seed)
        images.append(np.array(scene.image))
        truths.append(
            (
                [tuple(float(v) for v in b) for b in scene.boxes],  # type: ignore[misc]
                [data.LABELS.index(data.LABEL_OF[c]) for c in scene.classes],
            )
        )
        sizes.append(scene.image.size)
    return TestSplit(images, truths, sizes)


def base_model(
    cache: Path, family: str = "conditional_detr", steps: int = 3000, scale: int = 1
) -> Path:
    """The committed source-domain base, or one of ``family`` trained into ``cache`` (seeded);
    ``scale``: pretrained on source scenes that many times larger (``train_source_base``)."""
    if (
        family == "conditional_detr"
        and steps == 3000
        and scale == 1
        and (COMMITTED_BASE / "config.json").is_file()
    ):
        return COMMITTED_BASE
    out = cache / (f"source-base-{family}-{steps}" + (f"-x{scale}" if scale != 1 else ""))
    if not (out / "config.json").is_file():
        print(f"training the {family} source-domain base into {out}", flush=True)
        start = time.monotonic()
        data.train_source_base(out, steps=steps, family=family, scale=scale)
        (out / "train_seconds.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    return out


def acceptance_and_edits(
    predictions: Sequence[Any], split: TestSplit, threshold: float
) -> tuple[float, float]:
    """(share of true boxes matched at IoU >= 0.5 with the right label, wrong boxes per image),
    predictions above ``threshold``, matched greedily by score as an annotator would accept."""
    matched = total = wrong = 0
    for det, (boxes, labels) in zip(predictions, split.truths, strict=True):
        shown = det.select(det.scores >= threshold)
        found = one_to_one_matches(shown, truth_detections(boxes, labels))
        matched += found
        total += len(boxes)
        wrong += len(shown) - found
    return matched / max(1, total), wrong / max(1, len(split.truths))


def score(
    detector: Detector,
    tag: Any,
    split: TestSplit,
    slicing: SliceConfig,
    threshold: float,
    detect: Callable[[np.ndarray], Detections] | None = None,
) -> dict[str, float | None]:
    """Test-split metrics of a detector as served (classes mapped to the project's labels);
    ``detect``: another way to get an image's boxes than ``sliced_detect`` (a variant)."""
    own = list(detector.id2label.values()) == list(tag.labels)
    predictions = []
    for pixels in split.images:
        found = (
            detect(pixels)
            if detect is not None
            else sliced_detect(detector, pixels, slicing, EVAL_SCORE_THRESHOLD)
        )
        predictions.append(in_project_labels(found, detector.id2label, tag, own))
    metrics = detection_metrics(predictions, split.truths, len(tag.labels), split.sizes)
    accept, edit = acceptance_and_edits(predictions, split, threshold)
    return {
        "map": metrics["map"],
        "map_50": metrics["map_50"],
        "map_small": metrics["map_small"],
        "accept": accept,
        "edit": edit,
    }


def png(scene: data.Scene) -> bytes:
    out = io.BytesIO()
    scene.image.save(out, "PNG", compress_level=1)  # fast; the bench is not about bytes
    return out.getvalue()


def served_values(overrides: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's serving and job settings: the defaults, on a CPU, but for what
    ``--set`` says (any setting the job reads, ``slice_width=512`` included)."""
    return {"device": "cpu", **overrides}


def run_seed(
    seed: int,
    rounds: list[int],
    split: TestSplit,
    base: Path,
    work: Path,
    overrides: dict[str, Any],
    base_score: dict[str, Any] | None = None,
    pool: int | None = None,
    choose: Chooser | None = None,
    make: SceneMaker = data.target_scene,
    judge_candidate: bool = False,
) -> list[dict[str, Any]]:
    """Rounds of labels for one seed; a row per round (round 0: the base, scored here
    unless ``base_score`` has its test-split scores already: the same for every seed).

    With ``judge_candidate`` each row also has the test-split scores of the round's
    candidate (``candidate_map_50`` ...): the model trained on the labels so far, whether
    or not the gate promoted it (the live model's when it did). Each row keeps the tasks
    the round labelled (``picked``) and the true objects they hold (``picked_objects``).

    The project holds ``pool`` tasks (default: as many as the last round labels), drawn by
    ``make`` from the project's seeds. Each round
    labels the tasks ``choose`` picks among the unlabelled ones with the live models, or the
    next ones in the project's order (its scenes are independent draws: a random order).
    """
    torch.set_num_threads(1)  # also in a pool's worker process
    rows: list[dict[str, Any]] = []
    redis_server = EmbeddedRedis(work / f"redis-{seed}")
    client = connect(redis_server.start())
    try:
        with FakeStudio() as fake:
            pid = fake.add_project(data.LABEL_CONFIG, title=f"quality seed {seed}")
            tag = TAG
            values: dict[str, Any] = {
                "label_studio_url": fake.url,
                "label_studio_api_key": fake.legacy_token,
                "detector_model": str(base),
                "classifier_model": "",
                "model_dir": work / f"models-{seed}",
                "window_batch_size": 8,
                **served_values(overrides),
            }
            settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
            registry = Registry.for_settings(settings, client)
            scenes = [make(s) for s in data.project_seeds(seed, pool or max(rounds))]
            tasks = [fake.add_task(pid, {"image": fake.upload(pid, f"{i}.png", png(s))})
                     for i, s in enumerate(scenes)]  # fmt: skip
            bundle = project_bundle(settings, registry, str(pid))
            assert bundle.detector is not None
            slicing = SliceConfig.from_settings(settings, bundle.detector)
            if base_score is None:
                base_score = score(bundle.detector, tag, split, slicing, settings.score_threshold)
            rows.append({"seed": seed, "labels": 0, "status": "base", "version": "base", **base_score})  # fmt: skip
            live_score = base_score
            unlabelled = list(range(len(scenes)))
            labelled = 0
            for n in rounds:
                picked = (
                    choose(Round(bundle, settings, scenes, list(unlabelled), n - labelled))
                    if choose is not None
                    else unlabelled[: n - labelled]
                )
                assert len(picked) == n - labelled and set(picked) <= set(unlabelled), picked
                for i in picked:
                    fake.add_annotation(tasks[i], data.export_result(scenes[i]))
                    unlabelled.remove(i)
                labelled = n
                start = time.monotonic()
                summary = run_training(
                    JobContext(settings, registry), str(pid), f"{n} labels", f"s{seed}-n{n}"
                )
                wall = time.monotonic() - start
                version = registry.get(str(pid), summary["version"])
                steps = len(version.meta["curves"].get("detector", []))
                # Read once, as serving reads it: the row's version and the bundle agree.
                live_now = live_version(registry, str(pid))
                live = live_now.name if live_now is not None else "base"
                if rows[-1]["version"] != live:  # else the same live model: bundle and score stand
                    bundle = version_bundle(settings, live_now)
                    assert bundle.detector is not None
                    live_score = score(
                        bundle.detector, tag, split, slicing, settings.score_threshold
                    )
                judged: dict[str, Any] = {}
                if judge_candidate:
                    candidate_score = (
                        live_score
                        if summary["status"] == "accepted"
                        else score(Detector.load(str(version.path / names.DETECTOR_DIR), device="cpu"),
                                   tag, split, slicing, settings.score_threshold)
                    )  # fmt: skip
                    judged = {f"candidate_{k}": v for k, v in candidate_score.items()}
                rows.append(
                    {
                        "seed": seed,
                        "labels": n,
                        "status": summary["status"],
                        "version": live,
                        "job_seconds": round(wall, 1),
                        "windows": summary["dataset"].get("windows"),
                        "steps": steps,
                        "windows_per_s": round(steps * settings.train_batch_size / wall, 1),
                        "heldout_candidate": summary["metrics"]["candidate"]["map_50"],
                        "heldout_live": summary["metrics"]["live"]["map_50"],
                        "why": version.meta.get("decision", {}).get("detector", {}).get("why"),
                        "picked": sorted(picked),
                        "picked_objects": sum(len(scenes[i].boxes) for i in picked),
                        **live_score,
                        **judged,
                    }
                )
                print(_row(rows[-1]), flush=True)
    finally:
        redis_server.stop()
    return rows


def finetuned_base(seed: int, labels: int, split: TestSplit) -> Path:
    """The committed base fine-tuned by the real job on ``labels`` labels of ``seed``'s
    project (600 steps, as the CPU-sized rounds): its v1 detector folder, which the job
    must have accepted."""
    work = Path(tempfile.mkdtemp(prefix="ls-sahi-finetuned-"))
    rows = run_seed(seed, [labels], split, COMMITTED_BASE, work, {"train_steps": 600})
    assert rows[-1]["status"] == "accepted", rows[-1]
    return next((work / f"models-{seed}").glob("projects/*/v1/detector"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


COLUMNS = ("seed", "labels", "status", "version", "map", "map_50", "map_small", "accept", "edit",
           "job_seconds", "windows_per_s")  # fmt: skip


def _row(row: dict[str, Any]) -> str:
    return "| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |"


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join(_row(r) for r in rows)


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r["labels"] for r in rows}):
        same = [r for r in rows if r["labels"] == n]
        row: dict[str, Any] = {"seed": "median", "labels": n}
        for key in ("map", "map_50", "map_small", "accept", "edit", "job_seconds", "windows_per_s"):
            values = [r[key] for r in same if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["status"] = "/".join(r["status"][0] for r in same)
        out.append(row)
    return out


def promoted_below_parent(rows: list[dict[str, Any]]) -> list[str]:
    """The promoted rounds whose live model scores below the model it replaced on the test
    split (the gate judges on held-out tasks the job can see; this is the check it held)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        parent: float | None = None
        for row in sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["labels"]):
            if row["status"] == "accepted" and parent is not None and row["map_50"] < parent:
                out.append(
                    f"seed {seed}, {row['labels']} labels: {row['map_50']:.3f} < {parent:.3f}"
                )
            parent = row["map_50"]
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        xs = [r["labels"] for r in mine]
        axes[0].plot(xs, [r["map_50"] for r in mine], marker="o", label=f"seed {seed}")
        axes[1].plot(xs, [r["accept"] for r in mine], marker="o", label=f"seed {seed}")
    axes[0].set_ylabel("test mAP@.5")
    axes[1].set_ylabel("pre-annotation acceptance")
    for ax in axes:
        ax.set_xlabel("labelled images")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


ABLATIONS: dict[str, dict[str, Any]] = {
    "recipe (defaults)": {},
    "no augmentation (grid windows only)": {"train_augment": False},
    "fixed 300 steps": {"train_min_steps": 300, "train_steps": 300},
    "no negative windows": {"negative_window_ratio": 0.0},
    "old recipe (grid, fixed 300 steps)": {
        "train_augment": False, "train_min_steps": 300, "train_steps": 300,
    },
}  # fmt: skip


def ablation(
    seeds: list[int], labels: int, split: TestSplit, base: Path, work: Path,
    overrides: dict[str, Any], jobs: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """One job per variant and seed at ``labels`` labels from the base; the figure that
    decides is the job's own held-out mAP@.5 of the candidate (never the test split)."""
    plan = [(name, seed) for name in ABLATIONS for seed in seeds]
    with ProcessPoolExecutor(jobs) as pool:
        runs = [
            pool.submit(run_seed, seed, [labels], split, base, work / f"ablation-{i}",
                        {**overrides, **ABLATIONS[name]})
            for i, (name, seed) in enumerate(plan)
        ]  # fmt: skip
        rows = []
        for (name, _), run in zip(plan, runs, strict=True):
            row = run.result()[-1]
            rows.append({"variant": name, **row})
    return rows


def family_run(
    family: str, seeds: list[int], rounds: list[int], split: TestSplit, base_steps: int,
    cache: Path, work: Path, overrides: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """One family: its source base (``base_steps`` steps, like every other family's), then
    the rounds on each seed, through the real job."""
    torch.set_num_threads(1)
    base = base_model(cache, family, base_steps)
    seconds = base / "train_seconds.txt"
    info = {
        "family": family,
        "params_m": round(sum(p.numel() for p in Detector.load(str(base), device="cpu").model.parameters()) / 1e6, 2),
        "base_s_per_step": round(float(seconds.read_text()) / base_steps, 3) if seconds.is_file() else None,
    }  # fmt: skip
    rows = []
    for seed in seeds:
        rows += [
            {**info, **row}
            for row in run_seed(seed, rounds, split, base, work / f"{family}-{seed}", overrides)
        ]
    return rows


def families(
    names: list[str], seeds: list[int], rounds: list[int], split: TestSplit, base_steps: int,
    cache: Path, work: Path, overrides: dict[str, Any], jobs: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """The families side by side: same source data and base steps, same rounds and job."""
    with ProcessPoolExecutor(jobs) as pool:
        runs = [pool.submit(family_run, f, seeds, rounds, split, base_steps, cache, work, overrides)
                for f in names]  # fmt: skip
        return [row for run in runs for row in run.result()]


def sahi_table(seed: int, labels: int, split: TestSplit, base: Path) -> list[dict[str, Any]]:
    """SAHI's ordering on the same data: fine-tuning on whole images or on slices, then
    inference on the whole image or sliced. Both fine-tunes bypass the gate (the table
    compares recipes, not promotions)."""
    from label_studio_sahi.training.candidates import finetune_detector
    from label_studio_sahi.training.dataset import LabelledTask

    tag = TAG
    scenes = [data.target_scene(s) for s in data.project_seeds(seed, labels)]
    train = [
        LabelledTask(i, f"{i}.png", tuple((data.LABEL_OF[c], tuple(map(float, b)))  # type: ignore[misc]
                                          for b, c in zip(s.boxes, s.classes, strict=True)),
                     (), None, None)
        for i, s in enumerate(scenes)
    ]  # fmt: skip
    images = {i: s.image for i, s in enumerate(scenes)}
    whole = 8192  # one window: the whole image
    inference = {
        "full image": SliceConfig(slice_height=whole, slice_width=whole),
        "sliced (SAHI)": SliceConfig(slice_height=SLICE, slice_width=SLICE),
    }
    rows = []
    base_detector = Detector.load(str(base), device="cpu")
    for training, size in (("whole images", whole), ("slices (SAHI)", SLICE)):
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            slice_height=size, slice_width=size, device="cpu", train_steps=600,
            train_augment=size == SLICE,
        )  # fmt: skip
        tuned = finetune_detector(settings, base_detector, tag, train, images)
        detector, windows = tuned.detector, tuned.windows
        for name, slicing in inference.items():
            rows.append({"fine-tuning on": training, "windows": windows, "inference": name,
                         **score(detector, tag, split, slicing, settings.score_threshold)})  # fmt: skip
            print(rows[-1], flush=True)
    for name, slicing in inference.items():
        rows.append({"fine-tuning on": "none (base)", "inference": name,
                     **score(base_detector, tag, split, slicing, 0.3)})  # fmt: skip
    return rows


def native_table(split: TestSplit, base: Path, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The base on the test split with windows smaller than its processor's input (128 px),
    resized up to it as by default, or fed at their own size (NATIVE_WINDOW_SIZE); each
    run by PyTorch and by ONNX Runtime (DETECTOR_ENGINE)."""
    rows = []
    for engine in ("torch", "onnxruntime"):
        detector = Detector.load(str(base), device="cpu", engine=engine)  # type: ignore[arg-type]
        assert detector.engine == engine, f"{engine} did not load"
        for size in sizes:
            for native in (False, True):
                slicing = SliceConfig(slice_height=size, slice_width=size, native_windows=native)
                rows.append({"engine": engine, "window": size, "native": native,
                             **score(detector, TAG, split, slicing, 0.3)})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--test-images", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    parser.add_argument(
        "--tiny", action="store_true", help="few steps: checks the path, not quality"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="TRAIN_STEPS, the cap on steps per job (default: the backend's)",
    )
    parser.add_argument("--judge-candidate", action="store_true",
                        help="also score every round's candidate on the test split")  # fmt: skip
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="the project's objects (and the test split's) this many times larger")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once, each in its own process on one core")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="SETTING=VALUE",
                        help="settings for the job, e.g. train_augment=false (ablations)")  # fmt: skip
    parser.add_argument(
        "--ablation",
        type=int,
        metavar="LABELS",
        help="instead of rounds: each recipe variant at LABELS labels, per seed",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help="instead of rounds: each DETR family (detr conditional_detr deformable_detr "
        "rt_detr) from its own source base, through the same rounds",
    )
    parser.add_argument("--native-table", type=int, nargs="+", metavar="WINDOW",
                        help="instead of rounds: the base with WINDOW px windows, upscaled vs native")  # fmt: skip
    parser.add_argument("--base-steps", type=int, default=3000,
                        help="steps of source-domain training for a family's base")  # fmt: skip
    parser.add_argument("--base-scale", type=int, default=1,
                        help="a base pretrained on source scenes this many times larger (4: "
                             "at the geometry of 512 px windows)")  # fmt: skip
    parser.add_argument(
        "--sahi-table",
        type=int,
        metavar="LABELS",
        help="instead of rounds: whole-image vs sliced fine-tuning x inference",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steady on a shared 2-core machine
    overrides: dict[str, Any] = dict(item.split("=", 1) for item in args.set)
    if args.tiny or args.max_steps:
        overrides.setdefault("train_steps", 20 if args.tiny else args.max_steps)
    if args.tiny:
        overrides.setdefault("train_min_steps", 20)
    args.out.mkdir(parents=True, exist_ok=True)
    make: SceneMaker = functools.partial(data.target_scene, object_scale=args.object_scale)
    split = test_split(args.test_images, make)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ls-sahi-quality-") as tmp:
        base = base_model(args.out / "cache", steps=args.base_steps, scale=args.base_scale)
        if args.ablation or args.sahi_table or args.families or args.native_table:
            if args.native_table:
                extra = native_table(split, base, args.native_table)
                name = "native_table"
            elif args.families:
                extra = families(args.families, args.seeds, sorted(args.rounds), split,
                                 args.base_steps, args.out / "cache", Path(tmp), overrides,
                                 args.jobs)  # fmt: skip
                name = "families"
            elif args.ablation:
                extra = ablation(
                    args.seeds, args.ablation, split, base, Path(tmp), overrides, args.jobs
                )
                name = "ablation"
            else:
                extra = sahi_table(args.seeds[0], args.sahi_table, split, base)
                name = "sahi_table"
            (args.out / f"{name}.json").write_text(json.dumps(extra, indent=2, default=str))
            for row in extra:
                print(json.dumps(row, default=str))
            print(f"wall time {time.monotonic() - started:.0f} s")
            return 0
        rounds = sorted(args.rounds)
        served = Settings(_env_file=None, **served_values(overrides))  # type: ignore[call-arg]
        detector = Detector.load(str(base), device="cpu")
        base_score = score(detector, TAG, split, SliceConfig.from_settings(served, detector),
                           served.score_threshold)  # fmt: skip
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                runs = [pool.submit(run_seed, s, rounds, split, base, Path(tmp), overrides, base_score,
                                    make=make, judge_candidate=args.judge_candidate)
                        for s in args.seeds]  # fmt: skip
                for run in runs:
                    rows += run.result()
        else:
            for seed in args.seeds:
                rows += run_seed(
                    seed, rounds, split, base, Path(tmp), overrides, base_score, make=make,
                    judge_candidate=args.judge_candidate,
                )  # fmt: skip
    print(f"benchmark wall time {time.monotonic() - started:.0f} s")
    print(table(rows))
    print()
    print(table(medians(rows)))
    below = promoted_below_parent(rows)
    print(f"promoted below their parent on the test split: {len(below)}", *below, sep="\n  ")
    (args.out / "results.json").write_text(
        json.dumps({"settings": overrides, "rows": rows}, indent=2, default=str)
    )
    plot(rows, args.out / "learning_curve.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'learning_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
