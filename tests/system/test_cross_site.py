"""No page of another site can steer the backend, and the servers that call it still can.

A real headless Chromium opens a hostile page served by another web server (another port
on 127.0.0.1: same-site; ``localhost``: cross-site) that auto-submits every form of the
curators' page and posts ``text/plain`` JSON, which needs no CORS preflight, to the JSON
routes. The live version stays, no job is queued, every one of those requests was answered
403; the curators' own page still works in the same browser, its confirmation dialog
included. Over plain HTTP: ``text/plain`` and forms are refused by the JSON routes (415);
requests without ``Origin`` or ``Sec-Fetch-Site``, as Label Studio, curl and the CLI send
them, are served; the page's forms need their token.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.screenshot import CHROMIUM_ARGS, chromium
from labelled_project import CONFIG
from rq import Queue
from ui_backend import Backend, serving_page

from label_studio_sahi import names
from label_studio_sahi.jobs.queueing import job_state
from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.fake_studio import FakeStudio

FORM_ROUTES = ("live", "train", "bulk-predict")
ACTING_ROUTES = (
    *(f"/ui/{{project}}/{r}" for r in FORM_ROUTES), "/webhook", "/bulk-predict", "/predict",
    "/setup",
)  # fmt: skip


@pytest.fixture
def backend(
    bundle: ModelBundle, redis_url: str, detector_dir: Path, fake: FakeStudio, tmp_path: Path
) -> Iterator[Backend]:
    connect(redis_url).flushall()  # no job of an earlier test's project 1
    with serving_page(bundle, redis_url, detector_dir, fake, tmp_path) as running:
        yield running


def hostile_page(backend: Backend) -> str:
    """Forms of the curators' page (each into a frame of its own, so all of them go) and
    text/plain JSON posts; the title becomes "sent" once the posts are answered."""
    pid, url = backend.project, backend.url
    forms = [
        (f"/ui/{pid}/live", {"version": "v1"}),
        (f"/ui/{pid}/live", {"version": "base"}),
        (f"/ui/{pid}/train", {}),
        (f"/ui/{pid}/bulk-predict", {}),
    ]
    html = []
    for i, (action, fields) in enumerate(forms):
        inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
        html.append(
            f'<iframe name="f{i}" id="f{i}"></iframe>'
            f'<form method="post" action="{url}{action}" target="f{i}">{inputs}</form>'
        )
    posts = {
        "/webhook": {"action": "START_TRAINING", "project": {"id": int(pid)}},
        "/bulk-predict": {"project": pid, "only_missing": False},
        "/predict": predict_body(backend),
        "/setup": {"project": pid, "schema": CONFIG},
    }
    fetches = ",".join(
        f'fetch("{url}{route}", {{method: "POST", mode: "no-cors", credentials: "include", '
        f'headers: {{"Content-Type": "text/plain"}}, body: {json.dumps(json.dumps(body))}}})'
        for route, body in posts.items()
    )
    script = f"""
    document.querySelectorAll("form").forEach(f => f.submit());
    Promise.allSettled([{fetches}]).then(() => {{ document.title = "sent"; }});
    """
    return f"<!doctype html><title>waiting</title>{''.join(html)}<script>{script}</script>"


class HostileSite:
    """Another web server on 127.0.0.1 serving one HTML page."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def predict_body(backend: Backend) -> dict[str, Any]:
    return {
        "tasks": [{"id": backend.task, "data": {"image": backend.image_url}}],
        "label_config": CONFIG,
        "project": f"{backend.project}.1700000000",
    }


def answered(backend: Backend) -> dict[tuple[str, str], float]:
    """Requests the backend answered so far, by (route, status), from its own /metrics."""
    text = httpx.get(f"{backend.url}/metrics", timeout=30).text
    counts: dict[tuple[str, str], float] = {}
    for route, status, value in re.findall(
        r'^ls_sahi_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)$', text, re.M
    ):
        counts[(route, status)] = float(value)
    return counts


def refusals(backend: Backend, before: dict[tuple[str, str], float]) -> float:
    key = ("unmatched", "403")
    return answered(backend).get(key, 0) - before.get(key, 0)


def nothing_changed(backend: Backend) -> None:
    pid = backend.project
    assert backend.registry.live(pid) == "v2"
    for job_id in (names.train_job_id(pid), names.bulk_job_id(pid)):
        assert job_state(backend.redis, job_id)["status"] == "none", job_id
    for queue in (backend.settings.train_queue, backend.settings.predict_queue):
        queued = Queue(queue, connection=backend.redis)
        assert queued.count == 0 and queued.scheduled_job_registry.count == 0, queue


def test_a_page_of_another_site_cannot_act_but_the_curators_page_can(backend: Backend) -> None:
    from playwright.sync_api import sync_playwright

    pid = backend.project
    site = HostileSite(hostile_page(backend))
    before = answered(backend)
    try:
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            try:
                # Another port on the same address is "same-site"; localhost is another site.
                for origin in (f"http://127.0.0.1:{site.port}", f"http://localhost:{site.port}"):
                    hostile = browser.new_page()
                    hostile.goto(f"{origin}/")
                    hostile.wait_for_function("document.title === 'sent'", timeout=60_000)
                    hostile.close()
                # Two origins, 4 forms and 4 posts each: 16 refusals, answered before any
                # route runs (so the metrics' route is "unmatched"); no route ran at all.
                deadline = time.monotonic() + 60
                while refusals(backend, before) < 16:
                    assert time.monotonic() < deadline, refusals(backend, before)
                    time.sleep(0.2)
                now = answered(backend)
                ran = {k: v - before.get(k, 0) for k, v in now.items() if k[0] in ACTING_ROUTES}
                assert not any(ran.values()), ran
                assert refusals(backend, before) == 16
                nothing_changed(backend)

                # The curators' own page: a click still acts, after the confirmation.
                page = browser.new_page()
                violations: list[str] = []
                page.on(
                    "console",
                    lambda m: (
                        violations.append(m.text) if "Content Security Policy" in m.text else None
                    ),
                )
                answers: list[bool] = [False, True]  # dismiss the first dialog, accept the next
                page.on("dialog", lambda d: d.accept() if answers.pop(0) else d.dismiss())
                page.goto(f"{backend.url}/ui/{pid}")
                rollback = page.locator("form[data-confirm] button", has_text="roll back")
                rollback.click()
                assert page.inner_text("#live") == "v2"  # dismissed: nothing sent
                with page.expect_navigation():
                    rollback.click()
                assert page.inner_text("#live") == "base"
                with page.expect_navigation():
                    page.locator('tr[data-version="v1"] button').click()  # no dialog
                assert page.inner_text("#live") == "v1"
                assert not answers and not violations, violations
            finally:
                browser.close()
    finally:
        site.close()
    assert backend.registry.live(pid) == "v1"


def test_json_routes_take_only_json_bodies(backend: Backend) -> None:
    pid = backend.project
    bodies = {
        "/webhook": {"action": "START_TRAINING", "project": {"id": int(pid)}},
        "/bulk-predict": {"project": pid, "only_missing": False},
        "/predict": predict_body(backend),
        "/setup": {"project": pid, "schema": CONFIG},
    }
    for route, body in bodies.items():
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": kind} if kind else {}
            answer = httpx.post(
                f"{backend.url}{route}", content=json.dumps(body), headers=headers, timeout=60
            )
            assert answer.status_code == 415, (route, kind, answer.text)
            detail = answer.json()["detail"]
            assert answer.json()["error"] == "unsupported_media_type"
            assert "application/json" in detail and (kind or "without a type") in detail
    nothing_changed(backend)


def test_servers_without_origin_or_fetch_metadata_are_served(backend: Backend) -> None:
    """What Label Studio sends (``requests`` with ``json=``: no Origin, no Sec-Fetch-*)."""
    pid, url = backend.project, backend.url
    ls = {"User-Agent": "heartex/1.23.2"}
    setup = httpx.post(f"{url}/setup", json={"project": pid, "schema": CONFIG}, headers=ls)
    assert setup.status_code == 200, setup.text
    predict = httpx.post(f"{url}/predict", json=predict_body(backend), headers=ls, timeout=60)
    assert predict.status_code == 200 and predict.json()["results"][0]["result"], predict.text
    assert httpx.get(f"{url}/health", headers=ls).status_code == 200
    # Its own origin, or a same-origin fetch, is the page itself: served too.
    for same in ({"Origin": url}, {"Sec-Fetch-Site": "same-origin", "Origin": url}):
        answer = httpx.post(f"{url}/setup", json={"project": pid}, headers=same)
        assert answer.status_code == 200, (same, answer.text)
    webhook = {"action": "START_TRAINING", "project": {"id": int(pid)}}
    started = httpx.post(f"{url}/webhook", json=webhook, headers=ls, timeout=60)
    assert started.status_code == 201, started.text
    bulk = httpx.post(f"{url}/bulk-predict", json={"project": pid}, headers=ls, timeout=60)
    assert bulk.status_code == 202, bulk.text
    for job_id in (names.train_job_id(pid), names.bulk_job_id(pid)):
        assert job_state(backend.redis, job_id)["status"] != "none"


def test_a_state_change_from_another_origin_is_refused_naming_why(backend: Backend) -> None:
    url, pid = backend.url, backend.project
    foreign = {
        "Origin https://evil.example": {"Origin": "https://evil.example"},
        "Origin null": {"Origin": "null"},
        "Origin of another scheme": {"Origin": url.replace("http://", "https://")},
        "Origin of another port": {"Origin": "http://127.0.0.1:1"},
        "Sec-Fetch-Site cross-site": {"Sec-Fetch-Site": "cross-site"},
        "Sec-Fetch-Site same-site": {"Sec-Fetch-Site": "same-site"},
    }
    for why, headers in foreign.items():
        answer = httpx.post(f"{url}/setup", json={"project": pid}, headers=headers)
        assert answer.status_code == 403, (why, answer.text)
        error = answer.json()
        assert error["error"] == "forbidden" and error["status_code"] == 403
        assert next(iter(headers.values())) in error["detail"], (why, error)
    # A page of another site may link to the backend, not load its images.
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert httpx.get(f"{url}/ui/{pid}", headers=link).status_code == 200
    embed = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    image = httpx.get(f"{url}/ui/{pid}/preview.png", params={"task": backend.task}, headers=embed)
    assert image.status_code == 403 and "Sec-Fetch-Mode: no-cors" in image.json()["detail"]
    nothing_changed(backend)


def test_the_pages_forms_need_their_token(backend: Backend) -> None:
    url, pid = backend.url, backend.project
    page = httpx.get(f"{url}/ui/{pid}").text
    tokens = set(re.findall(r'name="token" value="([0-9a-f]+)"', page))
    assert len(tokens) == 1 and page.count('name="token"') == 4  # v1, base, train, predict
    (token,) = tokens
    for route in FORM_ROUTES:
        for form in ({"version": "v1"}, {"version": "v1", "token": "0" * 64}):
            refused = httpx.post(f"{url}/ui/{pid}/{route}", data=form)
            assert refused.status_code == 403 and "token" in refused.json()["detail"], refused.text
    nothing_changed(backend)
    moved = httpx.post(f"{url}/ui/{pid}/live", data={"version": "v1", "token": token})
    assert moved.status_code == 303 and backend.registry.live(pid) == "v1"
    # Another project's token is not this one's.
    other = httpx.get(f"{url}/ui/{int(pid) + 1}").text
    other_token = re.search(r'name="token" value="([0-9a-f]+)"', other)
    assert other_token is not None and other_token[1] != token
    refused = httpx.post(f"{url}/ui/{pid}/live", data={"version": "v2", "token": other_token[1]})
    assert refused.status_code == 403 and backend.registry.live(pid) == "v1"


def test_the_form_token_outlives_a_restart_and_is_shared_by_workers(backend: Backend) -> None:
    """Every process with the same MODEL_DIR accepts a page another one rendered."""
    from label_studio_sahi.serving.browser_guard import FORM_SECRET_FILE, FormTokens

    secret = backend.settings.model_dir / FORM_SECRET_FILE
    assert secret.stat().st_mode & 0o077 == 0  # the owner's only
    again = FormTokens.for_model_dir(backend.settings.model_dir)
    page = httpx.get(f"{backend.url}/ui/{backend.project}").text
    assert f'value="{again.token(backend.project)}"' in page
