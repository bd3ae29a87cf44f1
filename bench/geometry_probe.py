"""Why fine-tuning collapses at the default window geometry (512 px windows): probes.

Runs the job's own ``finetune_detector`` / ``evaluate_detector`` on an e2e-like project
(1600x1200 scenes, the e2e template's Vehicle / Person mapping) without Label Studio, with
one change at a time (``--variant``), and scores base and candidate on the held-out tasks and
a fixed test split, sliced as served.

    python -m bench.geometry_probe --variant default --seeds 0 1 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from label_studio_sahi.inference import checkpoints
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.settings import Settings
from label_studio_sahi.training import candidates, finetune
from label_studio_sahi.training.dataset import LabelledTask, split_holdout
from label_studio_sahi.training.evaluate import evaluate_detector
from label_studio_sahi_plugin.connect import template
from testkit import FIXTURES
from testkit import scenes as data

BASE = FIXTURES / "source-base"
CONFIG = template("boxes-scenes")  # the e2e's labeling config
TAG = parse_label_config(CONFIG).rectangles[0]
LABEL_OF = {"car": "Vehicle", "truck": "Vehicle", "person": "Person"}
GROUNDS = [(128, 128, 128), (215, 190, 120)]
SIZE = (1600, 1200)


OBJECTS = (6, 14)  # --objects: how many objects a scene has
UPSCALE = 1  # --upscale: scenes drawn at SIZE / k and enlarged k times (objects k times larger)


def scene(seed: int) -> data.Scene:
    from PIL import Image

    k = UPSCALE
    s = data.target_scene(
        seed, size=(SIZE[0] // k, SIZE[1] // k), ground=GROUNDS[seed % 2], objects=OBJECTS
    )
    if k == 1:
        return s
    image = s.image.resize(SIZE, Image.Resampling.NEAREST)
    return data.Scene(image, [tuple(v * k for v in b) for b in s.boxes], s.classes)


def task_of(seed: int, s: data.Scene) -> LabelledTask:
    boxes = tuple(
        (LABEL_OF[c], tuple(float(v) for v in b)) for b, c in zip(s.boxes, s.classes, strict=True)
    )
    return LabelledTask(seed, f"/{seed}.png", boxes, (), seed, None)  # type: ignore[arg-type]


def project(seed: int, n: int = 12) -> tuple[list[LabelledTask], list[LabelledTask], dict]:
    seeds = [1 + 12 * seed + i for i in range(n)]  # task ids; 9-10 train, 2-3 held out
    scenes = {s: scene(20_000 + s) for s in seeds}
    tasks = [task_of(s, scenes[s]) for s in seeds]
    train, held = split_holdout(tasks, 0.2)
    return train, held, {s: scenes[s].image for s in seeds}


def test_set(n: int) -> tuple[list[LabelledTask], dict]:
    seeds = [data.TEST_SEED + i for i in range(n)]
    scenes = {s: scene(s) for s in seeds}
    return [task_of(s, scenes[s]) for s in seeds], {s: scenes[s].image for s in seeds}


def settings_for(**over: Any) -> Settings:
    values = {"detector_model": str(BASE), "classifier_model": "", "device": "cpu"}
    values.update(over)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def evaluate(det: Detector, tasks, images, slicing, own: bool) -> dict[str, Any]:
    scored = evaluate_detector(det, TAG, tasks, images, slicing, own_labels=own)
    preds = scored.predictions
    scores = torch.cat([p.scores for p in preds]) if preds else torch.zeros(0)
    sizes = torch.cat([(p.boxes[:, 2:] - p.boxes[:, :2]).prod(1).sqrt() for p in preds])
    return {
        "map_50": round(float(scored.metrics["map_50"]), 4),
        "n_pred": len(scores),
        "n_gt": int(scored.metrics["boxes"]),
        "n_ge_0.3": int((scores >= 0.3).sum()),
        "score_q50_q90_max": [round(float(x), 3) for x in (
            scores.quantile(0.5), scores.quantile(0.9), scores.max())] if len(scores) else [],
        "pred_side_median": round(float(sizes.median()), 1) if len(sizes) else None,
        **recall_at_any(scored),
    }  # fmt: skip


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def recall_at_any(scored: Any) -> dict[str, float]:
    """Share of truth boxes that some prediction (any score >= eval threshold, any class)
    overlaps at IoU >= 0.5, and share of predictions that hit some truth box."""
    hit, total, good, preds = 0, 0, 0, 0
    for p, (boxes, _) in zip(scored.predictions, scored.truths, strict=True):
        gt = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        total += len(gt)
        preds += len(p)
        if len(gt) and len(p):
            iou = _iou(p.boxes.float(), gt)
            hit += int((iou.max(0).values >= 0.5).sum())
            good += int((iou.max(1).values >= 0.5).sum())
    return {
        "recall_any": round(hit / max(total, 1), 3),
        "precision_any": round(good / max(preds, 1), 3),
    }


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    over: dict[str, Any] = {
        "slice_height": args.window, "slice_width": args.window,
        "train_min_steps": args.steps, "train_steps": args.steps,
    }  # fmt: skip
    for item in args.set:
        k, v = item.split("=", 1)
        over[k] = json.loads(v)
    settings = settings_for(**over)
    slicing = SliceConfig.from_settings(settings)
    base = Detector.load(str(BASE), device="cpu", half_precision=False)
    train, held, images = project(seed)
    tests, test_images = test_set(args.test_images)
    out: dict[str, Any] = {"seed": seed, "variant": args.variant, "window": args.window,
                           "steps": args.steps, "set": args.set, "upscale": args.upscale, "size": SIZE, "objects": OBJECTS,
                           "train_tasks": len(train), "held_tasks": len(held)}  # fmt: skip
    if not args.skip_base:
        out["base_held"] = evaluate(base, held, images, slicing, own=False)
        out["base_test"] = evaluate(base, tests, test_images, slicing, own=False)
    stack = contextlib.ExitStack()
    v = args.variant
    if v == "native":  # train and serve windows at their own size (no 4x shrink)
        stack.enter_context(patched(finetune, "process_images", _native_process))
        slicing = SliceConfig.from_settings(
            settings.model_copy(update={"native_window_size": True})
        )
    elif v == "nofull":
        orig = candidates.training_windows
        stack.enter_context(patched(candidates, "training_windows",
                                    lambda *a, **k: orig(*a, **{**k, "include_full_image": False})))  # fmt: skip
    if "sizeprior" in v:  # re-centre the box head's w/h bias on the training boxes' sizes
        out["sizeprior"] = _size_prior(stack, base, settings, train, images)
        v = v.replace("sizeprior", "").strip("+") or "default"
    if "relabelfirst" in v:  # a many-to-one label takes its first source row (car), not the mean
        stack.enter_context(patched(finetune, "_relabelled", _relabelled_first))
        v = v.replace("relabelfirst", "").strip("+") or "default"
    if "canvas" in v:  # targets normalised by the padded canvas, as transformers' processor does
        stack.enter_context(patched(finetune, "_targets", _canvas_targets(base.processor)))
        v = v.replace("canvas", "").strip("+") or "default"
    if v == "nograd":
        stack.enter_context(patched(candidates, "train_detector", lambda *a, **k: [0.0]))
    elif v == "train128":  # train on 128 px windows (the model's input), serve as set
        orig_ft = candidates.finetune_detector
        stack.enter_context(
            patched(
                candidates,
                "finetune_detector",
                lambda s, *a, **k: orig_ft(
                    s.model_copy(update={"slice_height": 128, "slice_width": 128}), *a, **k
                ),
            )
        )
    parts: list[dict[str, float]] = []
    orig_train = candidates.train_detector

    def logged(model: Any, *a: Any, **k: Any) -> Any:
        def hook(_m: Any, _i: Any, output: Any) -> None:
            if getattr(output, "loss_dict", None):
                parts.append(
                    {n: float(v) for n, v in output.loss_dict.items() if "_" not in n[-2:]}
                )

        handle = model.register_forward_hook(hook)
        try:
            return orig_train(model, *a, **k)
        finally:
            handle.remove()

    if v != "nograd":
        stack.enter_context(patched(candidates, "train_detector", logged))
    v = args.variant
    start = time.monotonic()
    with stack:
        tuned = candidates.finetune_detector(settings, base, TAG, train, images)
        cand, curve, windows = tuned.detector, tuned.curve, tuned.windows
        out["train_seconds"] = round(time.monotonic() - start, 1)
        out["windows"] = windows
        out["loss_first_last"] = [
            round(float(np.mean(curve[:10])), 3),
            round(float(np.mean(curve[-10:])), 3),
        ]
        if parts:
            keys = [k for k in parts[0] if k in ("loss_ce", "loss_bbox", "loss_giou")]
            out["parts_first_last"] = {
                k: [round(float(np.mean([p[k] for p in parts[:20]])), 3),
                    round(float(np.mean([p[k] for p in parts[-20:]])), 3)] for k in keys}  # fmt: skip
        out["cand_held"] = evaluate(cand, held, images, slicing, own=True)
        out["cand_test"] = evaluate(cand, tests, test_images, slicing, own=True)
        if args.eval_train:  # does the candidate fit the windows it trained on?
            out["cand_train"] = evaluate(cand, train, images, slicing, own=True)
            out["base_train"] = evaluate(base, train, images, slicing, own=False)
    return out


def _size_prior(
    stack: contextlib.ExitStack,
    base: Detector,
    settings: Settings,
    train: list[LabelledTask],
    images: dict,
) -> dict[str, float]:
    from label_studio_sahi.training.dataset import crop, training_windows

    wins = training_windows(
        [images[t.task_id].size for t in train], [list(t.boxes) for t in train],
        slice_height=settings.slice_height, slice_width=settings.slice_width,
        overlap_height_ratio=0.2, overlap_width_ratio=0.2, min_area_ratio=0.1,
        negative_ratio=0.0, include_full_image=False)  # fmt: skip
    ws, hs = [], []
    for w in wins:
        ww, wh = w.window[2] - w.window[0], w.window[3] - w.window[1]
        ws += [(b[2] - b[0]) / ww for b in w.boxes]
        hs += [(b[3] - b[1]) / wh for b in w.boxes]
    crops = [np.array(crop(images[train[w.task_index].task_id], w.window)) for w in wins[:16]]
    with torch.no_grad():
        outs = base.model(**base.preprocess(crops))
    probs = outs.logits.sigmoid().max(-1).values
    top = outs.pred_boxes[probs >= probs.quantile(0.75)]  # the base's confident queries
    t = torch.tensor([np.median(ws), np.median(hs)])
    p = top[:, 2:].median(0).values
    delta = torch.logit(t) - torch.logit(p)
    orig = candidates.relabel_head

    def relabel(model: Any, *a: Any, **k: Any) -> None:
        orig(model, *a, **k)
        with torch.no_grad():
            model.bbox_predictor.layers[-1].bias[2:4] += delta.to(
                model.bbox_predictor.layers[-1].bias
            )

    stack.enter_context(patched(candidates, "relabel_head", relabel))
    return {"target_wh": [round(float(x), 4) for x in t], "base_wh": [round(float(x), 4) for x in p],
            "delta": [round(float(x), 3) for x in delta]}  # fmt: skip


_orig_targets = finetune._targets


def _canvas_targets(processor: Any) -> Any:
    def targets(batch: Any, device: Any) -> Any:
        mask = checkpoints.process_images(processor, [s.image for s in batch])["pixel_mask"]
        out = _orig_targets(batch, device)
        ch, cw = mask.shape[-2:]
        for t, m in zip(out, mask, strict=True):
            vh, vw = int(m.any(1).sum()), int(m.any(0).sum())
            t["boxes"] = t["boxes"] * torch.tensor([vw / cw, vh / ch, vw / cw, vh / ch])
        return out

    return targets


_orig_relabelled = finetune._relabelled


def _relabelled_first(module: Any, n_old: int, sources: list[list[int]]) -> Any:
    """Each label from the first of its source classes (car for Vehicle), not their mean."""
    return _orig_relabelled(module, n_old, [src[:1] for src in sources])


def _native_process(processor: Any, images: Any, size: Any = None, device: Any = None) -> Any:
    """process_images with each batch kept at its samples' own size (largest side <= 1024)."""
    sizes = {im.size for im in images}
    if len(sizes) == 1:
        w, h = sizes.pop()
        size = {"shortest_edge": min(w, h), "longest_edge": max(w, h)}
    else:  # a whole image with windows: each at the window scale would be huge; use 512
        size = {"shortest_edge": 512, "longest_edge": 1024}
    return checkpoints.process_images(processor, images, size=size, device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--test-images", type=int, default=6)
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--upscale", type=int, default=1)
    p.add_argument("--eval-train", action="store_true")
    p.add_argument("--objects", type=int, nargs=2, default=[6, 14])
    p.add_argument("--size", type=int, nargs=2, default=[1600, 1200])
    args = p.parse_args(argv)
    global UPSCALE, SIZE, OBJECTS
    UPSCALE, SIZE, OBJECTS = args.upscale, tuple(args.size), tuple(args.objects)
    for seed in args.seeds:
        print(json.dumps(run(args, seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
