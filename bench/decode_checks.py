"""What the structure check costs next to decoding: a large PNG and JPEG, checked then
decoded (``decode_pixels``, as serving does) against the same decode without the check.

    python -m bench.decode_checks [--pairs 5] [--width 4000 --height 3000]

A photo-like image (smooth, with sensor noise: PNG compresses it as a camera's would) is
encoded once per format. The contenders run interleaved (A B A B ...: this machine's speed
drifts by up to 50 % from minute to minute) and the medians of ``--pairs`` rounds are
compared; the ratio (checked / unchecked) is the figure to read.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from label_studio_sahi.images.checks import check_structure
from label_studio_sahi.images.decode import _torchvision_decode, decode_pixels
from label_studio_sahi.settings import Settings


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 10), max(1, width // 10), 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    smooth = smooth.filter(ImageFilter.GaussianBlur(3))
    noise = rng.integers(-4, 5, (height, width, 3))
    return Image.fromarray((np.asarray(smooth).astype(int) + noise).clip(0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    image = photo(args.width, args.height)
    print(f"{args.width}x{args.height}, medians of {args.pairs} interleaved pairs")
    for fmt in ("PNG", "JPEG"):
        data = encoded(image, fmt)
        assert check_structure(data) is not None  # a sound file: the check must pass it
        checked, unchecked, check_only = [], [], []
        for _ in range(args.pairs):
            checked.append(seconds(lambda data=data: decode_pixels(data, settings)))
            unchecked.append(seconds(lambda data=data: _torchvision_decode(data)))
            check_only.append(seconds(lambda data=data: check_structure(data)))
        a, b, c = (statistics.median(v) for v in (checked, unchecked, check_only))
        print(
            f"{fmt} {len(data) / 2**20:.1f} MiB: decode_pixels (checked) {a * 1000:.0f} ms, "
            f"torchvision alone {b * 1000:.0f} ms, ratio {a / b:.2f}; "
            f"the check alone {c * 1000:.0f} ms ({c / b:.2f} of the decode)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
