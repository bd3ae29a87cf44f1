"""The curators' page: ``GET /ui/{project}``, server-rendered, behind the backend's auth.

It shows a project's live version and every other one with its held-out metrics,
training-set size, parent and age, a plot of the metrics per version, each version's loss
curves, the project's training and bulk-prediction jobs (waiting, running with stage, step
and ETA, failed with the reason), and a preview of one task: its image with the slice grid
and the boxes of any two versions side by side, predicted as ``/predict`` would. Its buttons post forms that go through the same code as the CLI: making a version
live or rolling back to the base (``ls-sahi rollback``), training now (``ls-sahi train``),
predicting every task (``ls-sahi predict-project``). No front-end build: HTML, a little CSS,
and a refresh every few seconds while a job runs.

Under browser_guard.py's rules: its forms carry the project's form token and its POST routes
refuse a form without it; rolling back and predicting every task ask for a confirmation
(one inline script, allowed by its hash in the page's CSP, as the inline style is); its
image and model work (previews, the metrics plot) and its other work (the page, its
buttons) each run in threads of their own under THREADS and MAX_WAITING_REQUESTS, and a
preview's image counts against MAX_REQUEST_PIXELS as /predict's do.
"""

from __future__ import annotations

import base64
import hashlib
import html
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from tqdm import tqdm

from label_studio_sahi import names
from label_studio_sahi.errors import BadRequest, NotFound
from label_studio_sahi.jobs.bulk import job_progress
from label_studio_sahi.jobs.queueing import job_state
from label_studio_sahi.labelstudio.client import StudioClient, project_id
from label_studio_sahi.labelstudio.label_config import LabelConfig, parse_label_config
from label_studio_sahi.serving import browser_guard, page_images
from label_studio_sahi.serving.admission import Admission
from label_studio_sahi.serving.browser_guard import FORM_TOKEN_FIELD, FormTokens
from label_studio_sahi.serving.pipeline import Predictor, RequestImages
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle, load_version_bundle
from label_studio_sahi.versions.registry import Version, VersionNotFound

router = APIRouter()

format_interval = tqdm.format_interval  # an ETA as hours:minutes:seconds
REFRESH_SECONDS = 5  # while a job waits or runs
PREVIEW_MODELS = 2  # versions other than the live one kept loaded for previews
METRICS_PLOT = "metrics.png"
PREVIEW_IMAGE = "preview.png"
NEEDS_REDIS = "the curators' page needs Redis (versions, live pointers and jobs live there)"

STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
tr.live{background:#e8f5e9;font-weight:600}.muted{color:#888}form{display:inline}
button{padding:3px 10px;cursor:pointer}.job{padding:6px 10px;background:#f5f5f5;margin:4px 0}
img{max-width:420px;border:1px solid #ddd;margin:4px}
.previews,.row{display:flex;flex-wrap:wrap;gap:8px}.previews img{max-width:48vw}
"""
# What the confirmation dialogs ask (project ids are digits: nothing to escape).
ROLLBACK_CONFIRM = "Roll project {project} back to the base models? /predict serves them at once."
BULK_CONFIRM = "Predict every task of project {project} with the live version?"
# The page's one script: a form with data-confirm (roll back, predict every task) is sent
# only once the curator says yes.
SCRIPT = """
document.addEventListener("submit", function (event) {
  var ask = event.target.getAttribute("data-confirm");
  if (ask && !window.confirm(ask)) { event.preventDefault(); }
});
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only the page's own resources: its images, its one style and script (by hash, never
# 'unsafe-inline'), forms to itself; never framed (its buttons act on one click).
PAGE_CSP = (
    f"default-src 'self'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "img-src 'self'; object-src 'none'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'"
)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    if service.redis is None:
        raise BadRequest(NEEDS_REDIS)
    return service


def _images(request: Request) -> Admission:
    admission: Admission = request.app.state.page_images
    return admission


def _work(request: Request) -> Admission:
    admission: Admission = request.app.state.page_work
    return admission


def _token_input(token: str) -> str:
    return f'<input type="hidden" name="{FORM_TOKEN_FIELD}" value="{html.escape(token)}">'


async def _form(request: Request, project: str) -> dict[str, str]:
    """The POSTed form, read under MAX_REQUEST_BYTES, once its token is checked."""
    limit = request.app.state.settings.max_request_bytes
    raw = await browser_guard.read_body(request, limit)
    form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
    tokens: FormTokens = request.app.state.form_tokens
    tokens.check(project, form.get(FORM_TOKEN_FIELD, ""))
    return form


def _metric(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def _age(created: str | None) -> str:
    if not created:
        return "-"
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(created)).total_seconds()
    except (TypeError, ValueError):
        return html.escape(str(created))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def _version_row(project: str, version: Version, live: str | None, token: str) -> str:
    candidate = version.held_out
    dataset = version.meta.get("dataset") or {}
    is_live = version.name == live
    action = (
        '<span class="muted">live</span>'
        if is_live
        else f'<form method="post" action="/ui/{project}/live">{_token_input(token)}<input '
        f'type="hidden" name="version" value="{html.escape(version.name)}"><button>make live'
        "</button></form>"
    )
    cells = [
        html.escape(version.name),
        html.escape(version.model_version),
        html.escape(str(version.status)),
        _metric(candidate.get("map")),
        _metric(candidate.get("map_50")),
        _metric(candidate.get("map_small")),
        html.escape(str(dataset.get("train_tasks", "-"))),
        html.escape(str(version.meta.get(names.META_PARENT) or "-")),
        _age(version.meta.get("created_at")),
        action,
    ]
    row = "".join(f"<td>{c}</td>" for c in cells)
    return f'<tr class="{"live" if is_live else ""}" data-version="{html.escape(version.name)}">{row}</tr>'


def _job_line(kind: str, state: dict[str, Any]) -> str:
    status = state.get("status", "none")
    if status == "none":
        return f'<div class="job">{kind}: none</div>'
    parts = [f"{kind}: <b>{html.escape(str(status))}</b>"]
    if state.get("stage"):
        parts.append(html.escape(str(state["stage"])))
    for count, of, word in (("step", "steps", "step"), ("done", "total", "tasks")):
        if state.get(count) is not None:
            parts.append(
                f"{word} {html.escape(str(state[count]))}/{html.escape(str(state.get(of, '?')))}"
            )
    if isinstance(state.get("loss"), int | float):
        parts.append(f"loss {state['loss']:.4g}")
    if isinstance(state.get("eta_seconds"), int | float):
        parts.append(f"ETA {format_interval(state['eta_seconds'])}")
    if state.get("failed"):
        parts.append(f"{html.escape(str(state['failed']))} failed")
    if status == "failed" and state.get("error"):
        parts.append(f"reason: {html.escape(str(state['error']))}")
    return f'<div class="job" data-job="{kind}">{" · ".join(parts)}</div>'


def _preview_section(project: str, names_: list[str], task: str, a: str, b: str) -> str:
    """The preview form (a task id, two versions) and, once a task is asked for, the two
    pictures side by side."""

    def select(field: str, chosen: str) -> str:
        options = "".join(
            f"<option{' selected' if n == chosen else ''}>{html.escape(n)}</option>" for n in names_
        )
        return f'<select name="{field}">{options}</select>'

    form = (
        f'<form method="get" action="/ui/{project}" id="preview-form">task '
        f'<input name="task" size="8" value="{html.escape(task)}"> {select("a", a)} vs '
        f"{select('b', b)} <button>preview</button></form>"
    )
    if not task:
        return form
    figures = "".join(
        f'<figure><img src="/ui/{project}/{PREVIEW_IMAGE}?'
        f'{html.escape(urlencode({"task": task, "version": v}))}" alt="task {html.escape(task)} '
        f'with the boxes of {html.escape(v)}" data-preview="{html.escape(v)}"></figure>'
        for v in (a, b)
    )
    return f'{form}<div class="previews">{figures}</div>'


def render(service: Service, project: str, token: str, query: dict[str, str] | None = None) -> str:
    """The page; ``token``: the project's form token, put in every form that acts."""
    query = query or {}
    registry = service.registry
    live = registry.live(project)
    versions = sorted(registry.versions(project), key=lambda v: v.number, reverse=True)
    assert service.redis is not None
    jobs = {
        "training": job_state(service.redis, names.train_job_id(project)),
        "bulk prediction": job_progress(service.redis, project),  # its chunks added up
    }
    busy = any(
        j.get("status") in ("queued", "started", "deferred", "scheduled") for j in jobs.values()
    )
    head = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if busy else ""
    base_button = (
        '<span class="muted">(live)</span>'
        if live is None
        else f'<form method="post" action="/ui/{project}/live" '
        f'data-confirm="{ROLLBACK_CONFIRM.format(project=project)}">'
        f'{_token_input(token)}<input type="hidden" name="version" value="base"><button>roll '
        "back to base</button></form>"
    )
    rows = "".join(_version_row(project, v, live, token) for v in versions)
    choices = ["live", "base", *(v.name for v in versions)]
    older = next((v.name for v in versions if v.name != live), "base")
    preview = _preview_section(
        project, choices, query.get("task", ""), query.get("a", "live"), query.get("b", older)
    )
    curves = "".join(
        f'<figure><img src="/ui/{project}/{html.escape(v.name)}/{names.CURVES_FILE}" alt="loss curves of '
        f'{html.escape(v.name)}"><figcaption>{html.escape(v.name)}</figcaption></figure>'
        for v in versions[:4]
        if registry.has_file(v, names.CURVES_FILE)
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">{head}
<title>label-studio-sahi · project {project}</title><style>{STYLE}</style>
<script>{SCRIPT}</script></head><body>
<h1>Project {project}</h1>
<p>Live: <b id="live">{html.escape(live or "base")}</b> · base models
<code>{html.escape(service.base_version)}</code> {base_button}</p>
<h2>Versions</h2>
<table><tr><th>version</th><th>model version</th><th>status</th><th>mAP</th><th>mAP@.5</th>
<th>mAP small</th><th>training tasks</th><th>parent</th><th>age</th><th></th></tr>{rows}</table>
<h2>Jobs</h2>{"".join(_job_line(k, s) for k, s in jobs.items())}
<form method="post" action="/ui/{project}/train">{_token_input(token)}<button>train now</button></form>
<form method="post" action="/ui/{project}/bulk-predict" data-confirm="{BULK_CONFIRM.format(project=project)}">
{_token_input(token)}<button>predict every task</button></form>
<h2>Metrics per version</h2><img src="/ui/{project}/{METRICS_PLOT}" alt="held-out metrics per version" id="metrics-plot">
<h2>Loss curves</h2><div class="row">{curves or '<p class="muted">none yet</p>'}</div>
<h2>Preview</h2><p class="muted">A task's image, its slice grid and the boxes two versions
suggest for it, as /predict would (live: what serves now).</p>{preview}
</body></html>"""


@router.get("/ui/{project}", response_class=HTMLResponse)
async def page(request: Request, project: str) -> HTMLResponse:
    service, pid = _service(request), project_id(project)
    query = {k: v for k, v in request.query_params.items() if k in ("task", "a", "b")}
    tokens: FormTokens = request.app.state.form_tokens
    token = tokens.token(pid)
    text = await _work(request).run(lambda: render(service, pid, token, query))
    return HTMLResponse(text, headers={"Content-Security-Policy": PAGE_CSP})


@router.get(f"/ui/{{project}}/{METRICS_PLOT}")
async def metrics_plot(request: Request, project: str) -> Response:
    service, pid = _service(request), project_id(project)

    def draw() -> bytes:
        return page_images.metrics_plot(service.registry.versions(pid), service.registry.live(pid))

    return Response(await _images(request).run(draw), media_type="image/png")


class PreviewModels:
    """Versions loaded for previews, the PREVIEW_MODELS most recently asked for (the live
    one and the base are the service's own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bundles: OrderedDict[str, ModelBundle] = OrderedDict()

    def bundle(self, service: Service, project: str, name: str) -> ModelBundle:
        if name == "live":
            return service.predictor_for(project).bundle
        if name == "base":
            return service.base.bundle
        try:
            version = service.registry.get(project, name)
        except VersionNotFound:
            raise NotFound(f"project {project} has no version {name}") from None
        with self._lock:
            found = self._bundles.get(version.model_version)
            if found is not None:
                self._bundles.move_to_end(version.model_version)
                return found
        # Boxes only: a version without its own classifier previews without one.
        local = service.registry.local(version)  # with MODEL_STORE: downloaded, verified
        loaded = load_version_bundle(local, lambda: None, service.settings)
        with self._lock:
            self._bundles[version.model_version] = loaded
            while len(self._bundles) > PREVIEW_MODELS:
                self._bundles.popitem(last=False)
        return loaded


def _preview_models(request: Request) -> PreviewModels:
    state = request.app.state
    if not hasattr(state, "preview_models"):
        state.preview_models = PreviewModels()
    models: PreviewModels = state.preview_models
    return models


def _task_config(service: Service, studio: StudioClient, project: str) -> LabelConfig:
    known = service.config_for(project)
    if known is not None and known.rectangles:
        return known
    return parse_label_config(str(studio.project(project).get("label_config") or ""))


@router.get(f"/ui/{{project}}/{PREVIEW_IMAGE}")
async def preview_image(request: Request, project: str) -> Response:
    """One task's image (fetched from Label Studio) with the slice grid and the boxes
    ``version`` (``live``, ``base`` or a version's name) suggests, as /predict would; the
    number of boxes in the ``X-Boxes`` header."""
    service, pid = _service(request), project_id(project)
    raw_task, name = (
        request.query_params.get("task", ""),
        request.query_params.get("version", "live"),
    )
    if not raw_task.isdigit():
        raise BadRequest(f"task must be a task id, got {raw_task!r}")
    models = _preview_models(request)

    def draw() -> tuple[bytes, int]:
        with StudioClient.from_settings(service.settings) as studio:
            task = studio.task(int(raw_task))
            if project_id(task.get("project", "")) != pid:
                raise NotFound(f"task {raw_task} is not in project {pid}")
            config = _task_config(service, studio, pid)
        if not config.rectangles:
            raise BadRequest(f"project {pid}'s labeling config has no RectangleLabels to preview")
        data = task.get("data") or {}
        key = next((k for k in config.image_keys if isinstance(data.get(k), str)), None)
        if key is None:
            raise BadRequest(f"task {raw_task} has no image under {list(config.image_keys)}")
        bundle = models.bundle(service, pid, name)
        predictor = Predictor(bundle, service.settings, service.base.load_image)
        # As /predict loads a request's images: within MAX_REQUEST_PIXELS.
        images = RequestImages(service.base.load_image, service.settings.max_request_pixels)
        try:
            pixels = images(data[key], int(raw_task))
            result = predictor.predict_image(pixels, config, key)
        finally:
            predictor.close()
        windows = predictor.slicing.windows(*pixels.shape[:2])
        boxes = [r for r in result if r.get("type") == "rectanglelabels"]
        labels = [label for tag in config.rectangles for label in tag.labels]
        caption = f"task {raw_task} · {name} ({bundle.version}) · {len(boxes)} boxes"
        return page_images.preview(pixels, boxes, windows, labels, caption), len(boxes)

    png, count = await _images(request).run(draw)
    return Response(png, media_type="image/png", headers={"X-Boxes": str(count)})


@router.get(f"/ui/{{project}}/{{version}}/{names.CURVES_FILE}")
async def curves(request: Request, project: str, version: str) -> Response:
    service, pid = _service(request), project_id(project)

    def read() -> bytes | None:
        # From this disk, or (MODEL_STORE) that one file from the store, checked.
        return service.registry.read_file(service.registry.get(pid, version), names.CURVES_FILE)

    try:
        data = await _work(request).run(read)
    except VersionNotFound:
        raise NotFound(f"project {project} has no version {version}") from None
    if data is None:
        raise NotFound(f"version {version} has no loss curves")
    return Response(data, media_type="image/png")


@router.post("/ui/{project}/live")
async def make_live(request: Request, project: str) -> RedirectResponse:
    """Promote or roll back, as ``ls-sahi rollback`` does; this process swaps at once."""
    service, pid = _service(request), project_id(project)
    version = (await _form(request, pid)).get("version", "")
    if not version:
        raise BadRequest("the form has no version")

    def move() -> None:
        target = None if version in ("base", "none") else service.registry.get(pid, version).name
        service.registry.set_live(pid, target)
        service.refresh(pid)

    try:
        await _work(request).run(move)
    except VersionNotFound:
        raise NotFound(f"project {project} has no version {version}") from None
    return RedirectResponse(f"/ui/{pid}", status_code=303)


@router.post("/ui/{project}/train")
async def train(request: Request, project: str) -> RedirectResponse:
    """Queue fine-tuning now, as ``ls-sahi train`` does."""
    from label_studio_sahi.jobs.trigger import TrainingTrigger

    service, pid = _service(request), project_id(project)
    assert service.redis is not None
    await _form(request, pid)
    trigger = TrainingTrigger(service.redis, service.settings)
    await _work(request).run(lambda: trigger.enqueue(pid, reason="curators' page", delay=0))
    return RedirectResponse(f"/ui/{pid}", status_code=303)


@router.post("/ui/{project}/bulk-predict")
async def bulk_predict(request: Request, project: str) -> RedirectResponse:
    """Queue predictions of every task, as ``ls-sahi predict-project`` does."""
    from label_studio_sahi.jobs.bulk import enqueue_bulk

    service, pid = _service(request), project_id(project)
    assert service.redis is not None
    client = service.redis
    await _form(request, pid)
    await _work(request).run(lambda: enqueue_bulk(client, service.settings, pid))
    return RedirectResponse(f"/ui/{pid}", status_code=303)
