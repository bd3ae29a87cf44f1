"""Fine-tuning loops: a DETR-family detector on image windows, a classifier on whole images.

Both start from the live checkpoint and use the model's own loss (transformers computes
DETR's Hungarian-matched loss when given ``labels``), AdamW with a lower learning rate for
the backbone, gradient clipping, and mixed precision on CUDA.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageEnhance
from torch import nn

from label_studio_sahi.inference.checkpoints import process_images
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

# progress(step, steps, loss, eta_seconds)
Progress = Callable[[int, int, float, float], None]


class HeadMismatch(ValueError):
    """The model's class head cannot be given the project's labels."""


@dataclass(frozen=True)
class DetectionSample:
    image: Image.Image
    boxes: Sequence[tuple[float, float, float, float]]  # x1, y1, x2, y2 in this image's pixels
    labels: Sequence[int]


# The layers that score classes, by attribute name, in the detector families that
# AutoModelForObjectDetection builds: DETR, Conditional DETR, YOLOS, Table Transformer
# (``class_labels_classifier``); Deformable DETR (``class_embed``, one per decoder layer,
# tied to each other); RT-DETR and D-FINE (``decoder.class_embed``, the encoder's
# ``enc_score_head``, and ``denoising_class_embed``, which embeds labels as queries).
DETECTOR_HEADS = (
    "class_labels_classifier",
    "class_embed",
    "enc_score_head",
    "denoising_class_embed",
)
CLASSIFIER_HEADS = ("classifier",)


def relabel_head(
    model: Any,
    head_names: Sequence[str],
    labels: Sequence[str],
    class_to_label: Callable[[str], str | None],
) -> None:
    """Give a model exactly ``labels`` as classes, keeping what it knows of each of them.

    Every linear or embedding layer under one of ``head_names`` with a row per class (plus
    at most one more: DETR's no-object, RT-DETR's padding) is rebuilt. A row of the new
    layer is the old class's row that maps to the label (``class_to_label``, i.e. the label
    config's name / predicted_values rules), averaged when several do; labels no old class
    maps to start from the mean of the old classes. Rows past the classes are kept. Layers
    that shared weights (Deformable DETR's per-layer heads) still share them.
    """
    old_names = {int(k): str(v) for k, v in model.config.id2label.items()}
    if [old_names.get(i) for i in range(len(labels))] == list(labels) and len(old_names) == len(
        labels
    ):
        return
    n_old = len(old_names)
    sources = [
        [j for j, name in sorted(old_names.items()) if class_to_label(name) == label]
        for label in labels
    ]
    heads = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, nn.Linear | nn.Embedding)
        and set(name.split(".")) & set(head_names)
        and module.weight.shape[0] - n_old in (0, 1)
    ]
    if not heads:
        raise HeadMismatch(
            f"{type(model).__name__} has no class head ({', '.join(head_names)}) to relabel; "
            f"its classes {sorted(old_names.values())} must already be the project's labels {list(labels)}"
        )
    rebuilt: dict[int, nn.Module] = {}  # by the old weight: tied layers stay tied
    for name, module in heads:
        new = rebuilt.get(id(module.weight))
        if new is None:
            new = rebuilt[id(module.weight)] = _relabelled(module, n_old, sources)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, new)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.num_labels = len(labels)


def _relabelled(
    module: nn.Linear | nn.Embedding, n_old: int, sources: list[list[int]]
) -> nn.Module:
    """A copy of ``module`` with a row per new label (see ``relabel_head``)."""
    extra = module.weight.shape[0] - n_old
    rows = len(sources) + extra
    new: nn.Linear | nn.Embedding
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, rows, bias=module.bias is not None)
    else:
        padding = module.padding_idx
        new = nn.Embedding(
            rows,
            module.embedding_dim,
            padding_idx=None if padding is None else padding - n_old + len(sources),
        )
    new = new.to(module.weight.device, module.weight.dtype)
    old_params = [module.weight] + (
        [module.bias] if isinstance(module, nn.Linear) and module.bias is not None else []
    )
    new_params = [new.weight] + (
        [new.bias] if isinstance(new, nn.Linear) and new.bias is not None else []
    )
    with torch.no_grad():
        for old, param in zip(old_params, new_params, strict=True):
            param.copy_(old[:n_old].mean(dim=0, keepdim=True).expand_as(param))
            if param.dim() > 1:  # fresh rows must differ, or they learn as one
                param.add_(torch.randn_like(param) * 0.01)
            for i, src in enumerate(sources):
                if src:
                    param[i] = old[src].mean(dim=0)
            if extra:
                param[len(sources) :] = old[n_old:]
    return new


def _targets(
    batch: Sequence[DetectionSample], device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """DETR targets: class ids and (cx, cy, w, h) normalised by the image size."""
    targets = []
    for sample in batch:
        w, h = sample.image.size
        boxes = torch.tensor(list(sample.boxes), dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy = boxes / scale
        cxcywh = torch.stack(
            [
                (xyxy[:, 0] + xyxy[:, 2]) / 2,
                (xyxy[:, 1] + xyxy[:, 3]) / 2,
                xyxy[:, 2] - xyxy[:, 0],
                xyxy[:, 3] - xyxy[:, 1],
            ],
            dim=1,
        )
        targets.append(
            {
                "class_labels": torch.tensor(list(sample.labels), dtype=torch.int64, device=device),
                "boxes": cxcywh.to(device),
            }
        )
    return targets


def _optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and "backbone" in n]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [{"params": rest, "lr": settings.learning_rate}]
    if backbone:
        groups.append({"params": backbone, "lr": settings.backbone_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


class _Precision:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling)."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.dtype = (
            torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.enabled and self.dtype == torch.float16
        )

    def autocast(self) -> Any:
        return torch.autocast("cuda", dtype=self.dtype, enabled=self.enabled)


def learning_rate_factor(step: int, steps: int, schedule: str) -> float:
    """The learning rate at ``step`` (0-based) as a share of the set one.

    ``cosine``: a linear warm-up over the first 10 % of steps, then a cosine decay to 5 %.
    A fresh AdamW moves every weight by about the learning rate in its first steps, whatever
    the gradient: the warm-up keeps that from shaking a model that is already good, and the
    decay ends training at a quiet point instead of wherever the last noisy step left it.
    """
    if schedule == "constant":
        return 1.0
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _run_steps(
    model: nn.Module,
    loss_of: Callable[[], torch.Tensor],
    settings: Settings,
    steps: int,
    device: torch.device,
    progress: Progress | None,
) -> list[float]:
    model.train()
    optimizer = _optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: learning_rate_factor(i, steps, settings.lr_schedule)
    )
    precision = _Precision(device)
    curve: list[float] = []
    start = time.monotonic()
    for step in range(1, steps + 1):
        with precision.autocast():
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        schedule.step()
        curve.append(float(loss.detach()))
        if progress is not None:
            elapsed = time.monotonic() - start
            progress(step, steps, curve[-1], elapsed / step * (steps - step))
    model.eval()
    return curve


def training_steps(windows: int, settings: Settings) -> int:
    """Optimizer steps for ``windows`` training windows: ``TRAIN_EPOCHS`` passes over them,
    at least ``TRAIN_MIN_STEPS`` and at most ``TRAIN_STEPS``."""
    epochs = math.ceil(settings.train_epochs * windows / settings.train_batch_size)
    return max(
        min(settings.train_min_steps, settings.train_steps), min(epochs, settings.train_steps)
    )


def augment(sample: DetectionSample, rng: random.Random) -> DetectionSample:
    """A horizontal flip half of the time and a brightness / contrast / colour jitter:
    what a small label set cannot show of its objects."""
    image = sample.image
    boxes = list(sample.boxes)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w = image.width
        boxes = [(w - x2, y1, w - x1, y2) for x1, y1, x2, y2 in boxes]
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))
    return DetectionSample(image, boxes, sample.labels)


def train_detector(
    model: Any,
    processor: Any,
    draw: Callable[[random.Random], DetectionSample],
    settings: Settings,
    device: torch.device,
    steps: int,
    progress: Progress | None = None,
    seed: int = 0,
) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` steps on samples from ``draw(rng)``
    (augmented when ``TRAIN_AUGMENT``); returns the loss curve."""
    model.to(device)
    rng = random.Random(seed)
    torch.manual_seed(seed)

    def loss_of() -> torch.Tensor:
        batch = [draw(rng) for _ in range(settings.train_batch_size)]
        if settings.train_augment:
            batch = [augment(s, rng) for s in batch]
        inputs = process_images(processor, [s.image for s in batch])
        pixel_mask = inputs.get("pixel_mask")
        out = model(
            pixel_values=inputs["pixel_values"].to(device),
            pixel_mask=pixel_mask.to(device) if pixel_mask is not None else None,
            labels=_targets(batch, device),
        )
        return out.loss

    return _run_steps(model, loss_of, settings, steps, device, progress)


def average_into(model: nn.Module, parent: dict[str, torch.Tensor], share: float) -> None:
    """``model``'s floating-point weights become ``share`` of ``parent``'s (a state dict of
    the same shapes: the relabelled parent before training) plus the rest of its own.

    Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): a point between a model and its
    fine-tuned copy keeps more of what the first knew, where a few labels pull the copy away.
    """
    if share <= 0:
        return
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.mul_(1 - share).add_(
                    parent[name].to(tensor.device, tensor.dtype), alpha=share
                )


def train_classifier(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    settings: Settings,
    device: torch.device,
    steps: int,
    progress: Progress | None = None,
    seed: int = 0,
) -> list[float]:
    """Fine-tune an image classifier in place on whole images; returns the loss curve."""
    if not images:
        raise ValueError("no labelled images")
    model.to(device)
    rng = random.Random(seed)
    indices = list(range(len(images)))

    def loss_of() -> torch.Tensor:
        batch = [rng.choice(indices) for _ in range(settings.train_batch_size)]
        pixels = process_images(processor, [images[i] for i in batch])["pixel_values"].to(device)
        target = torch.tensor([labels[i] for i in batch], device=device)
        return nn.functional.cross_entropy(model(pixel_values=pixels).logits.float(), target)

    return _run_steps(model, loss_of, settings, steps, device, progress)
