"""A small client for the parts of Label Studio's REST API that the backend uses.

Reads a project (its labeling config and training settings), exports its labelled tasks,
pages through tasks, and posts predictions. Authentication is :class:`LabelStudioAuth`
(legacy ``Token`` keys and personal access tokens exchanged for ``Bearer`` tokens).

Every failure becomes a :class:`StudioError` (a :class:`BackendError`) whose message says
what to check: the host that could not be reached, the setting that is missing, the
project that does not exist. The API key never appears in messages or logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from label_studio_sahi.errors import BackendError, BadRequest
from label_studio_sahi.labelstudio.tokens import LabelStudioAuth, TokenRefreshError
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

# Seconds to open a connection to Label Studio: it is usually close by, and a host that
# does not answer within this is down or misconfigured; failing fast says so sooner.
CONNECT_TIMEOUT_S = 5.0
# Seconds to wait for an answer (and between bytes of it): exporting a large project
# takes Label Studio a while to serialize, so this is generous.
READ_TIMEOUT_S = 60.0
TIMEOUT = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)

# How much of an unexpected error body goes into a message.
_BODY_SNIPPET = 200

_T = TypeVar("_T")


class StudioError(BackendError):
    """Label Studio cannot be used: not configured, not reachable, or it answered an error.

    ``upstream_status`` is the HTTP status Label Studio answered, if it answered at all.
    """

    status = 503
    code = "label_studio_unavailable"

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class StudioAuthError(StudioError):
    """Label Studio refused the API key (401/403, or the PAT could not be exchanged)."""

    status = 502
    code = "label_studio_token_refused"


class StudioNotFound(StudioError):
    """Label Studio has no such project or task (404)."""

    status = 404
    code = "label_studio_not_found"


class StudioResponseError(StudioError):
    """Label Studio answered an unexpected error status or something that is not JSON."""

    status = 502
    code = "label_studio_error"


MAX_PROJECT_ID_DIGITS = 18  # below 2**63: a Postgres bigint, as Label Studio stores ids


def project_id(value: int | str) -> str:
    """A Label Studio project id, normalised: the one place where project ids are parsed.

    Accepts an int, a numeric string, or the ``"<id>.<created timestamp>"`` form that Label
    Studio sends in ``/predict`` requests; returns the number as a string (``"4"``), safe as a
    path segment, a Redis key part and a folder name. Anything else is a :class:`BadRequest`.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(f"not a Label Studio project id: {str(value)[:40]!r}")
    head = str(value) if isinstance(value, int) else value.strip().split(".", 1)[0]
    # Label Studio's ids are positive 64-bit integers: anything longer is not one of them.
    if not head.isascii() or not head.isdigit() or len(head) > MAX_PROJECT_ID_DIGITS:
        raise BadRequest(f"not a Label Studio project id: {str(value)[:40]!r}")
    return str(int(head))


class StudioClient:
    """The one Label Studio REST client: the backend's jobs and pages, and project wiring
    (``ls-sahi-connect``); ``from_settings`` reads ``LABEL_STUDIO_URL`` and
    ``LABEL_STUDIO_API_KEY``.

    ``client`` is for tests or for sharing a connection pool; by default the client owns an
    ``httpx.Client`` and closes it in :meth:`close`. An injected client is left open. The
    token is attached per request and only to Label Studio's own origin.
    """

    def __init__(self, url: str, api_key: str, client: httpx.Client | None = None) -> None:
        url = url.strip().rstrip("/")
        if not url:
            raise StudioError(
                "Label Studio's URL is not configured: set LABEL_STUDIO_URL "
                "(for example http://localhost:8080)"
            )
        key = api_key.strip()
        if not key:
            raise StudioError(
                "no Label Studio API key is configured: set LABEL_STUDIO_API_KEY to a legacy "
                "token or a personal access token (Label Studio: Account & Settings)"
            )
        if urlsplit(url).scheme not in ("http", "https"):
            raise StudioError(
                f"LABEL_STUDIO_URL must start with http:// or https://, like "
                f"http://localhost:8080 (got {_host_of(url) or 'no host'})"
            )
        try:
            self._auth = LabelStudioAuth(key, url)
        except ValueError:
            raise StudioError(
                "LABEL_STUDIO_URL must be an absolute URL like http://localhost:8080"
            ) from None
        self._url = url
        self._key = key
        self._host = _host_of(url)
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=TIMEOUT, follow_redirects=False)

    @classmethod
    def from_settings(cls, settings: Settings, client: httpx.Client | None = None) -> StudioClient:
        """The client for ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``."""
        secret = settings.label_studio_api_key
        key = secret.get_secret_value() if secret is not None else ""
        return cls(settings.label_studio_url or "", key, client)

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> StudioClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:  # never show the token
        return f"StudioClient(host={self._host!r}, token={self._auth.kind})"

    @property
    def url(self) -> str:
        """Label Studio's base URL (``LABEL_STUDIO_URL`` without a trailing slash)."""
        return self._url

    @property
    def token_kind(self) -> str:
        """``"legacy"`` or ``"pat"``: which kind of API key is configured."""
        return self._auth.kind

    # --- API --------------------------------------------------------------------------------

    def project(self, project: int | str) -> dict[str, Any]:
        """The project: ``title``, ``label_config``, ``min_annotations_to_start_training``,
        ``start_training_on_annotation_update``, ``model_version``... (GET /api/projects/{id})."""
        key = project_id(project)
        data = self._request("GET", f"/api/projects/{key}", what=f"project {key}")
        return _expect(data, dict, f"project {key}")

    def task(self, task_id: int) -> dict[str, Any]:
        """One task: ``id``, ``project``, ``data``... (GET /api/tasks/{id}/)."""
        data = self._request("GET", f"/api/tasks/{int(task_id)}/", what=f"task {task_id}")
        return _expect(data, dict, f"task {task_id}")

    def export(self, project: int | str, *, all_tasks: bool = False) -> list[dict[str, Any]]:
        """The project's tasks in Label Studio's JSON export format.

        Each task has ``id``, ``data``, ``annotations`` (``id``, ``result``, ``was_cancelled``,
        ``ground_truth``, ``updated_at``...) and ``predictions``. Only tasks with annotations
        unless ``all_tasks`` (``download_all_tasks=true``).
        """
        key = project_id(project)
        params = {"exportType": "JSON"}
        if all_tasks:
            params["download_all_tasks"] = "true"
        data = self._request(
            "GET", f"/api/projects/{key}/export", params=params, what=f"project {key}"
        )
        return _expect(data, list, f"the export of project {key}")

    def iter_tasks(self, project: int | str, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of the project, with annotations and predictions, page by page.

        Label Studio answers ``{"tasks": [...], "total": N}`` or a plain list, depending on
        its version; both are handled. Stops at an empty page, after ``total`` tasks, or at
        a 404 for a page past the end (a 404 for the first page: the project does not exist).
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        key = project_id(project)
        seen = 0
        page = 1
        while True:
            params = {
                "project": key,
                "fields": "all",
                "page": str(page),
                "page_size": str(page_size),
            }
            try:
                data = self._request("GET", "/api/tasks", params=params, what=f"project {key}")
            except StudioNotFound:
                if page == 1:
                    raise
                return  # asked for the page after the last one
            total: int | None = None
            if isinstance(data, dict):
                tasks = data.get("tasks")
                raw_total = data.get("total")
                if isinstance(raw_total, int) and not isinstance(raw_total, bool):
                    total = raw_total
            else:
                tasks = data
            tasks = _expect(tasks, list, f"the tasks of project {key} (page {page})")
            if not tasks:
                return
            yield from tasks
            seen += len(tasks)
            if total is not None and seen >= total:
                return
            page += 1

    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> dict[str, Any]:
        """Store a prediction for a task (POST /api/predictions); returns the created record."""
        payload = {
            "task": int(task_id),
            "result": result,
            "score": float(score),
            "model_version": model_version,
        }
        data = self._request("POST", "/api/predictions", json=payload, what=f"task {task_id}")
        return _expect(data, dict, f"the prediction for task {task_id}")

    def whoami(self) -> dict[str, Any]:
        """The user the API key belongs to (GET /api/current-user/whoami): a cheap token check."""
        data = self._request("GET", "/api/current-user/whoami", what="the current user")
        return _expect(data, dict, "the current user")

    # --- any endpoint (project wiring) ------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        what: str = "such resource",
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        """``method path`` (its query ``params``, its JSON body ``json``): the JSON answer, or
        ``None`` for an empty one. ``what`` names the thing in a 404's message."""
        query = _query(params) if params else None
        return self._request(method, path, what=what, params=query, json=json)

    def items(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """A list endpoint's items, whether Label Studio pages it or not."""
        body = self._request("GET", path, what="such list", params=_query(params))
        return list(body["results"] if isinstance(body, dict) and "results" in body else body)

    # --- plumbing -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: dict[str, str] | None = None,
        json: Any = None,
    ) -> Any:
        """Send one request to Label Studio and return its JSON, or raise a StudioError."""
        where = f"{method} {path}"
        try:
            response = self._client.request(
                method,
                self._url + path,
                params=params,
                json=json,
                auth=self._auth,
                timeout=TIMEOUT,
            )
        except TokenRefreshError as exc:
            raise StudioAuthError(
                f"{exc} (Label Studio at {self._host}); check LABEL_STUDIO_API_KEY "
                "(a legacy token or a personal access token)",
                upstream_status=exc.response.status_code,
            ) from None
        except httpx.ConnectTimeout:
            raise StudioError(
                f"timed out connecting to Label Studio at {self._host} after "
                f"{CONNECT_TIMEOUT_S:g} s: is LABEL_STUDIO_URL right and Label Studio running?"
            ) from None
        except httpx.TimeoutException:
            raise StudioError(
                f"Label Studio at {self._host} did not answer {where} within {READ_TIMEOUT_S:g} s"
            ) from None
        except httpx.ConnectError:
            raise StudioError(
                f"cannot connect to Label Studio at {self._host}: "
                "is LABEL_STUDIO_URL right and Label Studio running?"
            ) from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            raise StudioError(
                "LABEL_STUDIO_URL is not a valid URL (expected something like http://localhost:8080)"
            ) from None
        except httpx.HTTPError as exc:
            raise StudioError(
                f"lost the connection to Label Studio at {self._host} during {where} "
                f"({type(exc).__name__})"
            ) from None
        log.debug("Label Studio %s -> HTTP %d", where, response.status_code)
        self._check_status(response, where, what)
        if not response.content:  # 204 No Content, or an empty 200 to a PATCH
            return None
        try:
            return response.json()
        except ValueError:
            raise StudioResponseError(
                f"Label Studio at {self._host} answered {where} with something that is not "
                f"JSON: {self._snippet(response)!r}; is LABEL_STUDIO_URL Label Studio's URL?",
                upstream_status=response.status_code,
            ) from None

    def _check_status(self, response: httpx.Response, where: str, what: str) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        if code in (401, 403):
            hint = ""
            if self._auth.kind == "legacy" and code == 401:
                hint = "; legacy tokens work only where Label Studio has them enabled"
            raise StudioAuthError(
                f"Label Studio at {self._host} refused the API token (HTTP {code} for {where}): "
                "check LABEL_STUDIO_API_KEY (a legacy token or a personal access token of a "
                f"user with access to the project{hint})",
                upstream_status=code,
            )
        if code == 404:
            raise StudioNotFound(
                f"Label Studio at {self._host} has no {what} ({where} answered 404)",
                upstream_status=code,
            )
        detail = self._snippet(response)
        if 300 <= code < 400:
            detail = f"redirect to {response.headers.get('location', '?')}"
        raise StudioResponseError(
            f"Label Studio at {self._host} answered {where} with HTTP {code}: {detail}",
            upstream_status=code,
        )

    def _snippet(self, response: httpx.Response) -> str:
        text = response.text[:_BODY_SNIPPET]
        return text.replace(self._key, "**********") if self._key in text else text


def _query(params: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in params.items()}


def _host_of(url: str) -> str:
    """``host[:port]`` of a URL, without any user:password part."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


def _expect(data: Any, kind: type[_T], what: str) -> _T:
    if not isinstance(data, kind):
        raise StudioResponseError(
            f"Label Studio answered {what} with a JSON {type(data).__name__}, "
            f"expected a {kind.__name__}"
        )
    return data
