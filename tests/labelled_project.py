"""A Label Studio project of synthetic large images with small objects, labelled, in a FakeStudio."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from fake_studio import FakeStudio
from tiny_models import draw_scene

from backend.labeling import parse_label_config, rectangle_result

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Vehicle" predicted_values="car"/>
    <Label value="Person"/>
  </RectangleLabels>
</View>
"""
LABEL_OF = {"car": "Vehicle", "person": "Person"}


@dataclass
class Project:
    id: int
    task_ids: list[int]


def png(image: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")  # type: ignore[attr-defined]
    return out.getvalue()


def labelled_project(
    fake: FakeStudio, n_tasks: int = 8, size: tuple[int, int] = (384, 256), seed: int = 0
) -> Project:
    """Upload ``n_tasks`` scenes of 6 small squares each and annotate every square."""
    rng = random.Random(seed)
    tag = parse_label_config(CONFIG).rectangles[0]
    pid = fake.add_project(CONFIG, title="squares")
    task_ids = []
    for i in range(n_tasks):
        scene = draw_scene(size[0], size[1], 6, rng)
        url = fake.upload(pid, f"scene{i}.png", png(scene.image))
        tid = fake.add_task(pid, {"image": url})
        result = [
            rectangle_result(tag, box, LABEL_OF[label], 1.0, size[0], size[1])
            for box, label in zip(scene.boxes, scene.labels, strict=True)
        ]
        fake.add_annotation(tid, result)
        task_ids.append(tid)
    return Project(pid, task_ids)
