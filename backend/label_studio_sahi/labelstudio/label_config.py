"""Label Studio labeling configs in, Label Studio results out.

``parse_label_config`` reads the XML a project is configured with and finds what this
backend can predict: ``<RectangleLabels>`` (boxes) and ``<Choices>`` (image-level classes),
each pointing at an ``<Image>`` tag. Each control knows which model classes map to which of
its labels, following the ecosystem's conventions:

* a label matches a model class of the same name (case-insensitive, whitespace-stripped);
* ``<Label value="Vehicle" predicted_values="car,truck"/>`` maps the listed classes to it;
* ``<Label value="Person" alias="pedestrian"/>`` maps the alias to it.

``default_label_config`` builds a config from a model's class names (``ls-sahi predict``
without a project). The result builders produce dicts exactly in Label Studio's format
(coordinates in percent of the original image), and ``annotation_boxes`` /
``annotation_choices`` go the other way for training.

Configs come from the network (``/predict`` and webhooks carry them), so they are parsed
with ``defusedxml``: entity declarations (billion laughs) and external references are
refused with a ``LabelConfigError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, SupportsFloat, get_args
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import quoteattr

import defusedxml
import defusedxml.ElementTree as DefusedET

from label_studio_sahi.errors import LabelConfigError
from label_studio_sahi.settings import TaskScore

__all__ = [
    "ControlTag",
    "LabelConfig",
    "annotation_boxes",
    "annotation_choices",
    "choices_result",
    "default_label_config",
    "parse_label_config",
    "rectangle_result",
]

ControlKind = Literal["rectanglelabels", "choices"]

#: Control tags this backend predicts, lower-cased, with the child tag holding their labels.
_CONTROL_CHILD: dict[str, str] = {"rectanglelabels": "label", "choices": "choice"}
_OBJECT_TAG = "image"
_PARSE_CACHE_BYTES = 4 * 2**20  # of config text; a typical config is 1-10 KB


def _norm(name: str) -> str:
    """The form in which model classes and label names are compared."""
    return name.strip().casefold()


@dataclass(frozen=True)
class ControlTag:
    """One ``<RectangleLabels>`` or ``<Choices>`` tag of a labeling config.

    ``class_map`` holds explicit mappings (normalised model class → label) from
    ``predicted_values`` and ``alias``; plain name matches are resolved in ``label_for``.
    """

    name: str
    to_name: str
    kind: ControlKind
    labels: tuple[str, ...]
    image_key: str
    score_threshold: float | None = None
    multiple: bool = False
    class_map: tuple[tuple[str, str], ...] = ()
    _explicit: Mapping[str, str] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _by_name: Mapping[str, str] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def threshold(self, default: float) -> float:
        """The score a suggestion of this tag needs: its ``model_score_threshold``, else
        ``default`` (the setting)."""
        return self.score_threshold if self.score_threshold is not None else default

    def __post_init__(self) -> None:
        explicit: dict[str, str] = {}
        for model_class, label in self.class_map:
            explicit.setdefault(_norm(model_class), label)  # first in config order wins
        by_name: dict[str, str] = {}
        for label in self.labels:
            by_name.setdefault(_norm(label), label)
        object.__setattr__(self, "_explicit", explicit)
        object.__setattr__(self, "_by_name", by_name)

    def label_for(self, model_class: str) -> str | None:
        """The label a model class maps to, or ``None`` when none does (drop the class).

        ``predicted_values`` and ``alias`` win over a plain name match: they are the user's
        explicit wish (``<Label value="car" predicted_values="truck"/>`` next to a
        ``<Label value="truck"/>`` would be odd, but then "truck" goes to "car").
        """
        key = _norm(model_class)
        if not key:
            return None
        return self._explicit.get(key) or self._by_name.get(key)


@dataclass(frozen=True)
class LabelConfig:
    """What a labeling config asks this backend to predict."""

    rectangles: tuple[ControlTag, ...]
    choices: tuple[ControlTag, ...]
    task_score: str | None = None  # task_score="margin" on any tag: this project's score

    @property
    def controls(self) -> tuple[ControlTag, ...]:
        """All control tags, rectangles first."""
        return self.rectangles + self.choices

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The task data keys holding images the controls point at, unique, in config order."""
        return tuple(dict.fromkeys(tag.image_key for tag in self.controls))


# --------------------------------------------------------------------------- parsing


def _attr(element: Element, name: str) -> str | None:
    """An attribute by name, case-insensitively (``toName``, ``toname``, ``TONAME``)."""
    value = element.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, val in element.attrib.items():
        if key.lower() == wanted:
            return val
    return None


def _tag(element: Element) -> str:
    tag = element.tag
    if not isinstance(tag, str):  # comments / processing instructions (not kept by default)
        return ""
    return tag.rsplit("}", 1)[-1].lower()


def _describe(element: Element) -> str:
    name = _attr(element, "name")
    return f"<{element.tag} name={name!r}>" if name else f"<{element.tag}>"


def _parse_threshold(element: Element) -> float | None:
    raw = _attr(element, "model_score_threshold")
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise LabelConfigError(
            f"{_describe(element)} has model_score_threshold={raw!r}: "
            "expected a number between 0 and 1"
        )
    return value


_TASK_SCORES: tuple[str, ...] = get_args(TaskScore)


def _parse_task_score(root: Element) -> str | None:
    """The first ``task_score`` attribute of any tag (the View, a control...), checked."""
    for element in root.iter():
        raw = _attr(element, "task_score") if _tag(element) else None
        if raw is None or not raw.strip():
            continue
        value = raw.strip().lower()
        if value not in _TASK_SCORES:
            raise LabelConfigError(
                f"{_describe(element)} has task_score={raw!r}: expected one of "
                f"{', '.join(_TASK_SCORES)}"
            )
        return value
    return None


def _image_keys(root: Element) -> dict[str, str]:
    """Image tag name → task data key (``<Image name="image" value="$image"/>`` → image)."""
    keys: dict[str, str] = {}
    for element in root.iter():
        if _tag(element) != _OBJECT_TAG:
            continue
        name = _attr(element, "name")
        value = _attr(element, "value")
        if not name:
            raise LabelConfigError(f"{_describe(element)} has no name attribute")
        if not value or not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(
                f"{_describe(element)} has value={value!r}: expected a task data "
                'reference such as value="$image"'
            )
        keys.setdefault(name, value[1:])
    return keys


def _parse_control(element: Element, kind: ControlKind, images: Mapping[str, str]) -> ControlTag:
    where = _describe(element)
    name = _attr(element, "name")
    if not name:
        raise LabelConfigError(f"{where} has no name attribute")
    to_names = [part.strip() for part in (_attr(element, "toName") or "").split(",")]
    to_name = to_names[0] if to_names else ""
    if not to_name:
        raise LabelConfigError(f"{where} has no toName attribute")
    if to_name not in images:
        known = ", ".join(sorted(images)) or "none"
        raise LabelConfigError(
            f"{where} points at toName={to_name!r}, which is not an <Image> tag "
            f"(Image tags in this config: {known})"
        )

    child_tag = _CONTROL_CHILD[kind]
    labels: list[str] = []
    class_map: list[tuple[str, str]] = []
    for child in element.iter():
        if child is element or _tag(child) != child_tag:
            continue
        value = _attr(child, "value")
        if value is None or not value.strip():
            raise LabelConfigError(f"{where} has a <{child.tag}> without a value")
        if value in labels:
            continue
        labels.append(value)
        predicted = _attr(child, "predicted_values") or ""
        class_map.extend((cls, value) for cls in predicted.split(",") if cls.strip())
        alias = _attr(child, "alias")
        if alias and alias.strip():
            class_map.append((alias, value))
    if not labels:
        raise LabelConfigError(f"{where} has no <{child_tag.capitalize()}> children")

    multiple = kind == "choices" and (_attr(element, "choice") or "").strip().lower() == "multiple"
    return ControlTag(
        name=name,
        to_name=to_name,
        kind=kind,
        labels=tuple(labels),
        image_key=images[to_name],
        score_threshold=_parse_threshold(element),
        multiple=multiple,
        class_map=tuple(class_map),
    )


class _ParsedConfigs:
    """Parsed configs by their text, least recently used dropped past ``max_bytes`` of text
    (Label Studio sends the same config with every request; a made-up one each time must
    not grow memory)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LabelConfig] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, xml: str) -> LabelConfig | None:
        with self._lock:
            found = self._items.get(xml)
            if found is not None:
                self._items.move_to_end(xml)
            return found

    def put(self, xml: str, config: LabelConfig) -> None:
        if len(xml) > self.max_bytes:
            return
        with self._lock:
            if xml not in self._items:
                self._bytes += len(xml)
            self._items[xml] = config
            self._items.move_to_end(xml)
            while self._bytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                self._bytes -= len(old)


_parsed = _ParsedConfigs(_PARSE_CACHE_BYTES)


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio labeling config; cached by content (same string → same object).

    Raises ``LabelConfigError`` when the text is not (safe) XML, has neither a
    ``<RectangleLabels>`` nor a ``<Choices>`` tag, or a control tag lacks a name, a
    toName pointing at an ``<Image>``, or labels.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the labeling config is empty: expected XML such as <View>...")
    cached = _parsed.get(xml)
    if cached is not None:
        return cached
    config = _parse(xml)
    _parsed.put(xml, config)
    return config


def _parse(xml: str) -> LabelConfig:
    try:
        root = DefusedET.fromstring(xml)
    except defusedxml.DefusedXmlException as exc:
        raise LabelConfigError(
            f"the labeling config uses XML features refused for safety ({type(exc).__name__}): "
            "entity declarations and external references are not allowed"
        ) from exc
    except ParseError as exc:
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from exc

    images = _image_keys(root)
    rectangles: list[ControlTag] = []
    choices: list[ControlTag] = []
    found: list[str] = []
    skipped: list[str] = []
    for element in root.iter():
        tag = _tag(element)
        if tag and element.tag not in found:
            found.append(element.tag)
        if tag not in _CONTROL_CHILD:
            continue
        to_name = (_attr(element, "toName") or "").split(",")[0].strip()
        per_region = (_attr(element, "perRegion") or "").strip().lower() == "true"
        if (to_name and to_name not in images) or per_region:
            # Controls on text, audio... and per-region choices are for other backends
            # (or for the annotator): skip them rather than refuse the whole project.
            skipped.append(
                f"{_describe(element)} (toName={to_name!r}{', perRegion' if per_region else ''})"
            )
            continue
        if tag == "rectanglelabels":
            rectangles.append(_parse_control(element, "rectanglelabels", images))
        else:
            choices.append(_parse_control(element, "choices", images))

    if not rectangles and not choices:
        raise LabelConfigError(
            "the labeling config has nothing this backend can predict: it supports "
            "<RectangleLabels> (object detection) and <Choices> (image classification) "
            f"on an <Image>; found only: {', '.join(f'<{t}>' for t in found)}"
            + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        )
    names = [tag.name for tag in (*rectangles, *choices)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LabelConfigError(f"control tag names must be unique; repeated: {duplicates}")
    return LabelConfig(
        rectangles=tuple(rectangles), choices=tuple(choices), task_score=_parse_task_score(root)
    )


# --------------------------------------------------------------------------- building


def default_label_config(detector_classes: Sequence[str], classifier_classes: Sequence[str]) -> str:
    """A config naming every model class, for predicting without a Label Studio project.

    Boxes (``<RectangleLabels name="label">``) for the detector's classes and a single
    choice (``<Choices name="class">``) for the classifier's, both on ``$image``. Class
    names are XML-escaped, so any name round-trips through :func:`parse_label_config`;
    blank names (which no label can have) and repeats are left out.
    """
    labels = "".join(f"<Label value={quoteattr(name)}/>" for name in _label_names(detector_classes))
    choices = "".join(
        f"<Choice value={quoteattr(name)}/>" for name in _label_names(classifier_classes)
    )
    parts = ['<View><Image name="image" value="$image"/>']
    if labels:
        parts.append(f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels>')
    if choices:
        parts.append(f'<Choices name="class" toName="image">{choices}</Choices>')
    return "".join(parts) + "</View>"


def _label_names(classes: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name for name in classes if name.strip()))


# --------------------------------------------------------------------------- results


def _result_id(content: Mapping[str, Any]) -> str:
    """A 10-character id derived from the result's content.

    Label Studio uses 10-character region ids. A content hash (rather than random ids or a
    process-wide counter) makes predictions reproducible: the same model output on the same
    task gives byte-identical JSON, which keeps tests exact and lets a re-run be compared
    with the last one. Two results can only share an id if they are identical in every
    value (same tag, box, label and score), i.e. true duplicates; pass ``result_id`` where
    that must be told apart.
    """
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode(), usedforsecurity=False).hexdigest()[:10]


def _finite(value: SupportsFloat, what: str) -> float:
    number = float(value)  # numpy / torch scalars convert too
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def rectangle_result(
    tag: ControlTag,
    box: tuple[float, float, float, float],
    label: str,
    score: float,
    image_width: int,
    image_height: int,
    *,
    result_id: str | None = None,
) -> dict[str, Any]:
    """A ``rectanglelabels`` result for a box (x1, y1, x2, y2) in original-image pixels.

    The box is clipped to the image; coordinates become percent of the original size.
    All numbers are plain Python floats/ints (safe for ``json.dumps``), even when the box
    comes as numpy or torch scalars.
    """
    width, height = int(image_width), int(image_height)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    x1, y1, x2, y2 = (_finite(v, "box coordinate") for v in box)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    result: dict[str, Any] = {
        "from_name": tag.name,
        "to_name": tag.to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x1 / width,
            "y": 100.0 * y1 / height,
            "width": 100.0 * (x2 - x1) / width,
            "height": 100.0 * (y2 - y1) / height,
            "rotation": 0,
            "rectanglelabels": [str(label)],
        },
        "score": _finite(score, "score"),
    }
    result["id"] = result_id if result_id is not None else _result_id(result)
    return result


def choices_result(
    tag: ControlTag,
    labels: Sequence[str],
    score: float,
    *,
    result_id: str | None = None,
) -> dict[str, Any]:
    """A ``choices`` result selecting ``labels`` (image-level classification)."""
    result: dict[str, Any] = {
        "from_name": tag.name,
        "to_name": tag.to_name,
        "type": "choices",
        "value": {"choices": [str(label) for label in labels]},
        "score": _finite(score, "score"),
    }
    result["id"] = result_id if result_id is not None else _result_id(result)
    return result


# --------------------------------------------------------------------------- annotations


def _items(
    result: Iterable[Mapping[str, Any]] | None, kind: str, tag_name: str | None
) -> Iterable[Mapping[str, Any]]:
    for item in result or ():
        if not isinstance(item, Mapping) or str(item.get("type", "")).lower() != kind:
            continue
        if tag_name is not None and item.get("from_name") != tag_name:
            continue
        if isinstance(item.get("value"), Mapping):
            yield item


def annotation_boxes(
    result: Iterable[Mapping[str, Any]] | None, tag_name: str | None = None
) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(label, (x1, y1, x2, y2) in original-image pixels) for each rectangle of an annotation.

    The inverse of ``rectangle_result``, for training. Items of other types, of other
    control tags (when ``tag_name`` is given), without their original size, or malformed are
    skipped. A rectangle with several labels yields one entry per label.
    """
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    for item in _items(result, "rectanglelabels", tag_name):
        value = item["value"]
        try:
            # Rotated rectangles are skipped: the detector predicts and trains on
            # axis-aligned boxes, and the axis-aligned hull of a rotated one would teach it
            # boxes larger than the object.
            if float(value.get("rotation") or 0.0) % 360.0 != 0.0:
                continue
            width = float(item["original_width"])
            height = float(item["original_height"])
            x = float(value["x"]) * width / 100.0
            y = float(value["y"]) * height / 100.0
            w = float(value["width"]) * width / 100.0
            h = float(value["height"]) * height / 100.0
            labels = value.get("rectanglelabels") or []
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)) or width <= 0 or height <= 0:
            continue
        box = (x, y, x + w, y + h)
        boxes.extend((str(label), box) for label in labels)
    return boxes


def annotation_choices(
    result: Iterable[Mapping[str, Any]] | None, tag_name: str | None = None
) -> list[str]:
    """The choices selected in an annotation (of one ``<Choices>`` tag when named)."""
    selected: list[str] = []
    for item in _items(result, "choices", tag_name):
        choices = item["value"].get("choices") or []
        if isinstance(choices, list):
            selected.extend(str(choice) for choice in choices if str(choice) not in selected)
    return selected
