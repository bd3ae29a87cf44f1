"""A small Label Studio stand-in: a real HTTP server on 127.0.0.1 with in-memory projects.

It speaks the parts of Label Studio's REST API the backend uses, in Label Studio's shapes
(checked against label-studio 1.23): projects, the JSON export, paged tasks, predictions,
uploaded files, ``whoami``, and both kinds of API token::

    with FakeStudio() as fake:
        pid = fake.add_project("<View>...</View>")
        url = fake.upload(pid, "a.png", png_bytes)
        tid = fake.add_task(pid, {"image": url})
        fake.add_annotation(tid, [{...}])
        settings = Settings(_env_file=None, label_studio_url=fake.url,
                            label_studio_api_key=fake.legacy_token)  # or fake.pat

``fake.requests`` logs every request (method, path, query, auth kind), ``fake.predictions``
holds posted predictions, and ``fake.count(...)`` / ``fake.export_calls`` count requests.
"""

from __future__ import annotations

import base64
import itertools
import json
import mimetypes
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ACCESS_LIFETIME_S = 300  # Label Studio's access tokens live 5 minutes


def make_jwt(payload: dict[str, Any]) -> str:
    """An unsigned-looking JWT with ``payload`` (Label Studio's client only reads claims)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: dict[str, str]
    auth: str  # "legacy", "bearer", "none" or "invalid"


class FakeStudio:
    """Label Studio on ``self.url`` while started (context manager, or ``start()``/``stop()``)."""

    def __init__(self) -> None:
        self.legacy_token = secrets.token_hex(20)
        self.pat = make_jwt({"token_type": "refresh", "jti": uuid.uuid4().hex, "user_id": 1})
        self.projects: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}  # each holds its annotations and predictions
        self.files: dict[str, bytes] = {}
        self.predictions: list[dict[str, Any]] = []
        self.requests: list[LoggedRequest] = []
        self.url = ""
        self.lock = threading.RLock()
        self._access: dict[str, float] = {}  # access token -> expiry (time.time())
        self._ids = {kind: itertools.count(1) for kind in ("project", "task", "ann", "pred")}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeStudio:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._httpd is not None and self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None

    def __enter__(self) -> FakeStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content ---------------------------------------------------------------------------

    def add_project(self, label_config: str, title: str = "proj", **fields: Any) -> int:
        """A project; ``fields`` override settings such as ``min_annotations_to_start_training``."""
        with self.lock:
            pid = next(self._ids["project"])
            self.projects[pid] = {
                "id": pid,
                "title": title,
                "label_config": label_config,
                "min_annotations_to_start_training": 0,
                "start_training_on_annotation_update": False,
                "evaluate_predictions_automatically": False,
                "model_version": "",
                "created_at": _now(),
                **fields,
            }
            return pid

    def add_task(self, project_id: int, data: dict[str, Any]) -> int:
        with self.lock:
            if project_id not in self.projects:
                raise KeyError(f"no project {project_id}")
            tid = next(self._ids["task"])
            self.tasks[tid] = dict(
                id=tid, project=project_id, data=data, annotations=[], predictions=[]
            )
            return tid

    def add_annotation(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        *,
        was_cancelled: bool = False,
        ground_truth: bool = False,
    ) -> int:
        with self.lock:
            aid = next(self._ids["ann"])
            ann = dict(id=aid, task=task_id, result=result, was_cancelled=was_cancelled)
            ann.update(
                ground_truth=ground_truth, completed_by=1, created_at=_now(), updated_at=_now()
            )
            self.tasks[task_id]["annotations"].append(ann)
            return aid

    def upload(self, project_id: int, name: str, content: bytes) -> str:
        """Store a file; returns its task-data URL ``/data/upload/<project>/<name>``."""
        path = f"/data/upload/{project_id}/{name}"
        with self.lock:
            self.files[path] = content
        return path

    def expire_access_tokens(self) -> None:
        """Make every issued access token invalid (a client must refresh on the next 401)."""
        with self.lock:
            self._access.clear()

    def count(self, path: str, method: str = "GET") -> int:
        """How many requests had this method and path (query string excluded)."""
        with self.lock:
            return sum(1 for r in self.requests if r.method == method and r.path == path)

    @property
    def export_calls(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.path.endswith("/export"))

    # --- request handling (called from the server threads) -----------------------------------

    def auth_kind(self, header: str | None) -> str:
        if not header:
            return "none"
        scheme, _, value = header.partition(" ")
        if scheme == "Token" and secrets.compare_digest(value, self.legacy_token):
            return "legacy"
        with self.lock:
            if scheme == "Bearer" and self._access.get(value, 0) > time.time():
                return "bearer"
        return "invalid"

    def handle(
        self, method: str, path: str, query: dict[str, str], body: Any, auth: str
    ) -> tuple[int, Any]:
        """``(status, JSON body or bytes)`` for one request."""
        if path == "/health":
            return 200, {"status": "UP"}
        if method == "POST" and path == "/api/token/refresh":
            return self._refresh(body)
        if auth == "none":
            return _error(401, "Authentication credentials were not provided.")
        if auth == "invalid":
            return _error(401, "Invalid token.")
        with self.lock:
            if path in self.files and method == "GET":
                return 200, self.files[path]
            if method == "GET" and path == "/api/current-user/whoami":
                return 200, {"id": 1, "email": "admin@example.com", "username": "admin"}
            if method == "POST" and path == "/api/predictions":
                return self._predict(body)
            if method == "GET" and path == "/api/tasks":
                return self._tasks(query)
            task = re.fullmatch(r"/api/tasks/(\d+)/?", path)
            if method == "GET" and task and int(task[1]) in self.tasks:
                return 200, _task(self.tasks[int(task[1])])
            match = re.fullmatch(r"/api/projects/(\d+)(/export)?", path)
            if method == "GET" and match and int(match[1]) in self.projects:
                pid = int(match[1])
                if not match[2]:
                    return 200, self.projects[pid]
                everything = query.get("download_all_tasks") == "true"
                return 200, [
                    _task(t) for t in self._project_tasks(pid) if everything or t["annotations"]
                ]
        return _error(404, "Not found.")

    def _refresh(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or body.get("refresh") != self.pat:
            return 401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
        now = int(time.time())
        access = make_jwt({"token_type": "access", "iat": now, "exp": now + ACCESS_LIFETIME_S})
        with self.lock:
            self._access[access] = now + ACCESS_LIFETIME_S
        return 200, {"access": access}

    def _project_tasks(self, pid: int) -> list[dict[str, Any]]:
        return [t for t in self.tasks.values() if t["project"] == pid]

    def _tasks(self, query: dict[str, str]) -> tuple[int, Any]:
        pid = int(query.get("project", "0") or 0)
        if pid not in self.projects:
            return _error(404, "Not found.")
        page, size = int(query.get("page", "1")), int(query.get("page_size", "100"))
        tasks = self._project_tasks(pid)
        chunk = tasks[(page - 1) * size : page * size]
        if page < 1 or (page > 1 and not chunk):
            return _error(404, "Invalid page.")
        return 200, {"tasks": [_task(t) for t in chunk], "total": len(tasks)}

    def _predict(self, body: Any) -> tuple[int, Any]:
        task = self.tasks.get(body.get("task")) if isinstance(body, dict) else None
        if task is None or not isinstance(body.get("result"), list):
            errors = {"task": ["Invalid pk - object does not exist."]}
            return _error(400, "Validation error", validation_errors=errors)
        prediction = {
            "id": next(self._ids["pred"]),
            "task": task["id"],
            "result": body["result"],
            "score": body.get("score"),
            "model_version": body.get("model_version", ""),
            "created_at": _now(),
        }
        self.predictions.append(prediction)
        task["predictions"].append(prediction)
        return 201, prediction


def _task(task: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(task))  # a snapshot, like a serializer would give


def _error(status: int, detail: str, **extra: Any) -> tuple[int, Any]:
    """An error answer shaped like Label Studio's."""
    return status, {"id": str(uuid.uuid4()), "status_code": status, "detail": detail, **extra}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStudio

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query))
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        auth = self.fake.auth_kind(self.headers.get("Authorization"))
        with self.fake.lock:
            self.fake.requests.append(LoggedRequest(method, parts.path, query, auth))
        status, payload = self.fake.handle(method, parts.path, query, body, auth)
        if isinstance(payload, bytes):
            kind = mimetypes.guess_type(parts.path)[0] or "application/octet-stream"
        else:
            payload, kind = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")
