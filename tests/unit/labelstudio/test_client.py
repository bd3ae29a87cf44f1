"""The Label Studio REST client against FakeStudio (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from label_studio_sahi.errors import BackendError, BadRequest
from label_studio_sahi.labelstudio.client import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    StudioAuthError,
    StudioClient,
    StudioError,
    StudioNotFound,
    StudioResponseError,
    project_id,
)
from label_studio_sahi.settings import Settings
from testkit.fake_studio import FakeStudio, make_jwt

CONFIG = '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image"><Label value="car"/></RectangleLabels></View>'
BOX = {
    "from_name": "label",
    "to_name": "image",
    "type": "rectanglelabels",
    "original_width": 100,
    "original_height": 80,
    "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": ["car"]},
}


def settings(url: str | None, key: str | None) -> Settings:
    return Settings(_env_file=None, label_studio_url=url, label_studio_api_key=key)  # type: ignore[call-arg, arg-type]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStudio]:
    with FakeStudio() as studio:
        pid = studio.add_project(CONFIG, title="cars", min_annotations_to_start_training=3)
        for i in range(5):
            tid = studio.add_task(pid, {"image": studio.upload(pid, f"img{i}.png", b"png")})
            if i < 2:
                studio.add_annotation(tid, [BOX])
        studio.add_annotation(3, [], was_cancelled=True)
        yield studio


@pytest.fixture(params=["legacy", "pat"])
def client(request: pytest.FixtureRequest, fake: FakeStudio) -> Iterator[StudioClient]:
    key = fake.legacy_token if request.param == "legacy" else fake.pat
    with StudioClient.from_settings(settings(fake.url, key)) as studio:
        assert studio.token_kind == request.param
        yield studio


def test_project_and_export_with_either_token(client: StudioClient, fake: FakeStudio) -> None:
    before = len(fake.requests)
    project = client.project(1)
    assert project["title"] == "cars"
    assert project["label_config"] == CONFIG
    assert project["min_annotations_to_start_training"] == 3

    tasks = client.export("1")
    assert [t["id"] for t in tasks] == [1, 2, 3]  # only tasks with annotations
    ann = tasks[0]["annotations"][0]
    assert ann["result"] == [BOX] and ann["was_cancelled"] is False
    assert {"id", "ground_truth", "updated_at"} <= ann.keys()
    assert tasks[2]["annotations"][0]["was_cancelled"] is True
    assert tasks[0]["data"]["image"] == "/data/upload/1/img0.png"

    everything = client.export(1, all_tasks=True)
    assert [t["id"] for t in everything] == [1, 2, 3, 4, 5]

    sent = fake.requests[before:]
    expected = "legacy" if client.token_kind == "legacy" else "bearer"
    assert {r.auth for r in sent if r.path != "/api/token/refresh"} == {expected}
    if client.token_kind == "pat":  # one refresh serves all requests
        assert sum(r.path == "/api/token/refresh" for r in sent) <= 1
    exports = [r.query for r in sent if r.path == "/api/projects/1/export"]
    assert exports == [{"exportType": "JSON"}, {"exportType": "JSON", "download_all_tasks": "true"}]


def test_export_calls_are_counted(fake: FakeStudio) -> None:
    before = fake.export_calls
    with StudioClient.from_settings(settings(fake.url, fake.legacy_token)) as client:
        client.export(1)
    assert fake.export_calls == before + 1


def test_tasks_paging(client: StudioClient, fake: FakeStudio) -> None:
    before = len(fake.requests)
    tasks = list(client.iter_tasks(1, page_size=2))
    assert [t["id"] for t in tasks] == [1, 2, 3, 4, 5]
    assert tasks[0]["annotations"][0]["result"] == [BOX]
    pages = [r.query for r in fake.requests[before:] if r.path == "/api/tasks"]
    assert [q["page"] for q in pages] == ["1", "2", "3"]  # stops at total, no 4th request
    assert pages[0] == {"project": "1", "fields": "all", "page": "1", "page_size": "2"}
    assert [t["id"] for t in client.iter_tasks("1.1712345678", page_size=5)] == [1, 2, 3, 4, 5]


def test_tasks_paging_plain_lists_until_404() -> None:
    # Older Label Studio answers a plain list and 404 past the last page.
    pages = {"1": [{"id": 1}, {"id": 2}], "2": [{"id": 3}]}

    def handler(request: httpx.Request) -> httpx.Response:
        page = request.url.params["page"]
        if page in pages:
            return httpx.Response(200, json=pages[page])
        return httpx.Response(404, json={"detail": "Invalid page."})

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with StudioClient.from_settings(settings("http://ls.test", "k" * 40), client=http) as client:
        assert [t["id"] for t in client.iter_tasks(7, page_size=2)] == [1, 2, 3]
    assert not http.is_closed  # an injected client is the caller's to close
    pages["2"] = []  # an empty page ends it too
    with StudioClient.from_settings(settings("http://ls.test", "k" * 40), client=http) as client:
        assert [t["id"] for t in client.iter_tasks(7, page_size=2)] == [1, 2]


def test_empty_project_has_no_tasks(fake: FakeStudio) -> None:
    pid = fake.add_project(CONFIG, title="empty")
    with StudioClient.from_settings(settings(fake.url, fake.legacy_token)) as client:
        assert list(client.iter_tasks(pid)) == []
        assert client.export(pid) == []


def test_create_prediction(client: StudioClient, fake: FakeStudio) -> None:
    created = client.create_prediction(4, [BOX], 0.75, "sahi-v1")
    assert created["task"] == 4 and created["model_version"] == "sahi-v1"
    stored = fake.predictions[-1]
    assert stored["id"] == created["id"]
    assert (stored["result"], stored["score"], stored["model_version"]) == ([BOX], 0.75, "sahi-v1")
    assert fake.tasks[4]["predictions"][-1]["id"] == created["id"]


def test_prediction_for_unknown_task_shows_the_answer(fake: FakeStudio) -> None:
    client = StudioClient.from_settings(settings(fake.url, fake.legacy_token))
    with client, pytest.raises(StudioResponseError) as info:
        client.create_prediction(999, [BOX], 0.5, "v1")
    assert info.value.upstream_status == 400
    assert "HTTP 400" in info.value.message and "Validation error" in info.value.message


def test_whoami(client: StudioClient) -> None:
    assert client.whoami()["email"] == "admin@example.com"


@pytest.mark.parametrize(
    ("url", "key", "setting"),
    [
        (None, "k" * 40, "LABEL_STUDIO_URL"),
        ("  ", "k" * 40, "LABEL_STUDIO_URL"),
        ("localhost:8080", "k" * 40, "LABEL_STUDIO_URL"),
        ("http://localhost:8080", None, "LABEL_STUDIO_API_KEY"),
        ("http://localhost:8080", " ", "LABEL_STUDIO_API_KEY"),
    ],
)
def test_missing_settings(url: str | None, key: str | None, setting: str) -> None:
    with pytest.raises(StudioError) as info:
        StudioClient.from_settings(settings(url, key))
    assert setting in info.value.message
    assert isinstance(info.value, BackendError)
    assert (info.value.status, info.value.code) == (503, "label_studio_unavailable")


@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_wrong_token(fake: FakeStudio, kind: str) -> None:
    wrong = "f" * 40 if kind == "legacy" else fake.pat[:-4] + "AAAA"
    with (
        StudioClient.from_settings(settings(fake.url, wrong)) as client,
        pytest.raises(StudioAuthError) as info,
    ):
        client.project(1)
    message = info.value.message
    assert "LABEL_STUDIO_API_KEY" in message
    assert wrong not in message and wrong not in repr(client)
    assert info.value.upstream_status == 401 and info.value.status == 502
    assert isinstance(info.value, StudioError)


def test_unknown_project(fake: FakeStudio) -> None:
    with StudioClient.from_settings(settings(fake.url, fake.legacy_token)) as client:
        for call in (client.project, client.export, lambda p: list(client.iter_tasks(p))):
            with pytest.raises(StudioNotFound) as info:
                call(4242)
            assert "project 4242" in info.value.message
            assert info.value.status == 404


def test_unreachable_url() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = "0123456789abcdef0123456789abcdef01234567"
    client = StudioClient.from_settings(settings(f"http://user:secret@127.0.0.1:{port}", key))
    with client, pytest.raises(StudioError) as info:
        client.whoami()
    assert "secret" not in repr(client)
    assert f"127.0.0.1:{port}" in info.value.message
    assert "LABEL_STUDIO_URL" in info.value.message
    assert key not in info.value.message and "secret" not in info.value.message
    assert info.value.status == 503


def test_timeouts_and_odd_answers() -> None:
    assert (CONNECT_TIMEOUT_S, READ_TIMEOUT_S) == (5.0, 60.0)
    answers = {
        "/api/projects/1": httpx.Response(200, text="<html>login</html>"),
        "/api/projects/2": httpx.Response(500, text="boom " * 100),
        "/api/projects/3": httpx.Response(302, headers={"location": "/user/login/"}),
        "/api/projects/4": httpx.Response(200, json=[1, 2]),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["connect"] == CONNECT_TIMEOUT_S
        assert request.extensions["timeout"]["read"] == READ_TIMEOUT_S
        if request.url.path == "/api/projects/5":
            raise httpx.ReadTimeout("slow", request=request)
        return answers[request.url.path]

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with StudioClient.from_settings(settings("http://ls.test/", "k" * 40), client=http) as client:
        with pytest.raises(StudioResponseError, match="not JSON"):
            client.project(1)
        with pytest.raises(StudioResponseError) as info:
            client.project(2)
        assert "HTTP 500" in info.value.message and "boom" in info.value.message
        assert len(info.value.message) < 350  # the body is cut at 200 characters
        with pytest.raises(StudioResponseError, match="/user/login/"):
            client.project(3)
        with pytest.raises(StudioResponseError, match="expected a dict"):
            client.project(4)
        with pytest.raises(StudioError, match=r"ls\.test did not answer"):
            client.project(5)


@pytest.mark.parametrize("bad", ["../1", "", "abc", -1, True, "1/export", "٣"])
def test_project_ids_are_checked(bad: object) -> None:
    with pytest.raises(BadRequest):
        project_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"), [(4, "4"), ("4", "4"), ("4.1700000000", "4"), (" 07 ", "7")]
)
def test_project_ids_in_every_form_label_studio_sends(given: int | str, expected: str) -> None:
    assert project_id(given) == expected


@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_connect_plugin_authenticates_with_either_token(fake: FakeStudio, kind: str) -> None:
    studio = StudioClient(fake.url, fake.legacy_token if kind == "legacy" else fake.pat)
    before = len(fake.requests)
    assert studio.call("GET", "/api/current-user/whoami")["id"] == 1
    assert studio.call("GET", "/api/projects/1")["title"] == "cars"
    sent = [(r.path, r.auth) for r in fake.requests[before:]]
    if kind == "legacy":
        assert sent == [("/api/current-user/whoami", "legacy"), ("/api/projects/1", "legacy")]
    else:  # the PAT is exchanged once, and the access token reused
        assert sent == [
            ("/api/token/refresh", "none"),
            ("/api/current-user/whoami", "bearer"),
            ("/api/projects/1", "bearer"),
        ]
    fake.expire_access_tokens()
    assert studio.call("GET", "/api/current-user/whoami")["id"] == 1  # PAT: refreshed once


def test_connect_plugin_says_which_token_was_refused(fake: FakeStudio) -> None:
    revoked = make_jwt({"token_type": "refresh", "jti": "revoked", "user_id": 1})
    with pytest.raises(StudioAuthError, match="check LABEL_STUDIO_API_KEY") as info:
        StudioClient(fake.url, revoked).call("GET", "/api/current-user/whoami")
    assert "personal access token" in str(info.value)
    with pytest.raises(
        StudioAuthError,
        match=r"refused the API token \(HTTP 401 for GET /api/current-user/whoami\)",
    ):
        StudioClient(fake.url, "0" * 40).call("GET", "/api/current-user/whoami")
    with pytest.raises(StudioError, match="LABEL_STUDIO_URL"):
        StudioClient("localhost:8080", fake.legacy_token)


def test_fake_serves_uploads_only_with_a_token(fake: FakeStudio) -> None:
    path = "/data/upload/1/img0.png"
    assert httpx.get(fake.url + path).status_code == 401
    answer = httpx.get(fake.url + path, headers={"Authorization": f"Token {fake.legacy_token}"})
    assert answer.status_code == 200 and answer.content == b"png"
    assert httpx.get(fake.url + "/health").json() == {"status": "UP"}
    assert fake.requests[-1].auth == "none"


def test_expired_access_token_is_refreshed(fake: FakeStudio) -> None:
    with StudioClient.from_settings(settings(fake.url, fake.pat)) as client:
        client.whoami()
        fake.expire_access_tokens()  # revoked or expired early: one 401, one refresh, one retry
        before = len(fake.requests)
        assert client.whoami()["id"] == 1
    sent = [(r.path, r.auth) for r in fake.requests[before:]]
    assert sent == [
        ("/api/current-user/whoami", "invalid"),
        ("/api/token/refresh", "none"),
        ("/api/current-user/whoami", "bearer"),
    ]
