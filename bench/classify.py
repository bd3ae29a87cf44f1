"""ViT-B/16 classification throughput, as the backend runs it, on this device.

    python -m bench.classify                      # CPU: batches 1 and 8
    python -m bench.classify --device cuda --batches 1 32 128 --images 1024

ViT-B/16 at 224 px (random weights: the cost is the same as trained ones) with its image
processor, through ``Classifier.probabilities`` (processor, transfer, forward in the
backend's precision, softmax): images per second per batch size, median of ``--rounds``
interleaved rounds, and the forward alone beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from label_studio_sahi.inference.classifier import Classifier


def build_vit_b16(folder: Path) -> Path:
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(num_labels=1000)).save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)  # 224 px, as google/vit-base-patch16-224
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        clf = Classifier.load(str(build_vit_b16(Path(tmp) / "vit")), device=args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.images)]
    print(f"ViT-B/16 on {clf.device} ({clf.dtype}), {args.images} images of 640x480", flush=True)

    def end_to_end(batch: int) -> float:
        sync(clf.device)
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            clf.probabilities(images[i : i + batch])
        sync(clf.device)
        return len(images) / (time.perf_counter() - start)

    def forward_only(batch: int) -> float:
        pixels = torch.rand(batch, 3, 224, 224, device=clf.device, dtype=clf.dtype)
        sync(clf.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(0, len(images), batch):
                clf.model(pixel_values=pixels)
        sync(clf.device)
        return len(images) / (time.perf_counter() - start)

    for batch in args.batches:  # warm-up: kernels, allocator
        end_to_end(batch)
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for name, fn in (("probabilities", end_to_end), ("forward only", forward_only)):
                rates.setdefault((name, batch), []).append(fn(batch))
    print("\n| batch | images/s (processor + forward) | images/s (forward only) |")
    print("|---|---|---|")
    for batch in args.batches:
        e2e = statistics.median(rates[("probabilities", batch)])
        fwd = statistics.median(rates[("forward only", batch)])
        print(f"| {batch} | {e2e:.1f} | {fwd:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
