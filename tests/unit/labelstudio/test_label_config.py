"""Label config parsing, Label Studio result building, and a model's classes as a project's labels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from label_studio_sahi.errors import LabelConfigError
from label_studio_sahi.inference.slicing import Detections
from label_studio_sahi.labelstudio.label_config import (
    ControlTag,
    LabelConfig,
    annotation_boxes,
    annotation_choices,
    choices_result,
    default_label_config,
    parse_label_config,
    rectangle_result,
)
from label_studio_sahi.training.evaluate import in_project_labels

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" model_score_threshold="0.4">
    <Label value="Car" predicted_values="car,truck"/>
    <Label value="person"/>
  </RectangleLabels>
  <Choices name="scene" toName="image" choice="multiple">
    <Choice value="Street"/>
    <Choice value="Indoor"/>
  </Choices>
</View>
"""


def _rect(labels: str, extra: str = "") -> ControlTag:
    xml = (
        f'<View><Image name="img" value="$photo"/>'
        f'<RectangleLabels name="box" toName="img" {extra}>{labels}</RectangleLabels></View>'
    )
    return parse_label_config(xml).rectangles[0]


# ----------------------------------------------------------------------------- parsing


def test_example_config_is_parsed_into_controls() -> None:
    config = parse_label_config(CONFIG)
    assert isinstance(config, LabelConfig)
    (rect,) = config.rectangles
    (scene,) = config.choices
    assert (rect.name, rect.to_name, rect.kind, rect.image_key) == (
        "label",
        "image",
        "rectanglelabels",
        "image",
    )
    assert rect.labels == ("Car", "person")
    assert rect.score_threshold == 0.4
    assert rect.multiple is False
    assert (scene.name, scene.to_name, scene.kind, scene.labels) == (
        "scene",
        "image",
        "choices",
        ("Street", "Indoor"),
    )
    assert scene.score_threshold is None
    assert config.image_keys == ("image",)


def test_labels_keep_config_order() -> None:
    tag = _rect('<Label value="b"/><Label value="a"/><Label value="c"/>')
    assert tag.labels == ("b", "a", "c")


def test_tag_threshold_overrides_global() -> None:
    # The tag carries its own threshold; without the attribute it is None so the caller
    # falls back to the global setting.
    assert _rect('<Label value="a"/>', 'model_score_threshold="0.25"').score_threshold == 0.25
    assert _rect('<Label value="a"/>').score_threshold is None


@pytest.mark.parametrize("raw", ["high", "1.5", "-0.1", "nan"])
def test_invalid_threshold_is_rejected_naming_the_tag(raw: str) -> None:
    with pytest.raises(LabelConfigError, match="box") as info:
        _rect('<Label value="a"/>', f'model_score_threshold="{raw}"')
    assert "model_score_threshold" in info.value.message


def test_multiple_choice_flag() -> None:
    config = parse_label_config(CONFIG)
    assert config.choices[0].multiple is True
    single = parse_label_config(
        '<View><Image name="i" value="$i"/>'
        '<Choices name="c" toName="i"><Choice value="x"/></Choices></View>'
    )
    assert single.choices[0].multiple is False
    explicit_single = parse_label_config(
        '<View><Image name="i" value="$i"/>'
        '<Choices name="c" toName="i" choice="single-radio"><Choice value="x"/></Choices></View>'
    )
    assert explicit_single.choices[0].multiple is False


def test_nested_views_are_found() -> None:
    xml = """
    <View>
      <Header value="Boxes"/>
      <View style="display: flex">
        <View><Image name="left" value="$left_image"/></View>
        <View>
          <Header value="Classes"><Text name="t" value="help"/></Header>
          <View><RectangleLabels name="boxes" toName="left">
            <View><Label value="cat"/></View>
          </RectangleLabels></View>
        </View>
      </View>
      <View><Image name="right" value="$right_image"/>
        <Choices name="kind" toName="right"><View><Choice value="pet"/></View></Choices>
      </View>
    </View>
    """
    config = parse_label_config(xml)
    assert [t.name for t in config.rectangles] == ["boxes"]
    assert config.rectangles[0].labels == ("cat",)
    assert [t.name for t in config.choices] == ["kind"]
    assert config.image_keys == ("left_image", "right_image")


def test_tag_names_are_accepted_case_insensitively() -> None:
    xml = (
        '<view><IMAGE name="image" value="$image"/>'
        '<rectanglelabels name="label" toname="image"><label value="Car"/></rectanglelabels>'
        '<CHOICES name="c" TONAME="image"><choice value="x"/></CHOICES></view>'
    )
    config = parse_label_config(xml)
    assert config.rectangles[0].labels == ("Car",)
    assert config.rectangles[0].to_name == "image"
    assert config.choices[0].labels == ("x",)


def test_comma_separated_to_name_takes_the_first() -> None:
    xml = (
        '<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
        '<RectangleLabels name="l" toName="a,b"><Label value="x"/></RectangleLabels></View>'
    )
    tag = parse_label_config(xml).rectangles[0]
    assert (tag.to_name, tag.image_key) == ("a", "a")


def test_parsed_configs_are_cached_by_content() -> None:
    first = parse_label_config(CONFIG)
    assert parse_label_config(CONFIG) is first
    # Equal content in a distinct string object hits the cache too.
    assert parse_label_config("".join(list(CONFIG))) is first
    other = parse_label_config(CONFIG.replace("0.4", "0.5"))
    assert other is not first
    assert other.rectangles[0].score_threshold == 0.5


def test_parsed_config_is_immutable() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tag.name = "other"  # type: ignore[misc]
    assert hash(tag) == hash(parse_label_config(CONFIG).rectangles[0])


# ------------------------------------------------------------------------ label mapping


def test_model_class_matches_a_label_of_the_same_name_case_insensitively() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    assert tag.label_for("person") == "person"
    assert tag.label_for("PERSON ") == "person"
    assert tag.label_for(" Car") == "Car"


def test_predicted_values_map_model_classes_to_a_label() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    assert tag.label_for("truck") == "Car"
    assert tag.label_for("Truck") == "Car"
    assert tag.label_for("car") == "Car"


def test_predicted_values_tolerate_spaces_and_empty_items() -> None:
    tag = _rect('<Label value="Vehicle" predicted_values=" bus , van,,"/>')
    assert tag.label_for("bus") == "Vehicle"
    assert tag.label_for("van") == "Vehicle"
    assert tag.label_for("") is None


def test_alias_maps_a_model_class_to_a_label() -> None:
    tag = _rect('<Label value="Person" alias="pedestrian"/>')
    assert tag.label_for("pedestrian") == "Person"
    assert tag.label_for("person") == "Person"


def test_predicted_values_win_over_a_name_match() -> None:
    tag = _rect('<Label value="truck"/><Label value="Vehicle" predicted_values="truck,car"/>')
    assert tag.label_for("truck") == "Vehicle"
    assert tag.label_for("car") == "Vehicle"


def test_classes_without_a_label_are_dropped() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    assert tag.label_for("dog") is None
    assert tag.label_for("") is None


def test_choices_map_classes_like_rectangles() -> None:
    tag = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
        '<Choice value="Street" predicted_values="road,highway"/><Choice value="Park"/>'
        "</Choices></View>"
    ).choices[0]
    assert tag.label_for("highway") == "Street"
    assert tag.label_for("park") == "Park"
    assert tag.label_for("beach") is None


# ------------------------------------------------------------------------------ errors


def test_config_with_neither_tag_is_rejected_with_a_clear_error() -> None:
    xml = (
        '<View><Image name="i" value="$i"/>'
        '<PolygonLabels name="p" toName="i"><Label value="x"/></PolygonLabels></View>'
    )
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml)
    message = info.value.message
    assert "RectangleLabels" in message and "Choices" in message  # what it supports
    assert "PolygonLabels" in message and "Image" in message  # what it found
    assert info.value.status == 422


@pytest.mark.parametrize("xml", ["<View><Image", "not xml at all", "<View></Other>"])
def test_malformed_xml_is_rejected(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config(xml)


@pytest.mark.parametrize("xml", ["", "   \n"])
def test_empty_config_is_rejected(xml: str) -> None:
    with pytest.raises(LabelConfigError, match="empty"):
        parse_label_config(xml)


def test_billion_laughs_config_is_refused() -> None:
    xml = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<View><Image name="i" value="$i"/>
<RectangleLabels name="l" toName="i"><Label value="&lol4;"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="refused for safety"):
        parse_label_config(xml)


def test_external_entity_config_is_refused() -> None:
    xml = """<?xml version="1.0"?>
<!DOCTYPE View [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<View><Image name="i" value="$i"/>
<RectangleLabels name="l" toName="i"><Label value="&xxe;"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="refused for safety"):
        parse_label_config(xml)


def test_control_without_labels_is_rejected() -> None:
    with pytest.raises(LabelConfigError, match="no <Label>"):
        _rect("")


def test_label_without_value_is_rejected() -> None:
    with pytest.raises(LabelConfigError, match="without a value"):
        _rect('<Label value="a"/><Label/>')


@pytest.mark.parametrize(
    ("control", "missing"),
    [
        ('<RectangleLabels toName="i"><Label value="a"/></RectangleLabels>', "name"),
        ('<RectangleLabels name="l"><Label value="a"/></RectangleLabels>', "toName"),
        ('<Choices name="c" toName=""><Choice value="a"/></Choices>', "toName"),
    ],
)
def test_control_without_name_or_to_name_is_rejected(control: str, missing: str) -> None:
    with pytest.raises(LabelConfigError, match=f"no {missing} attribute"):
        parse_label_config(f'<View><Image name="i" value="$i"/>{control}</View>')


def test_controls_on_other_objects_are_skipped_not_fatal() -> None:
    xml = (
        '<View><Image name="img" value="$image"/><Text name="t" value="$text"/>'
        '<Choices name="c" toName="t"><Choice value="a"/></Choices>'
        '<Choices name="region" toName="img" perRegion="true"><Choice value="b"/></Choices>'
        '<RectangleLabels name="box" toName="img"><Label value="car"/></RectangleLabels></View>'
    )
    config = parse_label_config(xml)
    assert [t.name for t in config.rectangles] == ["box"] and config.choices == ()


def test_config_whose_only_control_points_at_no_image_is_rejected() -> None:
    xml = (
        '<View><Text name="t" value="$text"/>'
        '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(LabelConfigError, match="skipped: <Choices name='c'>"):
        parse_label_config(xml)


def test_image_without_data_reference_is_rejected() -> None:
    xml = (
        '<View><Image name="i" value="http://example.com/x.png"/>'
        '<Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(LabelConfigError, match=r"\$image"):
        parse_label_config(xml)


def test_duplicate_control_names_are_rejected() -> None:
    xml = (
        '<View><Image name="i" value="$i"/>'
        '<RectangleLabels name="x" toName="i"><Label value="a"/></RectangleLabels>'
        '<Choices name="x" toName="i"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(LabelConfigError, match="unique"):
        parse_label_config(xml)


# ----------------------------------------------------------------------------- results


def test_rectangle_result_is_in_percent_of_original_size() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    result = rectangle_result(tag, (100.0, 300.0, 500.0, 900.0), "Car", 0.875, 4000, 3000)
    result_id = result.pop("id")
    assert result == {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 4000,
        "original_height": 3000,
        "image_rotation": 0,
        "value": {
            "x": 2.5,
            "y": 10.0,
            "width": 10.0,
            "height": 20.0,
            "rotation": 0,
            "rectanglelabels": ["Car"],
        },
        "score": 0.875,
    }
    assert isinstance(result_id, str) and len(result_id) == 10


def test_result_numbers_are_plain_python_types() -> None:
    np = pytest.importorskip("numpy")
    tag = parse_label_config(CONFIG).rectangles[0]
    box = tuple(np.float32(v) for v in (10, 20, 30, 40))
    result = rectangle_result(tag, box, "Car", np.float32(0.5), np.int64(100), np.int64(100))
    for number in (*result["value"].values(), result["score"]):
        assert type(number) in (int, float, list)
    assert type(result["original_width"]) is int
    json.dumps(result)  # must be serialisable as-is


def test_box_outside_image_is_clipped() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    value = rectangle_result(tag, (-50.0, -10.0, 250.0, 120.0), "Car", 0.9, 200, 100)["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (0.0, 0.0, 100.0, 100.0)
    inside = rectangle_result(tag, (150.0, 50.0, 400.0, 80.0), "Car", 0.9, 200, 100)["value"]
    assert (inside["x"], inside["y"], inside["width"], inside["height"]) == (75.0, 50.0, 25.0, 30.0)


def test_rectangle_result_rejects_non_finite_numbers_and_empty_images() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    with pytest.raises(ValueError, match="finite"):
        rectangle_result(tag, (0.0, 0.0, float("nan"), 1.0), "Car", 0.5, 10, 10)
    with pytest.raises(ValueError, match="finite"):
        rectangle_result(tag, (0.0, 0.0, 1.0, 1.0), "Car", float("inf"), 10, 10)
    with pytest.raises(ValueError, match="positive"):
        rectangle_result(tag, (0.0, 0.0, 1.0, 1.0), "Car", 0.5, 0, 10)


def test_result_ids_are_deterministic_and_distinct_per_content() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    a = rectangle_result(tag, (1.0, 2.0, 3.0, 4.0), "Car", 0.5, 10, 10)
    again = rectangle_result(tag, (1.0, 2.0, 3.0, 4.0), "Car", 0.5, 10, 10)
    b = rectangle_result(tag, (1.0, 2.0, 3.0, 5.0), "Car", 0.5, 10, 10)
    c = rectangle_result(tag, (1.0, 2.0, 3.0, 4.0), "person", 0.5, 10, 10)
    assert a["id"] == again["id"]
    assert len({a["id"], b["id"], c["id"]}) == 3
    assert rectangle_result(tag, (1, 2, 3, 4), "Car", 0.5, 10, 10, result_id="r1")["id"] == "r1"


def test_choices_result_is_in_label_studio_format() -> None:
    tag = parse_label_config(CONFIG).choices[0]
    result = choices_result(tag, ["Street", "Indoor"], 0.83)
    result_id = result.pop("id")
    assert result == {
        "from_name": "scene",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": ["Street", "Indoor"]},
        "score": 0.83,
    }
    assert isinstance(result_id, str) and len(result_id) == 10


# --------------------------------------------------------------------------- annotations


def test_rectangle_result_round_trips_through_annotation_boxes() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    boxes = [("Car", (12.0, 34.0, 567.0, 890.0)), ("person", (0.0, 0.0, 1.0, 1.0))]
    result = [rectangle_result(tag, box, label, 0.9, 1920, 1080) for label, box in boxes]
    back = annotation_boxes(result)
    assert [label for label, _ in back] == ["Car", "person"]
    for (_, got), (_, want) in zip(back, boxes, strict=True):
        assert got == pytest.approx(want, abs=1e-9)


def test_annotation_boxes_skip_other_types_tags_and_rotated_rectangles() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]
    rect = rectangle_result(tag, (10.0, 10.0, 20.0, 20.0), "Car", 0.9, 100, 100)
    rotated = json.loads(json.dumps(rect))
    rotated["value"]["rotation"] = 30
    other_tag = {**rect, "from_name": "other"}
    choices = choices_result(parse_label_config(CONFIG).choices[0], ["Street"], 0.5)
    polygon = {"type": "polygonlabels", "value": {"points": [[0, 0]]}}
    malformed = {"type": "rectanglelabels", "value": {"x": 1}}
    result = [rect, rotated, other_tag, choices, polygon, malformed]
    assert annotation_boxes(result, "label") == [("Car", (10.0, 10.0, 20.0, 20.0))]
    assert [label for label, _ in annotation_boxes(result)] == ["Car", "Car"]
    assert annotation_boxes([]) == []


def test_rectangle_with_several_labels_gives_one_box_per_label() -> None:
    item = {
        "type": "rectanglelabels",
        "from_name": "label",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": 50, "y": 50, "width": 25, "height": 10, "rectanglelabels": ["a", "b"]},
    }
    box = (100.0, 50.0, 150.0, 60.0)
    assert annotation_boxes([item]) == [("a", box), ("b", box)]


def test_annotation_choices_reads_selected_choices() -> None:
    config = parse_label_config(CONFIG)
    result = [
        choices_result(config.choices[0], ["Street", "Indoor"], 0.5),
        rectangle_result(config.rectangles[0], (1, 1, 2, 2), "Car", 0.5, 10, 10),
        {"type": "choices", "from_name": "weather", "value": {"choices": ["Rain"]}},
    ]
    assert annotation_choices(result) == ["Street", "Indoor", "Rain"]
    assert annotation_choices(result, "scene") == ["Street", "Indoor"]
    assert annotation_choices([]) == []


def test_default_config_escapes_class_names_and_round_trips() -> None:
    odd = ['a<b & "c"', "it's", "tab\tand\nnewline", "]]>"]
    xml = default_label_config([*odd, "car", "car", " "], ["x > y", "indoor"])
    config = parse_label_config(xml)
    (boxes,) = config.rectangles
    (scene,) = config.choices
    assert boxes.labels == (*odd, "car")  # repeats and blank names left out
    assert scene.labels == ("x > y", "indoor")
    assert boxes.label_for('a<b & "c"') == 'a<b & "c"' and config.image_keys == ("image",)


def test_default_config_has_only_the_controls_with_classes() -> None:
    only_boxes = parse_label_config(default_label_config(["car"], []))
    assert [c.name for c in only_boxes.controls] == ["label"]
    only_classes = parse_label_config(default_label_config([], ["indoor"]))
    assert [c.name for c in only_classes.controls] == ["class"]


def test_a_models_boxes_take_the_projects_labels_as_served() -> None:
    tag = parse_label_config(CONFIG).rectangles[0]  # Car (car, truck), person
    found = Detections(
        torch.tensor([[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7], [3, 3, 8, 8]]).float(),
        torch.tensor([0.9, 0.8, 0.7, 0.6]),
        torch.tensor([0, 1, 2, 3]),
    )
    base = {0: "truck", 1: "dog", 2: "person", 3: "car"}  # a base model's own classes
    mapped = in_project_labels(found, base, tag, own_labels=False)
    assert mapped.labels.tolist() == [0, 1, 0]  # Car, person, Car; no label for a dog
    assert mapped.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    tuned = {0: "person", 1: "Car", 2: "Car", 3: "bicycle"}  # a fine-tuned model's labels
    assert in_project_labels(found, tuned, tag, own_labels=True).labels.tolist() == [1, 0, 0]
