"""The curators' page's pictures: held-out metrics per version, and a task's preview.

Drawn per request inside the server, so matplotlib's object API is used (a ``Figure`` of
its own per call; pyplot keeps global state and is not safe across request threads).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from label_studio_sahi.versions.registry import Version

PREVIEW_SIDE = 960  # px, the longer side of a preview: two fit side by side on a laptop
METRICS = (("map", "mAP"), ("map_50", "mAP@.5"), ("map_small", "mAP small"))
# Box colours by label index: distinct, readable on photos and on grey.
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990")  # fmt: skip
GRID = (255, 255, 255, 70)  # the slice grid, faint so that boxes stay readable
CAPTION = 22  # px, the strip above a preview that names the task, version and boxes


def metrics_plot(versions: Sequence[Version], live: str | None) -> bytes:
    """Held-out mAP, mAP@.5 and small-object AP of each version, oldest first; the live one
    starred, rejected ones hollow (their figures are still worth seeing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ordered = sorted(versions, key=lambda v: v.number)
    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [v.number for v in ordered]
    for key, label in METRICS:
        ys = [v.held_out.get(key) for v in ordered]
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if isinstance(y, int | float)]
        if not points:
            continue
        line = ax.plot(*zip(*points, strict=True), marker="o", label=label)[0]
        for v, y in zip(ordered, ys, strict=True):
            if isinstance(y, int | float) and v.status == "rejected":
                ax.plot(
                    [v.number], [y], marker="o", color="white", markeredgecolor=line.get_color()
                )
            if isinstance(y, int | float) and v.name == live:
                ax.plot([v.number], [y], marker="*", markersize=14, color=line.get_color())
    ax.set_xticks(xs, [v.name for v in ordered])
    ax.set_xlabel("version (star: live, hollow: rejected)")
    ax.set_ylabel("held-out score")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no version has held-out metrics yet", ha="center", transform=ax.transAxes
        )
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def preview(
    pixels: np.ndarray,
    result: Sequence[dict[str, Any]],
    windows: torch.Tensor,
    labels: Sequence[str],
    caption: str,
    side: int = PREVIEW_SIDE,
) -> bytes:
    """A task's image scaled to ``side`` px, with the slice grid (``windows``, image pixels)
    and the suggested boxes (Label Studio ``rectanglelabels`` results, in percent),
    coloured by their label's place in ``labels``, and a caption strip on top."""
    image = Image.fromarray(pixels).convert("RGB")
    scale = min(1.0, side / max(image.size))
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    width, height = image.size
    canvas = Image.new("RGB", (width, height + CAPTION), "white")
    canvas.paste(image, (0, CAPTION))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    grid = ImageDraw.Draw(overlay)
    for x1, y1, x2, y2 in windows.tolist():
        grid.rectangle(
            (x1 * scale, CAPTION + y1 * scale, x2 * scale - 1, CAPTION + y2 * scale - 1),
            outline=GRID,
        )
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for item in result:
        value = item.get("value") or {}
        names_ = value.get("rectanglelabels") or []
        if not names_:
            continue
        label = names_[0]
        colour = PALETTE[labels.index(label) % len(PALETTE)] if label in labels else "#ffffff"
        x, y = value["x"] / 100 * width, CAPTION + value["y"] / 100 * height
        w, h = value["width"] / 100 * width, value["height"] / 100 * height
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=2)
        draw.text((x + 2, max(CAPTION, y - 11)), f"{label} {item.get('score', 0):.2f}", fill=colour)
    draw.text((6, 5), caption, fill="black")
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()
