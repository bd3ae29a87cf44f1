"""A battery of bad input over every route and the CLI: never a 5xx, each error named, the
server still up, and memory back near its level afterwards.

One server (real HTTP, a real Redis so that webhooks and bulk requests run their real code)
takes the named cases below, then Hypothesis' made-up bodies for every route."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from http_origins import png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from labelled_project import CONFIG

from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import LEGACY_TOKEN, LiveServer, make_settings, start_uvicorn, stop_uvicorn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-images")
    for name, size in {"one": (1, 1), "two": (2, 2), "strip": (20000, 8), "pole": (8, 20000),
                       "thin": (3, 900), "ok": (64, 48)}.items():  # fmt: skip
        (folder / f"{name}.png").write_bytes(png(*size, "gray"))
    (folder / "truncated.png").write_bytes(png(64, 48, "gray")[:60])
    (folder / "text.png").write_bytes(b"not an image at all")
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def live(
    bundle: ModelBundle, images: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    from label_studio_sahi.jobs.redis_server import connect

    settings = make_settings(
        label_studio_url="http://127.0.0.1:9",  # nothing listens: Label Studio is "down"
        label_studio_api_key=LEGACY_TOKEN,
        local_files_document_root=images,
        max_tasks_per_request=8,
        max_request_bytes=100_000,
        train_after_annotations=1000,
        model_dir=tmp_path_factory.mktemp("bad-models"),
    )
    server = start_uvicorn(
        create_app(settings, Service(settings, bundle, redis_client=connect(redis_url)))
    )
    yield server
    stop_uvicorn(server)


def _task(url: Any) -> dict[str, Any]:
    return {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": CONFIG}


def _local(name: str) -> dict[str, Any]:
    return _task(f"/data/local-files/?d={name}")


# name -> (method, route, body: JSON value or raw bytes, statuses allowed, text the detail names)
CASES: dict[str, tuple[str, str, Any, set[int], str]] = {
    # /predict: the body
    "predict: not json": ("POST", "/predict", b"{nope", {400}, "JSON"),
    "predict: empty body": ("POST", "/predict", b"", {400}, "empty"),
    "predict: json null": ("POST", "/predict", b"null", {400}, "invalid request"),
    "predict: json array": ("POST", "/predict", [1, 2], {400}, "invalid request"),
    "predict: json string": ("POST", "/predict", "tasks", {400}, "invalid request"),
    "predict: deep json": ("POST", "/predict", b"[" * 50_000 + b"]" * 50_000, {400, 413}, "JSON"),
    "predict: no tasks": ("POST", "/predict", {"label_config": CONFIG}, {400}, "tasks"),
    "predict: tasks a string": (
        "POST",
        "/predict",
        {"tasks": "x", "label_config": CONFIG},
        {400},
        "tasks",
    ),
    "predict: tasks of numbers": (
        "POST",
        "/predict",
        {"tasks": [1, None], "label_config": CONFIG},
        {400},
        "tasks",
    ),
    "predict: too many tasks": (
        "POST",
        "/predict",
        {"tasks": [{"id": i} for i in range(9)], "label_config": CONFIG},
        {413},
        "MAX_TASKS_PER_REQUEST",
    ),
    "predict: body too large": (
        "POST",
        "/predict",
        {"tasks": [], "label_config": "x" * 200_000},
        {413},
        "MAX_REQUEST_BYTES",
    ),
    "predict: config a number": (
        "POST",
        "/predict",
        {"tasks": [], "label_config": 5},
        {400},
        "label_config",
    ),
    "predict: config not xml": (
        "POST",
        "/predict",
        {"tasks": [], "label_config": "<View>"},
        {422},
        "XML",
    ),
    "predict: config no controls": (
        "POST",
        "/predict",
        {"tasks": [], "label_config": "<View><Text name='t' value='$t'/></View>"},
        {422},
        "RectangleLabels",
    ),
    "predict: config billion laughs": (
        "POST",
        "/predict",
        {
            "tasks": [],
            "label_config": '<!DOCTYPE v [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><View>&b;</View>',
        },
        {422},
        "",
    ),
    "predict: no config anywhere": (
        "POST",
        "/predict",
        {"tasks": [], "project": "77"},
        {400},
        "label_config",
    ),
    "predict: project a list": (
        "POST",
        "/predict",
        {"tasks": [], "project": [1], "label_config": CONFIG},
        {400},
        "project",
    ),
    "predict: project a/b": (
        "POST",
        "/predict",
        {"tasks": [], "project": "a/b", "label_config": CONFIG},
        {400},
        "project id",
    ),
    "predict: project 1:x": (
        "POST",
        "/predict",
        {"tasks": [], "project": "1:x", "label_config": CONFIG},
        {400},
        "project id",
    ),
    "predict: project huge": (
        "POST",
        "/predict",
        {"tasks": [], "project": 10**30, "label_config": CONFIG},
        {400},
        "project id",
    ),
    # /predict: the task
    "task: data a string": (
        "POST",
        "/predict",
        {"tasks": [{"id": 1, "data": "x"}], "label_config": CONFIG},
        {400},
        "data",
    ),
    "task: no data": (
        "POST",
        "/predict",
        {"tasks": [{"id": 1}], "label_config": CONFIG},
        {400},
        "data",
    ),
    "task: image a number": ("POST", "/predict", _task(5), {400}, "image"),
    "task: image a list": ("POST", "/predict", _task(["http://x/a.png"]), {400}, "image"),
    "task: image empty": ("POST", "/predict", _task(""), {400}, "image"),
    "task: id a string": (
        "POST",
        "/predict",
        {"tasks": [{"id": "x", "data": {"image": "ftp://a/b"}}], "label_config": CONFIG},
        {400},
        "ftp",
    ),
    # /predict: the URL
    "url: file scheme": ("POST", "/predict", _task("file:///etc/passwd"), {400}, "file"),
    "url: javascript": ("POST", "/predict", _task("javascript:alert(1)"), {400}, "javascript"),
    "url: no scheme": ("POST", "/predict", _task("example.com/a.png"), {400}, "scheme"),
    "url: http no host": ("POST", "/predict", _task("http:///a.png"), {400}, "host"),
    "url: broken ipv6": ("POST", "/predict", _task("http://[::1/a.png"), {400}, "URL"),
    "url: host label too long": (
        "POST",
        "/predict",
        _task("http://" + "a" * 70 + ".example.com/x.png"),
        {400},
        "host",
    ),
    "url: very long": (
        "POST",
        "/predict",
        _task("http://example.invalid/" + "a" * 20_000),
        {400, 403, 424},
        "example.invalid",
    ),
    "url: nul byte": ("POST", "/predict", _task("http://exa\x00mple.com/a.png"), {400, 424}, ""),
    "url: bad port": ("POST", "/predict", _task("http://example.com:99999/a.png"), {400}, "URL"),
    "url: loopback": ("POST", "/predict", _task("http://127.0.0.1:6379/"), {403}, "EGRESS_ALLOW"),
    "url: metadata service": (
        "POST",
        "/predict",
        _task("http://169.254.169.254/latest/meta-data/"),
        {403},
        "link-local",
    ),
    "url: private network": ("POST", "/predict", _task("http://10.0.0.8/a.png"), {403}, "private"),
    "url: localhost name": ("POST", "/predict", _task("http://localhost:22/"), {403}, "loopback"),
    "url: unresolvable": (
        "POST",
        "/predict",
        _task("http://no-such-host.invalid/a.png"),
        {424},
        "resolve",
    ),
    "url: label studio down": ("POST", "/predict", _task("/data/upload/a.png"), {424}, "connect"),
    "url: cloud without task id": (
        "POST",
        "/predict",
        {"tasks": [{"data": {"image": "s3://b/k.png"}}], "label_config": CONFIG},
        {400},
        "task id",
    ),
    "url: traversal": ("POST", "/predict", _local("../../etc/passwd"), {403}, "outside"),
    "url: absolute traversal": ("POST", "/predict", _local("/etc/passwd"), {403, 424}, ""),
    "url: nul in local path": ("POST", "/predict", _local("ok.png%00.txt"), {400, 424}, ""),
    "url: local missing": ("POST", "/predict", _local("missing.png"), {424}, "missing.png"),
    "url: local empty d": ("POST", "/predict", _local(""), {400}, "d="),
    # /predict: the image
    "image: 1x1": ("POST", "/predict", _local("one.png"), {200}, ""),
    "image: 2x2": ("POST", "/predict", _local("two.png"), {200}, ""),
    "image: 20000x8 strip": ("POST", "/predict", _local("strip.png"), {200}, ""),
    "image: 8x20000 pole": ("POST", "/predict", _local("pole.png"), {200}, ""),
    "image: 3x900": ("POST", "/predict", _local("thin.png"), {200}, ""),
    "image: truncated": ("POST", "/predict", _local("truncated.png"), {415}, "truncated"),
    "image: not an image": ("POST", "/predict", _local("text.png"), {415}, "image"),
    "image: empty file": ("POST", "/predict", _local("empty.png"), {415}, ""),
    # /setup
    "setup: not json": ("POST", "/setup", b"<xml/>", {400}, "JSON"),
    "setup: a list": ("POST", "/setup", [], {400}, "invalid request"),
    "setup: project 1 2": ("POST", "/setup", {"project": "1 2"}, {400}, "project id"),
    "setup: project negative": ("POST", "/setup", {"project": -1}, {400}, "project id"),
    "setup: project bool": ("POST", "/setup", {"project": True}, {400}, "project"),
    "setup: project an object": ("POST", "/setup", {"project": {"id": 1}}, {400}, "project"),
    "setup: project huge": ("POST", "/setup", {"project": 10**400}, {400}, "project id"),
    "setup: schema a number": ("POST", "/setup", {"project": "1", "schema": 5}, {400}, "schema"),
    "setup: schema not xml": ("POST", "/setup", {"project": "1", "schema": "<View"}, {422}, "XML"),
    "setup: extra params a list": (
        "POST",
        "/setup",
        {"project": "1", "extra_params": [1]},
        {400},
        "extra_params",
    ),
    # /webhook
    "webhook: a list": ("POST", "/webhook", [{"action": "START_TRAINING"}], {400}, "object"),
    "webhook: no project": ("POST", "/webhook", {"action": "START_TRAINING"}, {400}, "project"),
    "webhook: project a string": (
        "POST",
        "/webhook",
        {"action": "ANNOTATION_CREATED", "project": "7"},
        {400},
        "object",
    ),
    "webhook: project a number": (
        "POST",
        "/webhook",
        {"action": "ANNOTATION_CREATED", "project": 7},
        {400},
        "object",
    ),
    "webhook: project id 1 2": (
        "POST",
        "/webhook",
        {"action": "START_TRAINING", "project": {"id": "1 2"}},
        {400},
        "project id",
    ),
    "webhook: project id 1:x": (
        "POST",
        "/webhook",
        {"action": "START_TRAINING", "project": {"id": "1:x"}},
        {400},
        "project id",
    ),
    "webhook: project id a/b": (
        "POST",
        "/webhook",
        {"action": "START_TRAINING", "project": {"id": "a/b"}},
        {400},
        "project id",
    ),
    "webhook: project id a list": (
        "POST",
        "/webhook",
        {"action": "START_TRAINING", "project": {"id": [1]}},
        {400},
        "project id",
    ),
    "webhook: action a list": (
        "POST",
        "/webhook",
        {"action": ["START_TRAINING"], "project": {"id": 1}},
        {200},
        "Unknown",
    ),
    "webhook: unknown action": (
        "POST",
        "/webhook",
        {"action": "DROP_TABLES", "project": {"id": 1}},
        {200},
        "Unknown",
    ),
    "webhook: annotations a string": (
        "POST",
        "/webhook",
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 5}, "annotations": "x"},
        {201},
        "",
    ),
    "webhook: not json": ("POST", "/webhook", b"action=START_TRAINING", {400}, "JSON"),
    # /bulk-predict and /versions
    "bulk: no project": ("POST", "/bulk-predict", {}, {400}, "project"),
    "bulk: project 1:x": ("POST", "/bulk-predict", {"project": "1:x"}, {400}, "project id"),
    "bulk: project a/b": ("POST", "/bulk-predict", {"project": "a/b"}, {400}, "project id"),
    "bulk: only_missing a word": (
        "POST",
        "/bulk-predict",
        {"project": 1, "only_missing": "maybe"},
        {400},
        "only_missing",
    ),
    "bulk: a list": ("POST", "/bulk-predict", [1], {400}, "invalid request"),
    "bulk progress: 1:x": ("GET", "/bulk-predict/1:x", None, {400}, "project id"),
    "bulk progress: spaces": ("GET", "/bulk-predict/1%202", None, {400}, "project id"),
    "bulk progress: dots": ("GET", "/bulk-predict/..%2F..%2Fetc", None, {400, 404}, ""),
    "versions: a/b": ("GET", "/versions?project=a/b", None, {400}, "project id"),
    "versions: 1:x": ("GET", "/versions?project=1:x", None, {400}, "project id"),
    "versions: huge": ("GET", "/versions?project=" + "9" * 40, None, {400}, "project id"),
    # routes and methods
    "unknown route": ("GET", "/admin", None, {404}, "Not Found"),
    "wrong method": ("GET", "/predict", None, {405}, "Method Not Allowed"),
    "put on webhook": ("PUT", "/webhook", {}, {405}, "Method Not Allowed"),
}


def _send(live: LiveServer, method: str, route: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.request(method, f"{live.url}{route}", content=body,
                             headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    if body is None and method == "GET":
        return httpx.request(method, f"{live.url}{route}", timeout=60)
    return httpx.request(method, f"{live.url}{route}", json=body, timeout=60)


def _problem(name: str, answer: httpx.Response, allowed: set[int], text: str) -> str | None:
    """What is wrong with the answer to case ``name``, or None."""
    if answer.status_code not in allowed:
        return f"{name}: {answer.status_code} {answer.text[:200]}"
    try:
        body = answer.json()
    except ValueError:
        return f"{name}: not JSON: {answer.text[:200]}"
    if answer.status_code >= 400:
        detail = str(body.get("detail", ""))
        if body.get("status_code") != answer.status_code or not body.get("error") or not detail:
            return f"{name}: not a named error: {body}"
        if text.lower() not in detail.lower():
            return f"{name}: {detail!r} does not name {text!r}"
    return None


def test_the_battery_has_at_least_eighty_cases() -> None:
    assert len(CASES) >= 80


def test_every_bad_input_gets_a_named_4xx_and_the_server_stays_up(live: LiveServer) -> None:
    process = psutil.Process()
    for round_ in range(2):  # the first round warms caches; the second measures memory
        if round_ == 1:
            before = process.memory_info().rss
        problems = []
        for name, (method, route, body, allowed, text) in CASES.items():
            problems.append(_problem(name, _send(live, method, route, body), allowed, text))
            assert httpx.get(f"{live.url}/health").status_code == 200, f"down after {name}"
        found = [p for p in problems if p]
        assert not found, "\n".join(found)
    grown = process.memory_info().rss - before
    assert grown < 150 * 2**20, (
        f"a second pass of the battery grew memory by {grown / 2**20:.0f} MiB"
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
ROUTE_BODIES = {
    "/predict": st.fixed_dictionaries({"tasks": st.lists(st.dictionaries(st.sampled_from(["id", "data"]), json_values), max_size=3)},
                                      optional={"label_config": json_values, "project": json_values}),
    "/setup": st.fixed_dictionaries({}, optional={"project": json_values, "schema": json_values, "extra_params": json_values}),
    "/webhook": st.fixed_dictionaries({"action": st.sampled_from(["START_TRAINING", "ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "X"]) | json_values},
                                      optional={"project": json_values | st.fixed_dictionaries({"id": json_values}), "annotations": json_values}),
    "/bulk-predict": st.fixed_dictionaries({}, optional={"project": json_values, "only_missing": json_values}),
}  # fmt: skip


@pytest.mark.parametrize("route", sorted(ROUTE_BODIES))
def test_made_up_bodies_never_get_a_5xx(live: LiveServer, route: str) -> None:
    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(body=ROUTE_BODIES[route] | json_values)
    def post_anything(body: Any) -> None:
        answer = httpx.post(f"{live.url}{route}", json=body, timeout=60)
        assert answer.status_code < 500 or (
            route in ("/webhook", "/bulk-predict") and answer.status_code == 503
        ), (body, answer.status_code, answer.text[:300])
        json.loads(answer.text)  # always a JSON answer

    post_anything()
    assert httpx.get(f"{live.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("name", "expect"), [("one.png", 0), ("strip.png", 0), ("text.png", 1), ("missing.png", 1)]
)
def test_the_cli_answers_odd_images_without_a_traceback(
    images: Path, detector_dir: Path, name: str, expect: int
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "label_studio_sahi.cli", "predict", str(images / name),
         "--detector", str(detector_dir), "--classifier", "", "--device", "cpu", "--jsonl"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(images)},
    )  # fmt: skip
    assert run.returncode == expect, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert (record.get("error") is not None) == bool(expect)
