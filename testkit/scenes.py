"""The small-object learning benchmark's data: a source domain, a target project, a test split.

Everything is generated from seeds on demand (nothing is committed as images):

* **Source domain** (what the base model was "pretrained" on, like a general checkpoint):
  128 px scenes on plain grey ground with saturated ``car`` (square), ``truck`` (2:1,
  striped) and ``person`` (1:2) shapes of 6-40 px.
* **Target project** (what a user labels): large images (1600x1200 to 2048x1536) on
  textured, cluttered ground (a low-frequency field, grain, stones and tracks), with 6-14
  small objects of 8-48 px in duller colours, some partly occluded by others, and
  distractors that are no class (yellow discs, grey slabs, red rings). Label Studio's labels
  are other names, mapped by ``predicted_values``: Vehicle (car), Lorry (truck),
  Pedestrian (person).
* **Test split**: images from a seed range the project never uses (``TEST_SEED``), the
  same for every run, never seen by a job.

``export_task`` writes a task as Label Studio's JSON export does (``rectanglelabels``
results in percent), so the real fine-tuning job consumes it unchanged.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from label_studio_sahi.labelstudio.label_config import parse_label_config, rectangle_result

SOURCE_CLASSES = ("car", "person", "truck")
SOURCE_COLOURS = {"car": (220, 30, 30), "person": (30, 60, 220), "truck": (30, 190, 40)}
# The target's colours are duller (half way to grey-brown) and vary per object.
TARGET_COLOURS = {"car": (180, 62, 52), "person": (60, 78, 175), "truck": (64, 150, 66)}
LABEL_OF = {"car": "Vehicle", "truck": "Lorry", "person": "Pedestrian"}
LABELS = ("Vehicle", "Lorry", "Pedestrian")
LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Vehicle" predicted_values="car"/>
    <Label value="Lorry" predicted_values="truck"/>
    <Label value="Pedestrian" predicted_values="person"/>
  </RectangleLabels>
</View>
"""
SOURCE_SIZE = 128  # the base sees 128 px scenes; its processor keeps 128 px windows as they are
TEST_SEED = 10_000  # test images are TEST_SEED + i; project images are seed * 1000 + i

Box = tuple[int, int, int, int]


@dataclass
class Scene:
    image: Image.Image
    boxes: list[Box]  # x1, y1, x2, y2 in pixels
    classes: list[str]  # source class names


def _shape_size(name: str, side: int) -> tuple[int, int]:
    if name == "car":
        return side, side
    if name == "truck":
        return side, max(4, side // 2)
    return max(3, side // 2), side  # person


def _paint(pixels: np.ndarray, name: str, box: Box, colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = colour
    if name == "truck" and x2 - x1 >= 8:
        # Texture tells a truck from a car of the same colour family: dark stripes.
        pixels[y1:y2, x1:x2:4] = (np.array(colour) * 0.55).astype(np.uint8)


def _log_uniform(rng: random.Random, low: float, high: float) -> int:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))))


def source_scene(rng: random.Random, size: int = SOURCE_SIZE) -> Scene:
    """A 128 px source scene: plain grey ground, 1-4 saturated shapes of 6-40 px."""
    noise = np.random.default_rng(rng.randrange(2**31)).integers(-12, 13, (size, size, 3))
    pixels = np.clip(128 + noise, 0, 255).astype(np.uint8)
    boxes: list[Box] = []
    classes: list[str] = []
    for _ in range(40):
        if len(boxes) == rng.randint(1, 4):
            break
        name = rng.choice(SOURCE_CLASSES)
        w, h = _shape_size(name, _log_uniform(rng, 6, 40))
        x, y = rng.randint(0, size - w), rng.randint(0, size - h)
        box = (x, y, x + w, y + h)
        if any(_overlap(box, b) > 0 for b in boxes):
            continue
        _paint(pixels, name, box, SOURCE_COLOURS[name])
        boxes.append(box)
        classes.append(name)
    return Scene(Image.fromarray(pixels), boxes, classes)


def _overlap(a: Box, b: Box) -> float:
    """Share of ``a``'s area that ``b`` covers."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max(1, (a[2] - a[0]) * (a[3] - a[1]))


GROUND = (116, 120, 104)  # grey-brown soil


def _ground(
    rng: random.Random, width: int, height: int, colour: tuple[int, int, int] = GROUND
) -> np.ndarray:
    """Textured ground: a smooth colour field, grain, and darker tracks."""
    nrng = np.random.default_rng(rng.randrange(2**31))
    # Mostly brightness (soil, shade) with a faint tint: colour must still tell classes apart.
    coarse = nrng.normal(0, 1, (max(2, height // 48), max(2, width // 48), 4)).astype(np.float32)
    smooth = [
        np.asarray(Image.fromarray(coarse[..., c]).resize((width, height), Image.BILINEAR))
        for c in range(4)
    ]
    field = 18 * smooth[0][..., None] + 5 * np.stack(smooth[1:], axis=-1)
    base = np.array(colour, dtype=np.float32) + field
    base += nrng.integers(-26, 27, (height, width, 1)).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def _distractors(rng: random.Random, image: Image.Image, count: int) -> None:
    """Things that are no class: yellow discs, grey slabs, red rings, dark tracks."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(count):
        kind = rng.choice(("disc", "slab", "ring", "track"))
        side = _log_uniform(rng, 8, 40)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        if kind == "disc":
            draw.ellipse((x, y, x + side, y + side), fill=(200, 185, 60))
        elif kind == "slab":
            draw.rectangle((x, y, x + side, y + side // 3), fill=(150, 150, 150))
        elif kind == "ring":
            draw.ellipse((x, y, x + side, y + side), outline=(175, 60, 50), width=3)
        else:
            draw.line(
                (x, y, x + rng.randint(-200, 200), y + rng.randint(-200, 200)),
                fill=(85, 80, 70),
                width=rng.randint(2, 5),
            )


def target_scene(
    seed: int,
    size: tuple[int, int] | None = None,
    ground: tuple[int, int, int] = GROUND,
    objects: tuple[int, int] = (6, 14),
    object_scale: float = 1.0,
) -> Scene:
    """One large target-domain image with its objects (seeded: the same seed, the same scene).

    ``size`` and ``ground`` fix what is otherwise drawn (1600x1200 to 2048x1536, soil);
    ``objects`` is the range the number of objects is drawn from; ``object_scale`` makes
    every object that many times larger (4: objects as large in a 512 px window as they are
    in a 128 px one).
    """
    rng = random.Random(seed)
    width, height = rng.choice(((1600, 1200), (1800, 1350), (2048, 1536)))
    if size is not None:
        width, height = size
    image = Image.fromarray(_ground(rng, width, height, ground))
    _distractors(rng, image, rng.randint(8, 20))
    pixels = np.array(image)
    boxes: list[Box] = []
    classes: list[str] = []
    wanted = rng.randint(*objects)
    for _ in range(wanted * 30):
        if len(boxes) == wanted:
            break
        name = rng.choices(SOURCE_CLASSES, weights=(0.45, 0.25, 0.30))[0]
        w, h = _shape_size(name, round(_log_uniform(rng, 8, 48) * object_scale))
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        box = (x, y, x + w, y + h)
        # Some objects are partly hidden behind the one drawn after them (at most 40 %).
        if any(_overlap(box, b) > 0.4 or _overlap(b, box) > 0.4 for b in boxes):
            continue
        tint = rng.uniform(0.85, 1.15)
        colour = tuple(int(min(255, c * tint)) for c in TARGET_COLOURS[name])
        _paint(pixels, name, box, colour)  # type: ignore[arg-type]
        boxes.append(box)
        classes.append(name)
    return Scene(Image.fromarray(pixels), boxes, classes)


def project_seeds(seed: int, count: int) -> list[int]:
    return [seed * 1000 + i for i in range(count)]


def test_seeds(count: int) -> list[int]:
    return [TEST_SEED + i for i in range(count)]


def export_result(
    scene: Scene, config: str = LABEL_CONFIG, label_of: dict[str, str] = LABEL_OF
) -> list[dict[str, Any]]:
    """The scene's boxes as Label Studio ``rectanglelabels`` results of ``config``'s first
    rectangle tag (percent units), each class named by ``label_of``."""
    tag = parse_label_config(config).rectangles[0]
    width, height = scene.image.size
    return [
        rectangle_result(tag, box, label_of[name], 1.0, width, height, result_id=f"r{i}")
        for i, (box, name) in enumerate(zip(scene.boxes, scene.classes, strict=True))
    ]


def _targets(scenes: list[Scene]) -> list[dict[str, torch.Tensor]]:
    out = []
    for scene in scenes:
        w, h = scene.image.size
        b = torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4)
        cxcywh = torch.stack(
            [(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w,
             (b[:, 3] - b[:, 1]) / h],
            dim=1,
        )  # fmt: skip
        labels = torch.tensor([SOURCE_CLASSES.index(c) for c in scene.classes], dtype=torch.int64)
        out.append({"class_labels": labels, "boxes": cxcywh})
    return out


def train_source_base(
    out_dir: Path,
    steps: int = 3000,
    seed: int = 0,
    family: str = "conditional_detr",
    scale: int = 1,
) -> Path:
    """The stand-in for a pretrained checkpoint: a tiny detector of ``family`` (see
    ``tests/tiny_models.FAMILIES``) trained on the source domain only, saved with
    ``save_pretrained`` (Conditional DETR: about 3 minutes on one CPU core).

    ``scale`` draws the source scenes ``scale`` times larger with objects of the same pixel
    sizes, which the 128 px processor shrinks back: a base pretrained at that geometry
    (``scale=4``: objects as small in its input as the project's are in 512 px windows)."""
    from testkit.tiny_models import detr_processor, family_model

    rng = random.Random(seed)
    model = family_model(family, SOURCE_CLASSES, num_queries=16, seed=seed)
    processor = detr_processor(SOURCE_SIZE, family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05
    )
    model.train()
    for _ in range(steps):
        scenes = [source_scene(rng, SOURCE_SIZE * scale) for _ in range(8)]
        inputs = processor(images=[s.image for s in scenes], return_tensors="pt")
        loss = model(pixel_values=inputs["pixel_values"], labels=_targets(scenes)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        schedule.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
