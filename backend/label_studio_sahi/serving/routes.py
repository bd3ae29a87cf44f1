"""HTTP routes of Label Studio's ML backend contract; thin: parsing, errors, metrics.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``POST /bulk-predict``, ``GET /bulk-predict/{project}``, ``GET /versions``, ``GET /metrics``;
the curators' page, ``/ui/{project}``, is ``page.py``'s.
Every error is a :class:`BackendError` answered as JSON ``{"error", "detail", "status_code"}``
with a 4xx/5xx status; one bad task never fails the batch.

Route handlers are module-level functions on :data:`router`; they find the process's
:class:`Service`, settings and admission pool on ``request.app.state`` (set by
:func:`create_app`).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from label_studio_sahi import __version__, metrics
from label_studio_sahi.errors import (
    BackendError,
    BadRequest,
    Busy,
    HTTPError,
    InternalError,
    RequestTooLarge,
    Unauthorized,
)
from label_studio_sahi.jobs.bulk import enqueue_bulk, job_progress
from label_studio_sahi.jobs.redis_server import connect, ensure_redis
from label_studio_sahi.labelstudio.client import project_id
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving import browser_guard, page
from label_studio_sahi.serving.admission import Admission
from label_studio_sahi.serving.auth import Credentials, credentials
from label_studio_sahi.serving.http_limits import BODY_TIMED_OUT
from label_studio_sahi.serving.pipeline import TaskPrediction
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings, get_settings

log = logging.getLogger(__name__)

MODEL_CLASS = "SahiDetrBackend"
OPEN_ROUTES = {"/", "/health"}  # what Label Studio and probes call before any login
NEEDS_REDIS = "bulk predictions need Redis and a worker (REDIS_URL, ls-sahi worker)"

router = APIRouter()


# Project ids: strings or integers as sent, never coerced from booleans or floats; their
# form is checked by studio.project_id.
ProjectField = StrictStr | StrictInt


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    label_config: str | None = None
    project: ProjectField | None = None
    params: dict[str, Any] = {}


class BulkRequest(BaseModel):
    project: ProjectField
    only_missing: bool = True  # skip tasks that already have a prediction of the live version


class SetupRequest(BaseModel):
    project: ProjectField | None = None
    schema_: str | None = None
    hostname: str | None = None
    extra_params: dict[str, Any] | None = None

    model_config = {"populate_by_name": True}

    @classmethod
    def parse(cls, body: Any) -> SetupRequest:
        if isinstance(body, dict) and "schema" in body:
            body = {**body, "schema_": body["schema"]}
        return cls.model_validate(body)


# --------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """The ASGI app. Models load here, once per process, unless a ``service`` is given."""
    settings = settings or get_settings()
    if service is None:
        url, _ = ensure_redis(settings.redis_url, settings.model_dir)
        service = Service.from_settings(settings, connect(url))
    app = FastAPI(title="label-studio-sahi", version=__version__, lifespan=_lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.credentials = credentials(settings)
    app.state.redis_probe = _probe_client(service.redis)
    # Concurrent /predict requests per process; a few more wait, the rest get 503 at once.
    app.state.predict_admission = Admission(
        "/predict", settings.threads, settings.max_waiting_requests
    )
    # Allowed hosts, the page's form tokens and its own thread limits (browser_guard.py).
    browser_guard.install(app, settings)
    app.middleware("http")(_observe)
    app.exception_handler(BackendError)(_backend_error)
    app.exception_handler(ValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(redis.RedisError)(_redis_error)
    app.exception_handler(ClientDisconnect)(_client_gone)
    app.exception_handler(Exception)(_unexpected_error)
    app.include_router(router)
    app.include_router(page.router)  # the curators' page
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = app.state.service
    service.start()
    yield
    service.close()


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _optional_project(value: str | int | None) -> str | None:
    """A request's project id; ``None`` when it names none."""
    return None if value is None or value == "" else project_id(value)


# --------------------------------------------------------------------------- middleware


async def _observe(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Host, origin and basic auth, then the route; every request counted, timed and
    logged (never its body), every response with the security headers."""
    start = time.perf_counter()
    try:
        # Before basic auth: a rebound name or a page of another site gets no login prompt.
        browser_guard.check(request)
        _check_basic_auth(request)
        response = await call_next(request)
    except BackendError as exc:
        response = error_response(exc)
    browser_guard.secure_headers(response)
    elapsed = time.perf_counter() - start
    # The route's template (/bulk-predict/{project}), never the raw path: one series per
    # route, however many paths clients make up.
    matched = request.scope.get("route")
    route = getattr(matched, "path", None) or "unmatched"
    metrics.REQUESTS.labels(route=route, status=str(response.status_code)).inc()
    metrics.REQUEST_SECONDS.labels(route=route).observe(elapsed)
    log.info(
        "request method=%s route=%s status=%s seconds=%.3f",
        request.method,
        route,
        response.status_code,
        elapsed,
    )
    return response


def _check_basic_auth(request: Request) -> None:
    login: Credentials | None = request.app.state.credentials
    path = request.url.path
    if (
        login is None
        or path in OPEN_ROUTES
        or (path == "/metrics" and _settings(request).metrics_open)
    ):
        return
    header = request.headers.get("authorization", "")
    given = b""
    if header[:6].lower() == "basic ":
        try:
            given = base64.b64decode(header[6:], validate=True)
        except ValueError:
            given = b""
    expected = f"{login.user}:{login.password}".encode()
    if not secrets.compare_digest(given, expected):
        raise Unauthorized(
            "basic auth required: the login is BASIC_AUTH_USER / BASIC_AUTH_PASS, or the one "
            "generated in MODEL_DIR/auth.json (ls-sahi-connect gives it to Label Studio)"
        )


# --------------------------------------------------------------------------- errors


def error_response(exc: BackendError) -> JSONResponse:
    """The JSON answer for an error: ``{"error", "detail", "status_code"}`` with its status."""
    headers = dict(browser_guard.SECURITY_HEADERS)  # also on a 500, which skips _observe
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="label-studio-sahi"'
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(_: Request, exc: ValidationError) -> JSONResponse:
    return error_response(BadRequest(_validation_message(exc)))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Starlette's own: an unknown route (404), a wrong method (405).
    return error_response(HTTPError(str(exc.detail), status=exc.status_code))


async def _redis_error(_: Request, exc: redis.RedisError) -> JSONResponse:
    log.warning("redis_error type=%s", type(exc).__name__)
    return error_response(Busy(f"Redis is unavailable ({type(exc).__name__}); try again"))


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    # The client left mid-body, or took past BODY_DEADLINE (http_limits.py answered it 408):
    # nothing to log as a failure, and nobody to answer; the status is for the metrics.
    if request.scope.get(BODY_TIMED_OUT):
        log.info("request_timeout: the body did not arrive within BODY_DEADLINE")
        return Response(status_code=408)
    log.info("client_disconnected before its request body arrived")
    return Response(status_code=499)  # nginx's "client closed request"


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error type=%s", type(exc).__name__)
    return error_response(InternalError(f"{type(exc).__name__}: see the server log"))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


# --------------------------------------------------------------------------- body


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, sent as ``application/json`` (a page of another site cannot
    send that without a preflight), refusing bodies over ``limit`` bytes before reading them
    whole."""
    browser_guard.require_json(request)
    body = await browser_guard.read_body(request, limit)
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is JSON nested too deeply to read") from None


async def _body(request: Request) -> Any:
    return await read_json(request, _settings(request).max_request_bytes)


# --------------------------------------------------------------------------- routes


@router.get("/")
@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Up while it can predict (Label Studio's check); ``degraded`` names what it cannot do
    now: with Redis unreachable, predictions go on but training, hot swaps and bulk jobs wait;
    with the object store (MODEL_STORE) unreachable, the versions cached here serve and new
    ones wait."""
    service = _service(request)
    degraded = []
    if service.redis is not None and not await anyio.to_thread.run_sync(
        _redis_answers, service.redis
    ):
        degraded.append("redis")
    store = service.registry.store
    if store is not None and not await anyio.to_thread.run_sync(store.ping):
        degraded.append("store")  # serving from the versions cached on this disk
    answer = {"status": "UP", "model_class": MODEL_CLASS, "model_version": service.base_version}
    return {**answer, "degraded": degraded} if degraded else answer


def _probe_client(client: redis.Redis | None) -> redis.Redis | None:
    """A client of the same Redis that gives up after 2 s: /health must answer, whatever
    state Redis is in."""
    if client is None:
        return None
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    return redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


def _redis_answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


@router.post("/setup")
async def setup(request: Request) -> dict[str, Any]:
    body = SetupRequest.parse(await _body(request))
    service = _service(request)
    project = _optional_project(body.project)
    schema = body.schema_

    def remember() -> str:
        if schema:
            # Parse now so that an unusable config is reported when the backend is connected.
            service.remember_config(project, parse_label_config(schema), len(schema))
        return service.version_for(project)

    # Parsing a large config, or loading an unloaded project's model, takes time: never on
    # the event loop, which answers /health and every other request.
    return {"model_version": await anyio.to_thread.run_sync(remember)}


@router.post("/predict")
async def predict(request: Request) -> JSONResponse:
    body = PredictRequest.model_validate(await _body(request))
    service, settings = _service(request), _settings(request)
    if len(body.tasks) > settings.max_tasks_per_request:
        raise RequestTooLarge(
            f"{len(body.tasks)} tasks in one request, above MAX_TASKS_PER_REQUEST={settings.max_tasks_per_request}"
        )
    project = _optional_project(body.project)

    def run() -> tuple[list[TaskPrediction], str]:
        xml = body.label_config
        config = parse_label_config(xml) if xml else service.config_for(project)
        if config is None:
            raise BadRequest(
                "no label_config in the request and none known for this project (call /setup first)"
            )
        predictor = service.predictor_for(project)
        return predictor.predict_tasks(body.tasks, config), predictor.bundle.version

    admission: Admission = request.app.state.predict_admission
    predictions, version = await admission.run(run)
    metrics.TASKS.inc(len(predictions))
    return _predict_answer(body.tasks, predictions, version)


def _predict_answer(
    tasks: list[dict[str, Any]], predictions: list[TaskPrediction], version: str
) -> JSONResponse:
    """One result per task, the failed ones also listed in ``errors``.

    A batch where some tasks worked is a 200; when nothing could be predicted, the status
    (and the top-level error fields) are the first error's.
    """
    errors = [
        {"index": i, "task": task.get("id"), **p.error.to_json()}
        for i, (task, p) in enumerate(zip(tasks, predictions, strict=True))
        if p.error is not None
    ]
    answer = {
        "results": [p.to_json() for p in predictions],
        "model_version": version,
        "errors": errors,
    }
    failed = [p.error for p in predictions if p.error is not None]
    if failed and len(failed) == len(predictions):
        return JSONResponse({**failed[0].to_json(), **answer}, status_code=failed[0].status)
    return JSONResponse(answer)


@router.post("/webhook")
async def webhook(request: Request) -> JSONResponse:
    body = await _body(request)
    if not isinstance(body, dict):
        raise BadRequest(f"a webhook body is a JSON object, not {type(body).__name__}")
    event = body
    # Redis and its lock are blocking calls: off the event loop, which serves /health too.
    status, answer = await anyio.to_thread.run_sync(_service(request).on_webhook, event)
    log.info("webhook action=%s answer=%s", event.get("action"), answer.get("status"))
    return JSONResponse(answer, status_code=status)


@router.post("/bulk-predict")
async def bulk_predict(request: Request) -> JSONResponse:
    body = BulkRequest.model_validate(await _body(request))
    service = _service(request)
    if service.redis is None:
        raise BadRequest(NEEDS_REDIS)
    client, pid = service.redis, project_id(body.project)

    def enqueue() -> dict[str, Any]:
        job = enqueue_bulk(client, _settings(request), pid, body.only_missing)
        # The run's status, not its planner's: a reused run whose planner is done still runs.
        return {"job": job.id, "status": job_progress(client, pid)["status"]}

    return JSONResponse(await anyio.to_thread.run_sync(enqueue), status_code=202)


@router.get("/bulk-predict/{project}")
async def bulk_progress(request: Request, project: str) -> dict[str, Any]:
    service = _service(request)
    if service.redis is None:
        raise BadRequest(NEEDS_REDIS)
    return job_progress(service.redis, project_id(project))


@router.get("/versions")
async def versions(request: Request, project: str | None = None) -> dict[str, Any]:
    return {"versions": _service(request).versions(_optional_project(project))}


@router.get("/metrics")
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
