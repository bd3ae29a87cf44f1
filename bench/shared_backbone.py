"""One backbone pass per image instead of one per overlapping window: does it hold up?

    python -m bench.shared_backbone --test-images 8

The windows overlap by 20 %, so per-window inference runs the backbone over about 1.5x the
image's pixels. The alternative: run the backbone once over the whole image (at the scale
the windows are fed at) and cut each window's cells out of its feature map for the
transformer. A window must then start on a feature cell (a multiple of the backbone's
stride), and its cells see context beyond its edges that a window alone does not.

On the learning benchmark's base (the Conditional DETR of ``bench/quality.py``, 128 px
windows fed at 128) and its fixed test split, this prints:

* how far the boxes move: per-window vs shared-backbone boxes on the same (stride-aligned)
  windows, matched by label and IoU;
* the test split's mAP for the default grid, the aligned grid per window, and the aligned
  grid with the shared backbone (whole-image pass and merge as served, in all three);
* time of both on the test images (interleaved rounds, medians), and for DETR-R50 the
  backbone's share of one 800 px window's forward (what the sharing could save at most).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from bench import quality
from bench.bench_predict import build_detr_r50
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.inference.slicing import Detections, merge_detections, slice_windows

WINDOW = 128


class CutFeatures(torch.nn.Module):
    """Stands in for the model's backbone: returns the feature cells cut for this batch."""

    def __init__(self) -> None:
        super().__init__()
        self.features: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> Any:
        return self.features


def backbone_stride(detector: Detector) -> int:
    pixels = torch.zeros(1, 3, WINDOW, WINDOW)
    with torch.inference_mode():
        fmap, _ = detector.model.model.backbone(pixels, torch.ones(1, WINDOW, WINDOW))[-1]
    return WINDOW // fmap.shape[-1]


def aligned_windows(height: int, width: int, stride: int) -> list[tuple[int, int]]:
    """The default grid's window origins moved down to a multiple of ``stride`` (the last
    row and column may stop up to stride - 1 px short of the edge; the whole-image pass
    still covers it)."""
    grid = slice_windows(height, width, WINDOW, WINDOW, 0.2, 0.2).tolist()
    return sorted({(x1 // stride * stride, y1 // stride * stride) for x1, y1, _, _ in grid})


def per_window(
    detector: Detector, pixels: np.ndarray, origins: list[tuple[int, int]]
) -> list[Detections]:
    # One window per forward pass, as served on a CPU (and as the shared variant runs).
    return [
        detector.detect([pixels[y : y + WINDOW, x : x + WINDOW]], quality.EVAL_SCORE_THRESHOLD)[
            0
        ].shifted(x, y)
        for x, y in origins
    ]


def shared(
    detector: Detector, pixels: np.ndarray, origins: list[tuple[int, int]], stride: int
) -> list[Detections]:
    height, width = pixels.shape[:2]
    inputs = detector.process([pixels], size={"height": height, "width": width})
    model = detector.model.model
    backbone, cut = model.backbone, CutFeatures()
    cells = WINDOW // stride
    found = []
    with torch.inference_mode():
        fmap, mask = backbone(inputs["pixel_values"], inputs["pixel_mask"])[-1]
        try:
            model.backbone = cut
            for x, y in origins:
                i, j = y // stride, x // stride
                cut.features = [
                    (
                        fmap[..., i : i + cells, j : j + cells],
                        mask[..., i : i + cells, j : j + cells],
                    )
                ]
                out = detector.model(pixel_values=torch.zeros(1, 3, WINDOW, WINDOW))
                det = detector.postprocess(out, [(WINDOW, WINDOW)], quality.EVAL_SCORE_THRESHOLD)[0]
                found.append(det.shifted(x, y))
        finally:
            model.backbone = backbone
    return found


def served(
    detector: Detector, pixels: np.ndarray, windows: list[Detections], slicing: SliceConfig
) -> Detections:
    """The windows' boxes with the whole-image pass, merged as sliced_detect merges them."""
    whole = detector.detect([pixels], quality.EVAL_SCORE_THRESHOLD)
    return merge_detections(
        Detections.cat([*windows, *whole]),
        slicing.merge_type,
        slicing.merge_metric,
        slicing.merge_threshold,
        slicing.class_agnostic,
    )


def movement(a: list[Detections], b: list[Detections], threshold: float) -> dict[str, float]:
    """Boxes of ``a`` over ``threshold`` matched to ``b``'s window by window (same label)."""
    ious, shifts, unmatched, total = [], [], 0, 0
    for da, db in zip(a, b, strict=True):
        keep_a, keep_b = da.scores >= threshold, db.scores >= threshold
        boxes_a, labels_a = da.boxes[keep_a], da.labels[keep_a]
        boxes_b, labels_b = db.boxes[keep_b], db.labels[keep_b]
        for box, label in zip(boxes_a, labels_a, strict=True):
            total += 1
            same = labels_b == label
            if not same.any():
                unmatched += 1
                continue
            iou = box_iou(box[None], boxes_b[same])[0]
            best = int(iou.argmax())
            ious.append(float(iou[best]))
            shifts.append(float((boxes_b[same][best] - box).abs().max()))
            unmatched += float(iou[best]) < 0.5
    return {
        "boxes": total,
        "matched_iou_0.5": 1 - unmatched / max(total, 1),
        "median_iou": statistics.median(ious) if ious else 0.0,
        "median_max_corner_shift_px": statistics.median(shifts) if shifts else 0.0,
    }


def r50_backbone_share(rounds: int) -> float:
    """Backbone time over whole-forward time for one 800x800 window of DETR-R50."""
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector.load(str(build_detr_r50(Path(tmp) / "r50")), device="cpu")
    pixels, mask = torch.rand(1, 3, 800, 800), torch.ones(1, 800, 800, dtype=torch.long)
    shares = []
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            detector.model.model.backbone(pixels, mask)
            backbone = time.perf_counter() - start
            start = time.perf_counter()
            detector.model(pixel_values=pixels, pixel_mask=mask)
            shares.append(backbone / (time.perf_counter() - start))
    return statistics.median(shares)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--finetuned",
        type=int,
        metavar="LABELS",
        help="judge the base fine-tuned by the real job on LABELS labels (seed 0) instead",
    )
    args = parser.parse_args(argv)
    split = quality.test_split(args.test_images)
    base = quality.COMMITTED_BASE
    if args.finetuned:
        base = quality.finetuned_base(0, args.finetuned, split)
    detector = Detector.load(str(base), device="cpu")
    stride = backbone_stride(detector)
    slicing = SliceConfig(slice_height=WINDOW, slice_width=WINDOW)
    print(f"model {base}, backbone stride {stride}, {len(split.images)} test images", flush=True)

    moved = [movement(per_window(detector, p, o), shared(detector, p, o, stride), 0.3)
             for p, o in ((p, aligned_windows(*p.shape[:2], stride)) for p in split.images)]  # fmt: skip
    print("\nbox movement, per-window -> shared backbone (score >= 0.3, per image):")
    for key in moved[0]:
        print(f"  {key}: median {statistics.median(m[key] for m in moved):.3f}")

    variants: dict[str, Callable[[np.ndarray], Detections]] = {
        "default grid, per window": lambda p: served(
            detector,
            p,
            per_window(
                detector,
                p,
                [
                    (x, y)
                    for x, y, _, _ in slice_windows(*p.shape[:2], WINDOW, WINDOW, 0.2, 0.2).tolist()
                ],
            ),
            slicing,
        ),
        "aligned grid, per window": lambda p: served(
            detector, p, per_window(detector, p, aligned_windows(*p.shape[:2], stride)), slicing
        ),
        "aligned grid, shared backbone": lambda p: served(
            detector, p, shared(detector, p, aligned_windows(*p.shape[:2], stride), stride), slicing
        ),
    }
    print("\n| variant | mAP@.5 | mAP | mAP small | acceptance | wrong boxes / image |")
    print("|---|---|---|---|---|---|")
    for name, detect in variants.items():
        m = quality.score(detector, quality.TAG, split, slicing, 0.3, detect=detect)
        print(f"| {name} | {m['map_50']:.3f} | {m['map']:.3f} | {m['map_small']:.3f} | "
              f"{m['accept']:.2f} | {m['edit']:.1f} |", flush=True)  # fmt: skip

    times: dict[str, list[float]] = {
        "aligned grid, per window": [],
        "aligned grid, shared backbone": [],
    }
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            for pixels in split.images:
                variants[name](pixels)
            times[name].append(time.perf_counter() - start)
    per, one = times["aligned grid, per window"], times["aligned grid, shared backbone"]
    ratio = statistics.median(s / p for s, p in zip(one, per, strict=True))
    print(f"\ntime on the test images, medians of {args.rounds} rounds: "
          + ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in times.items())
          + f"; shared / per window {ratio:.2f}")  # fmt: skip
    print(f"DETR-R50, 800 px window: backbone {r50_backbone_share(args.rounds):.0%} of the forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
