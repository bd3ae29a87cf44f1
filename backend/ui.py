"""The curators' page: ``GET /ui/{project}``, server-rendered, behind the backend's auth.

It shows a project's live version and every other one with its held-out metrics,
training-set size, parent and age, each version's loss curves, and the project's training
and bulk-prediction jobs (waiting, running with stage, step and ETA, failed with the
reason). Its buttons post forms that go through the same code as the CLI: making a version
live or rolling back to the base (``ls-sahi rollback``), training now (``ls-sahi train``),
predicting every task (``ls-sahi predict-project``). No front-end build: HTML, a little CSS,
and a refresh every few seconds while a job runs.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from label_studio_sahi import names
from label_studio_sahi.errors import BadRequest, NotFound
from label_studio_sahi.queueing import job_state
from label_studio_sahi.registry import Version, VersionNotFound
from label_studio_sahi.service import Service
from label_studio_sahi.studio import project_id

router = APIRouter()

REFRESH_SECONDS = 5  # while a job waits or runs
NEEDS_REDIS = "the curators' page needs Redis (versions, live pointers and jobs live there)"

STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
tr.live{background:#e8f5e9;font-weight:600}.muted{color:#888}form{display:inline}
button{padding:3px 10px;cursor:pointer}.job{padding:6px 10px;background:#f5f5f5;margin:4px 0}
img{max-width:420px;border:1px solid #ddd;margin:4px}
"""


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    if service.redis is None:
        raise BadRequest(NEEDS_REDIS)
    return service


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


def _version_row(project: str, version: Version, live: str | None) -> str:
    candidate = (version.meta.get(names.META_METRICS) or {}).get("candidate") or {}
    dataset = version.meta.get("dataset") or {}
    is_live = version.name == live
    action = (
        '<span class="muted">live</span>'
        if is_live
        else f'<form method="post" action="/ui/{project}/live"><input type="hidden" '
        f'name="version" value="{html.escape(version.name)}"><button>make live</button></form>'
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
    for key in ("stage", "step", "steps", "loss", "eta_seconds", "done", "total", "failed"):
        if state.get(key) is not None:
            parts.append(f"{key} {html.escape(str(state[key]))}")
    if status == "failed" and state.get("error"):
        parts.append(f"reason: {html.escape(str(state['error']))}")
    return f'<div class="job" data-job="{kind}">{" · ".join(parts)}</div>'


def render(service: Service, project: str) -> str:
    registry = service.registry
    live = registry.live(project)
    versions = sorted(registry.versions(project), key=lambda v: v.number, reverse=True)
    assert service.redis is not None
    jobs = {
        "training": job_state(service.redis, names.train_job_id(project)),
        "bulk prediction": job_state(service.redis, names.bulk_job_id(project)),
    }
    busy = any(
        j.get("status") in ("queued", "started", "deferred", "scheduled") for j in jobs.values()
    )
    head = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if busy else ""
    base_button = (
        '<span class="muted">(live)</span>'
        if live is None
        else f'<form method="post" action="/ui/{project}/live"><input type="hidden" name="version" '
        'value="base"><button>roll back to base</button></form>'
    )
    rows = "".join(_version_row(project, v, live) for v in versions)
    curves = "".join(
        f'<figure><img src="/ui/{project}/{html.escape(v.name)}/{names.CURVES_FILE}" alt="loss curves of '
        f'{html.escape(v.name)}"><figcaption>{html.escape(v.name)}</figcaption></figure>'
        for v in versions[:4]
        if (v.path / names.CURVES_FILE).is_file()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">{head}
<title>label-studio-sahi · project {project}</title><style>{STYLE}</style></head><body>
<h1>Project {project}</h1>
<p>Live: <b id="live">{html.escape(live or "base")}</b> · base models
<code>{html.escape(service.base_version)}</code> {base_button}</p>
<h2>Versions</h2>
<table><tr><th>version</th><th>model version</th><th>status</th><th>mAP</th><th>mAP@.5</th>
<th>mAP small</th><th>training tasks</th><th>parent</th><th>age</th><th></th></tr>{rows}</table>
<h2>Jobs</h2>{"".join(_job_line(k, s) for k, s in jobs.items())}
<form method="post" action="/ui/{project}/train"><button>train now</button></form>
<form method="post" action="/ui/{project}/bulk-predict"><button>predict every task</button></form>
<h2>Loss curves</h2>{curves or '<p class="muted">none yet</p>'}
</body></html>"""


@router.get("/ui/{project}", response_class=HTMLResponse)
async def page(request: Request, project: str) -> HTMLResponse:
    service, pid = _service(request), project_id(project)
    return HTMLResponse(await anyio.to_thread.run_sync(render, service, pid))


@router.get(f"/ui/{{project}}/{{version}}/{names.CURVES_FILE}")
async def curves(request: Request, project: str, version: str) -> FileResponse:
    try:
        found = _service(request).registry.get(project_id(project), version)
    except VersionNotFound:
        raise NotFound(f"project {project} has no version {version}") from None
    path = found.path / names.CURVES_FILE
    if not path.is_file():
        raise NotFound(f"version {version} has no loss curves")
    return FileResponse(path, media_type="image/png")


@router.post("/ui/{project}/live")
async def make_live(request: Request, project: str) -> RedirectResponse:
    """Promote or roll back, as ``ls-sahi rollback`` does; this process swaps at once."""
    service, pid = _service(request), project_id(project)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    version = (form.get("version") or [""])[0]
    if not version:
        raise BadRequest("the form has no version")

    def move() -> None:
        target = None if version in ("base", "none") else service.registry.get(pid, version).name
        service.registry.set_live(pid, target)
        service.refresh(pid)

    try:
        await anyio.to_thread.run_sync(move)
    except VersionNotFound:
        raise NotFound(f"project {project} has no version {version}") from None
    return RedirectResponse(f"/ui/{pid}", status_code=303)


@router.post("/ui/{project}/train")
async def train(request: Request, project: str) -> RedirectResponse:
    """Queue fine-tuning now, as ``ls-sahi train`` does."""
    from label_studio_sahi.trigger import TrainingTrigger

    service, pid = _service(request), project_id(project)
    assert service.redis is not None
    trigger = TrainingTrigger(service.redis, service.settings)
    await anyio.to_thread.run_sync(lambda: trigger.enqueue(pid, reason="curators' page", delay=0))
    return RedirectResponse(f"/ui/{pid}", status_code=303)


@router.post("/ui/{project}/bulk-predict")
async def bulk_predict(request: Request, project: str) -> RedirectResponse:
    """Queue predictions of every task, as ``ls-sahi predict-project`` does."""
    from label_studio_sahi.bulk_predict import enqueue_bulk

    service, pid = _service(request), project_id(project)
    assert service.redis is not None
    client = service.redis
    await anyio.to_thread.run_sync(lambda: enqueue_bulk(client, service.settings, pid))
    return RedirectResponse(f"/ui/{pid}", status_code=303)
