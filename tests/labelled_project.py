"""A Label Studio project of synthetic large images with small objects, labelled, in a FakeStudio."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

from label_studio_sahi.labelstudio.label_config import (
    choices_result,
    parse_label_config,
    rectangle_result,
)
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import SCENE_COLOURS, draw_scene

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Vehicle" predicted_values="car"/>
    <Label value="Person"/>
  </RectangleLabels>
</View>
"""
CONFIG_WITH_SCENES = CONFIG.replace(
    "</View>",
    '<Choices name="scene" toName="image"><Choice value="Street"/><Choice value="Beach"/></Choices></View>',
)
LABEL_OF = {"car": "Vehicle", "person": "Person"}
SCENE_OF = {"street": "Street", "beach": "Beach"}


@dataclass
class Project:
    id: int
    task_ids: list[int]


def png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def labelled_project(
    fake: FakeStudio,
    n_tasks: int = 8,
    size: tuple[int, int] = (384, 256),
    seed: int = 0,
    scenes: bool = False,
) -> Project:
    """Upload ``n_tasks`` scenes of 6 small squares each and annotate every square (and,
    with ``scenes``, each image's scene class: a street or beach background)."""
    rng = random.Random(seed)
    xml = CONFIG_WITH_SCENES if scenes else CONFIG
    config = parse_label_config(xml)
    pid = fake.add_project(xml, title="squares")
    task_ids = []
    for i in range(n_tasks):
        kind = rng.choice(sorted(SCENE_COLOURS)) if scenes else "street"
        scene = draw_scene(size[0], size[1], 6, rng, background=SCENE_COLOURS[kind])
        url = fake.upload(pid, f"scene{i}.png", png(scene.image))
        tid = fake.add_task(pid, {"image": url})
        result = [
            rectangle_result(config.rectangles[0], box, LABEL_OF[label], 1.0, size[0], size[1])
            for box, label in zip(scene.boxes, scene.labels, strict=True)
        ]
        if scenes:
            result.append(choices_result(config.choices[0], [SCENE_OF[kind]], 1.0))
        fake.add_annotation(tid, result)
        task_ids.append(tid)
    return Project(pid, task_ids)
