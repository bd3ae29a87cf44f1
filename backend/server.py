"""HTTP routes of Label Studio's ML backend contract; thin: parsing, errors, metrics.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``,
``GET /versions``, ``GET /metrics``. Every error is JSON ``{"error", "detail",
"status_code"}`` with a 4xx/5xx status; one bad task never fails the batch.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from label_studio_sahi import __version__, metrics
from label_studio_sahi.bulk_predict import enqueue_bulk, job_progress
from label_studio_sahi.errors import BackendError, BadRequest, RequestTooLarge, Unauthorized
from label_studio_sahi.labeling import parse_label_config
from label_studio_sahi.redis_server import connect, ensure_redis
from label_studio_sahi.service import Service
from label_studio_sahi.settings import Settings, get_settings

log = logging.getLogger(__name__)

MODEL_CLASS = "SahiDetrBackend"
OPEN_ROUTES = {"/", "/health", "/metrics"}


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    label_config: str | None = None
    project: str | int | None = None
    params: dict[str, Any] = {}


class BulkRequest(BaseModel):
    project: int | str
    only_missing: bool = True  # skip tasks that already have a prediction of the live version


class SetupRequest(BaseModel):
    project: str | int | None = None
    schema_: str | None = None
    hostname: str | None = None
    extra_params: dict[str, Any] | None = None

    model_config = {"populate_by_name": True}

    @classmethod
    def parse(cls, body: Any) -> SetupRequest:
        if isinstance(body, dict) and "schema" in body:
            body = {**body, "schema_": body["schema"]}
        return cls.model_validate(body)


def project_id(value: str | int | None) -> str | None:
    """Label Studio sends ``"<id>.<created timestamp>"`` in /predict and ``<id>`` elsewhere."""
    if value is None or value == "":
        return None
    return str(value).split(".", 1)[0]


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over ``limit`` bytes before reading them whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(
            f"request body is {int(declared)} bytes, above MAX_REQUEST_BYTES={limit}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body is above MAX_REQUEST_BYTES={limit}")
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def _check_basic_auth(request: Request, settings: Settings) -> None:
    if not settings.basic_auth_user or request.url.path in OPEN_ROUTES:
        return
    expected = f"{settings.basic_auth_user}:{settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ''}"
    header = request.headers.get("authorization", "")
    given = ""
    if header.lower().startswith("basic "):
        try:
            given = base64.b64decode(header[6:]).decode()
        except ValueError:
            given = ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS are set)")


def create_app(settings: Settings | None = None, service: Service | None = None) -> FastAPI:
    """The ASGI app. Models load here, once per process, unless a ``service`` is given."""
    settings = settings or get_settings()
    if service is None:
        url, _ = ensure_redis(settings.redis_url, settings.model_dir)
        service = Service.from_settings(settings, connect(url))
    # Concurrent /predict requests per process; the rest wait (Label Studio retries nothing).
    limiter = anyio.CapacityLimiter(settings.threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.start()
        yield
        service.close()

    app = FastAPI(title="label-studio-sahi", version=__version__, lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        route = request.url.path
        start = time.perf_counter()
        try:
            _check_basic_auth(request, settings)
            response = await call_next(request)
        except BackendError as exc:
            response = JSONResponse(exc.to_json(), status_code=exc.status)
        elapsed = time.perf_counter() - start
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

    @app.exception_handler(BackendError)
    async def backend_error(_: Request, exc: BackendError) -> JSONResponse:
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(ValidationError)
    async def validation_error(_: Request, exc: ValidationError) -> JSONResponse:
        err = BadRequest(_validation_message(exc))
        return JSONResponse(err.to_json(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": "http_error", "detail": str(exc.detail), "status_code": exc.status_code},
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error type=%s", type(exc).__name__)
        return JSONResponse(
            {
                "error": "internal_error",
                "detail": f"{type(exc).__name__}: see the server log",
                "status_code": 500,
            },
            status_code=500,
        )

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": service.base_version}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body = SetupRequest.parse(await read_json(request, settings.max_request_bytes))
        project = project_id(body.project)
        if body.schema_:
            # Parse now so that an unusable config is reported when the backend is connected.
            service.remember_config(project, parse_label_config(body.schema_))
        return {"model_version": service.version_for(project)}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = PredictRequest.model_validate(await read_json(request, settings.max_request_bytes))
        if len(body.tasks) > settings.max_tasks_per_request:
            raise RequestTooLarge(
                f"{len(body.tasks)} tasks in one request, above MAX_TASKS_PER_REQUEST={settings.max_tasks_per_request}"
            )
        project = project_id(body.project)
        config = (
            parse_label_config(body.label_config)
            if body.label_config
            else service.config_for(project)
        )
        if config is None:
            raise BadRequest(
                "no label_config in the request and none known for this project (call /setup first)"
            )
        predictor = service.predictor_for(project)
        predictions = await anyio.to_thread.run_sync(
            predictor.predict_tasks, body.tasks, config, limiter=limiter
        )
        metrics.TASKS.inc(len(predictions))
        results = [p.to_json() for p in predictions]
        errors = [
            {"index": i, "task": task.get("id"), **(p.error.to_json())}
            for i, (task, p) in enumerate(zip(body.tasks, predictions, strict=True))
            if p.error is not None
        ]
        answer = {"results": results, "model_version": predictor.bundle.version, "errors": errors}
        failed = [p.error for p in predictions if p.error is not None]
        if failed and len(failed) == len(predictions):
            # Nothing could be predicted: say why with the first error's status. A batch
            # where some tasks worked is a 200, with the failures listed per task.
            return JSONResponse({**failed[0].to_json(), **answer}, status_code=failed[0].status)
        return JSONResponse(answer)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        body = await read_json(request, settings.max_request_bytes)
        action = body.get("action") if isinstance(body, dict) else None
        status, answer = service.on_webhook(body if isinstance(body, dict) else {})
        log.info("webhook action=%s answer=%s", action, answer.get("status"))
        return JSONResponse(answer, status_code=status)

    @app.post("/bulk-predict")
    async def bulk_predict(request: Request) -> JSONResponse:
        body = BulkRequest.model_validate(await read_json(request, settings.max_request_bytes))
        if service.redis is None:
            raise BadRequest("bulk predictions need Redis and a worker (REDIS_URL, ls-sahi worker)")
        job = enqueue_bulk(service.redis, settings, str(body.project), body.only_missing)
        return JSONResponse(
            {"job": job.id, "status": str(job.get_status(refresh=False))}, status_code=202
        )

    @app.get("/bulk-predict/{project}")
    async def bulk_progress(project: str) -> dict[str, Any]:
        if service.redis is None:
            raise BadRequest("bulk predictions need Redis and a worker (REDIS_URL, ls-sahi worker)")
        return job_progress(service.redis, project)

    @app.get("/versions")
    async def versions(project: str | None = None) -> dict[str, Any]:
        return {"versions": service.versions(project_id(project))}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
