"""``ls-sahi-connect``: wire a Label Studio project to the backend in one command.

    LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=... \\
        ls-sahi-connect --title "Aerial cars" --template boxes --backend http://localhost:9090

It creates the project (or updates the one named by ``--project`` / ``--title``) with a
labeling-config template (or keeps the project's own config), connects the backend as the
project's ML backend with auto-update on, makes sure the backend's webhook exists, and
turns predictions on for pre-labelling. Every step first reads what is there and changes
only what differs, so a second run changes nothing. It prints what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

# The pieces of the backend the plugin uses: its Label Studio client (both kinds of token),
# and the backend's own login (to hand to Label Studio).
from label_studio_sahi.labelstudio.client import StudioClient, StudioError
from label_studio_sahi.serving.auth import Credentials, stored_login
from label_studio_sahi.settings import Settings

TEMPLATES = {"boxes": "boxes.xml", "boxes-scenes": "boxes_and_scenes.xml", "classes": "classes.xml"}
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Project settings that make Label Studio use the backend's predictions for pre-labelling.
PREDICTION_SETTINGS = {"show_collab_predictions": True, "evaluate_predictions_automatically": True}


class ConnectError(Exception):
    """Something the user must fix; the message says what."""


def template(name: str) -> str:
    return (resources.files("label_studio_sahi_plugin") / "templates" / TEMPLATES[name]).read_text()


def connect(
    studio: StudioClient,
    backend_url: str,
    *,
    project_id: int | None = None,
    title: str | None = None,
    template_name: str | None = "boxes",
    backend_title: str = "label-studio-sahi",
    login: Credentials | None = None,
) -> tuple[int, list[str]]:
    """Wire a project to the backend; returns ``(project id, what was done)``.

    ``login`` is the backend's basic-auth login: Label Studio gets it when the backend asks
    for one (its ML backend auth and the webhook's Authorization header)."""
    done: list[str] = []
    backend_url = backend_url.rstrip("/")
    try:
        health = httpx.get(f"{backend_url}/health", timeout=TIMEOUT).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ConnectError(
            f"the backend at {backend_url} does not answer /health ({type(exc).__name__}); start it with `ls-sahi up`"
        ) from exc
    login = _backend_login(backend_url, login)
    studio.call("GET", "/api/current-user/whoami")

    config = template(template_name) if template_name else None
    project = _find_project(studio, project_id, title)
    if project is None:
        if not title or len(title) < 3:
            raise ConnectError(
                "no such project: give --project ID, or --title (3+ characters) to create one"
            )
        project = studio.call(
            "POST",
            "/api/projects",
            json={"title": title, "label_config": config or template("boxes")},
        )
        done.append(f"created project {project['id']} '{title}'")
    elif config is not None and project.get("label_config", "").strip() != config.strip():
        studio.call("PATCH", f"/api/projects/{project['id']}", json={"label_config": config})
        done.append(
            f"set the labeling config of project {project['id']} to the '{template_name}' template"
        )
    pid = int(project["id"])

    backends = [
        b
        for b in studio.items("/api/ml", project=pid)
        if str(b.get("url", "")).rstrip("/") == backend_url
    ]
    auth: dict[str, Any] = (
        {"auth_method": "BASIC_AUTH", "basic_auth_user": login.user, "basic_auth_pass": login.password}
        if login
        else {"auth_method": "NONE"}
    )  # fmt: skip
    if not backends:
        studio.call(
            "POST",
            "/api/ml",
            json={"url": backend_url, "project": pid, "title": backend_title, "auto_update": True, **auth},
        )  # fmt: skip
        done.append(f"connected the ML backend {backend_url} (model {health.get('model_version')})")
    else:
        current_ml = backends[0]
        # Label Studio never shows a stored password, only whether one is set.
        auth_differs = current_ml.get("auth_method", "NONE") != auth["auth_method"] or (
            login is not None
            and (current_ml.get("basic_auth_user") != login.user or not current_ml.get("basic_auth_pass_is_set"))
        )  # fmt: skip
        if not current_ml.get("auto_update") or auth_differs:
            # Label Studio answers 500 to a PATCH without url and project.
            studio.call(
                "PATCH",
                f"/api/ml/{current_ml['id']}",
                json={"url": backend_url, "project": pid, "auto_update": True, **auth},
            )
            done.append(
                "gave the ML backend its login" if auth_differs else "turned auto-update on for the ML backend"
            )  # fmt: skip

    hook_url = f"{backend_url}/webhook"
    headers = {"Authorization": login.header()} if login else {}
    hooks = [h for h in studio.items("/api/webhooks", project=pid) if h.get("url") == hook_url]
    if not hooks:
        studio.call(
            "POST",
            "/api/webhooks",
            json={
                "project": pid,
                "url": hook_url,
                "send_payload": True,
                "send_for_all_actions": True,
                "is_active": True,
                "headers": headers,
            },
        )
        done.append(f"created the webhook {hook_url}")
    elif not hooks[0].get("is_active", True) or (hooks[0].get("headers") or {}) != headers:
        studio.call(
            "PATCH", f"/api/webhooks/{hooks[0]['id']}", json={"is_active": True, "headers": headers}
        )
        done.append("updated the webhook (active, with the backend's login)")

    current = studio.call("GET", f"/api/projects/{pid}")
    changes = {k: v for k, v in PREDICTION_SETTINGS.items() if current.get(k) != v}
    if changes:
        studio.call("PATCH", f"/api/projects/{pid}", json=changes)
        done.append("turned on predictions for pre-labelling (" + ", ".join(changes) + ")")
    return pid, done


def _backend_login(backend_url: str, login: Credentials | None) -> Credentials | None:
    """The login Label Studio must send: ``None`` for an open backend; refuses a login the
    backend does not accept, and a locked backend without one."""
    try:
        open_answer = httpx.get(f"{backend_url}/versions", timeout=TIMEOUT)
        if open_answer.status_code != 401:
            return None
        if login is None:
            raise ConnectError(
                f"the backend at {backend_url} asks for a login: set BASIC_AUTH_USER and "
                "BASIC_AUTH_PASS, or MODEL_DIR to the backend's (its generated auth.json)"
            )
        checked = httpx.get(
            f"{backend_url}/versions", auth=(login.user, login.password), timeout=TIMEOUT
        )
    except httpx.HTTPError as exc:
        raise ConnectError(
            f"the backend at {backend_url} did not answer ({type(exc).__name__})"
        ) from exc
    if checked.status_code == 401:
        raise ConnectError(f"the backend at {backend_url} refused the login of user '{login.user}'")
    return login


def local_login() -> Credentials | None:
    """The backend login this machine knows: BASIC_AUTH_USER / BASIC_AUTH_PASS, else the
    one the backend generated in MODEL_DIR."""
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        return Credentials(user, password)
    try:
        model_dir = os.environ.get("MODEL_DIR") or Settings.model_fields["model_dir"].default
        return stored_login(Path(model_dir).expanduser())
    except RuntimeError as exc:
        raise ConnectError(str(exc)) from None


def _find_project(
    studio: StudioClient, project_id: int | None, title: str | None
) -> dict[str, Any] | None:
    if project_id is not None:
        return studio.call("GET", f"/api/projects/{project_id}", what=f"project {project_id}")
    if title:
        for project in studio.items("/api/projects", title=title, page_size=1000):
            if project.get("title") == title:
                return studio.call("GET", f"/api/projects/{project['id']}")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ls-sahi-connect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--project", type=int, help="an existing project's id")
    target.add_argument("--title", help="the project's title (created if no project has it)")
    parser.add_argument(
        "--template",
        choices=[*TEMPLATES, "keep"],
        default="boxes",
        help="labeling config ('keep': the project's own)",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("BACKEND_URL", "http://127.0.0.1:9090"),
        help="the backend's URL as Label Studio reaches it",
    )
    parser.add_argument(
        "--label-studio",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's URL (LABEL_STUDIO_URL)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args(argv)
    api_key = os.environ.get("LABEL_STUDIO_API_KEY", "")
    if not args.label_studio or not api_key:
        print(
            "ls-sahi-connect: error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (legacy token or personal access token)",
            file=sys.stderr,
        )
        return 2
    try:
        pid, done = connect(
            StudioClient(args.label_studio, api_key), args.backend, project_id=args.project, title=args.title,
            template_name=None if args.template == "keep" else args.template, login=local_login(),
        )  # fmt: skip
    except (ConnectError, StudioError) as exc:
        print(f"ls-sahi-connect: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"project": pid, "changes": done}))
    else:
        for line in done or ["nothing to change: already wired"]:
            print(f"project {pid}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
