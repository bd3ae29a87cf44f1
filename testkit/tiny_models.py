"""Small detectors and classifiers, built from configs and trained briefly on synthetic images.

No weights come from a hub: each model is built from a config, trained a few hundred
steps on coloured squares so that its predictions are real, and saved with
``save_pretrained`` (safetensors) so the backend loads it exactly as it loads a hub model.

The scenes: a grey, noisy background with red squares ("car") and blue squares
("person"), 16-40 px on a side. The main fixture is a Conditional DETR (its reference
points make it learn boxes several times faster than DETR: about 80 % recall at IoU 0.5
after 3000 steps, against about 10 % for DETR); a briefly trained plain DETR covers the
softmax family where only its decoding matters. Detection is learnt at 128 px, so in a large image the
squares are only found at native scale, i.e. in slices: the case SAHI exists for.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    ConditionalDetrImageProcessor,
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DeformableDetrImageProcessor,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    PretrainedConfig,
    ResNetConfig,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from testkit import FIXTURES

DETECTOR_CLASSES = ("car", "person")
CLASS_COLOURS = {"car": (220, 30, 30), "person": (30, 60, 220)}
SCENE_CLASSES = ("street", "beach")
SCENE_COLOURS = {"street": (128, 128, 128), "beach": (215, 190, 120)}
TRAIN_SIZE = 128


@dataclass
class Scene:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]]  # x1, y1, x2, y2
    labels: list[str]


def draw_scene(
    width: int,
    height: int,
    n_objects: int,
    rng: random.Random,
    min_side: int = 16,
    max_side: int = 40,
    background: tuple[int, int, int] = (128, 128, 128),
) -> Scene:
    """A noisy background with non-overlapping coloured squares."""
    noise = np.random.default_rng(rng.randrange(2**31)).integers(-12, 13, (height, width, 3))
    pixels = np.clip(np.array(background, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[str] = []
    for _ in range(n_objects * 20):
        if len(boxes) == n_objects:
            break
        side = rng.randint(min_side, max_side)
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (x, y, x + side, y + side)
        if any(
            not (box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1])
            for b in boxes
        ):
            continue
        label = rng.choice(DETECTOR_CLASSES)
        pixels[y : y + side, x : x + side] = CLASS_COLOURS[label]
        boxes.append(box)
        labels.append(label)
    return Scene(Image.fromarray(pixels), boxes, labels)


def tiny_detr_config(stages: int = 3) -> DetrConfig:
    # Three ResNet stages (stride 16): an 8x8 feature map at 128 px, fine enough to place
    # small squares; the usual four (stride 32) leave 4x4 cells and boxes barely move.
    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128][:stages],
        depths=[1] * stages,
        layer_type="basic",
        out_features=[f"stage{i + 1}" for i in range(stages)],
    )
    return DetrConfig(
        backbone_config=backbone,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=12,
        id2label=dict(enumerate(DETECTOR_CLASSES)),
        label2id={name: i for i, name in enumerate(DETECTOR_CLASSES)},
        dropout=0.0,
        auxiliary_loss=True,
    )


def tiny_conditional_detr_config() -> ConditionalDetrConfig:
    detr = tiny_detr_config().to_dict()
    keep = set(ConditionalDetrConfig().to_dict()) - {"model_type", "transformers_version"}
    return ConditionalDetrConfig(**{k: v for k, v in detr.items() if k in keep})


def detr_processor(size: int = TRAIN_SIZE, family: str = "detr") -> Any:
    processor = {
        "detr": DetrImageProcessor,
        "conditional_detr": ConditionalDetrImageProcessor,
        "deformable_detr": DeformableDetrImageProcessor,
        "rt_detr": RTDetrImageProcessor,
    }[family]
    if family == "rt_detr":
        # As RT-DETR's own checkpoints: every input resized to one square, no padding (the
        # model has no pixel mask; its boxes are relative to the whole input).
        return processor(size={"height": size, "width": size})
    return processor(size={"shortest_edge": size, "longest_edge": size * 2})


# The DETR families the job fine-tunes (``AutoModelForObjectDetection`` model types), each
# at the same tiny scale: a 3-stage ResNet, d_model 64, 2 encoder and 2 decoder layers.
FAMILIES = ("detr", "conditional_detr", "deformable_detr", "rt_detr")


def family_config(family: str, classes: Sequence[str], num_queries: int) -> PretrainedConfig:
    """A tiny config of ``family`` for ``classes``, untrained backbone, no hub download."""
    resnet = {
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64],
        "depths": [1, 1, 1],
        "layer_type": "basic",
        "out_features": ["stage1", "stage2", "stage3"],
    }
    common: dict[str, Any] = {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "num_queries": num_queries,
        "dropout": 0.0,
        "id2label": dict(enumerate(classes)),
        "label2id": {name: i for i, name in enumerate(classes)},
    }
    detr_like = {
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        "auxiliary_loss": True,
    }
    if family == "detr":
        return DetrConfig(backbone_config=ResNetConfig(**resnet), **detr_like, **common)
    if family == "conditional_detr":
        return ConditionalDetrConfig(backbone_config=ResNetConfig(**resnet), **detr_like, **common)
    if family == "deformable_detr":
        return DeformableDetrConfig(
            backbone_config=ResNetConfig(**resnet),
            num_feature_levels=3,
            encoder_n_points=2,
            decoder_n_points=2,
            **detr_like,
            **common,
        )
    if family == "rt_detr":
        # RT-DETR's hybrid encoder takes strides 8-32 from its own ResNet.
        backbone = RTDetrResNetConfig(**{**resnet, "hidden_sizes": [16, 32, 64, 64],
                                         "depths": [1, 1, 1, 1],
                                         "out_features": ["stage2", "stage3", "stage4"]})  # fmt: skip
        return RTDetrConfig(
            backbone_config=backbone,
            use_pretrained_backbone=False,
            encoder_hidden_dim=64,
            encoder_in_channels=[32, 64, 64],
            decoder_in_channels=[64, 64, 64],
            encoder_layers=1,
            num_feature_levels=3,
            decoder_n_points=2,
            num_denoising=16,
            **{k: v for k, v in common.items() if k != "encoder_layers"},
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def family_model(family: str, classes: Sequence[str], num_queries: int, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model_class = {
        "detr": DetrForObjectDetection,
        "conditional_detr": ConditionalDetrForObjectDetection,
        "deformable_detr": DeformableDetrForObjectDetection,
        "rt_detr": RTDetrForObjectDetection,
    }[family]
    return model_class(family_config(family, classes, num_queries))


def detr_targets(
    scenes: list[Scene], classes: tuple[str, ...] = DETECTOR_CLASSES
) -> list[dict[str, torch.Tensor]]:
    """DETR training targets: class ids and normalised (cx, cy, w, h) boxes."""
    targets = []
    for s in scenes:
        w, h = s.image.size
        boxes = torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4)
        cxcywh = torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2 / w,
                (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                (boxes[:, 2] - boxes[:, 0]) / w,
                (boxes[:, 3] - boxes[:, 1]) / h,
            ],
            dim=1,
        )
        labels = torch.tensor([classes.index(name) for name in s.labels], dtype=torch.int64)
        targets.append({"class_labels": labels, "boxes": cxcywh})
    return targets


def new_detector(family: str = "conditional_detr", seed: int = 0) -> tuple[Any, Any]:
    """An untrained tiny detector of ``family`` and its image processor."""
    torch.manual_seed(seed)
    if family == "conditional_detr":  # as the committed fixture was built
        model: Any = ConditionalDetrForObjectDetection(tiny_conditional_detr_config())
    elif family == "detr":
        model = DetrForObjectDetection(tiny_detr_config())
    else:
        model = family_model(family, DETECTOR_CLASSES, num_queries=12, seed=seed)
    return model, detr_processor(family=family)


def train_tiny_detector(
    out_dir: Path, family: str = "conditional_detr", steps: int = 3000, seed: int = 0
) -> Path:
    """Train a 0.3 M-parameter detector on 128 px scenes and save it (model + processor)."""
    rng = random.Random(seed)
    model, processor = new_detector(family, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05
    )
    model.train()
    for _ in range(steps):
        scenes = [draw_scene(TRAIN_SIZE, TRAIN_SIZE, rng.randint(1, 3), rng) for _ in range(8)]
        inputs = processor(images=[s.image for s in scenes], return_tensors="pt")
        out = model(pixel_values=inputs["pixel_values"], labels=detr_targets(scenes))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def train_tiny_detr(out_dir: Path) -> Path:
    """The plain-DETR fixture: briefly trained, for its decoding (softmax + no-object)."""
    return train_tiny_detector(out_dir, "detr", steps=400)


def random_detr(out_dir: Path, seed: int = 0, family: str = "conditional_detr") -> Path:
    """An untrained tiny detector, saved like a checkpoint (for loading and learning tests)."""
    model, processor = new_detector(family, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def train_tiny_vit(out_dir: Path, steps: int = 60, seed: int = 0) -> Path:
    """A 2-layer ViT told street (grey) from beach (sand) scenes, saved with its processor."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(SCENE_CLASSES)),
        label2id={name: i for i, name in enumerate(SCENE_CLASSES)},
    )
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        names = [rng.choice(SCENE_CLASSES) for _ in range(16)]
        images = [draw_scene(64, 48, 2, rng, background=SCENE_COLOURS[n]).image for n in names]
        inputs = processor(images=images, return_tensors="pt")
        labels = torch.tensor([SCENE_CLASSES.index(n) for n in names])
        loss = model(pixel_values=inputs["pixel_values"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_fixtures(out: Path) -> None:
    """(Re)build the committed fixture checkpoints: ``python -m testkit.tiny_models`` from
    the repository root.

    Seeded and single-threaded, so the same code gives the same weights; committed so that
    a slow or busy machine tests the same models without training them.
    """
    from testkit.scenes import train_source_base

    torch.set_num_threads(1)
    for name, build in (
        ("tiny-vit", train_tiny_vit),
        ("tiny-detr", train_tiny_detr),
        ("tiny-cond-detr", train_tiny_detector),
        ("source-base", train_source_base),
    ):
        build(out / name)
        print(f"built {out / name}")


if __name__ == "__main__":
    build_fixtures(FIXTURES)
