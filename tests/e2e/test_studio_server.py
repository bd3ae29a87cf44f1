"""The real Label Studio harness itself: start, both kinds of token, uploads, local files, stop."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from e2e.studio_server import StudioServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("LS_SAHI_LS_PYTHON"),
        reason="needs a real Label Studio: LS_SAHI_LS_PYTHON=$(scripts/label-studio-venv | tail -1)",
    ),
]

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="square"/>
    <Label value="circle"/>
  </RectangleLabels>
</View>"""

# What Label Studio would write into a HOME that was not redirected.
HOME_TRACES = [
    Path.home() / ".local" / "share" / "label-studio",
    Path.home() / ".config" / "label-studio",
    Path.home() / ".cache" / "label-studio",
]


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def label_studio_processes(run_dir: Path) -> list[psutil.Process]:
    """Running processes whose command line mentions ``run_dir`` (our server's flags do)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(str(run_dir) in part for part in cmdline):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudioServer]:
    before = {path: path.exists() for path in HOME_TRACES}
    run_dir = tmp_path_factory.mktemp("label-studio")
    server = StudioServer(run_dir)
    try:
        with server:
            yield server
    finally:
        # After the module: the server is gone, no process is left, HOME was not touched.
        assert not server.running
        assert label_studio_processes(run_dir) == []
        assert {path: path.exists() for path in HOME_TRACES} == before
    assert (run_dir / "lsdata" / "label_studio.sqlite3").exists()


@pytest.fixture(scope="module")
def project_id(studio: StudioServer) -> int:
    answer = studio.api(
        "POST", "/api/projects", json={"title": "e2e harness", "label_config": LABEL_CONFIG}
    )
    assert answer.status_code == 201, answer.text
    return int(answer.json()["id"])


def test_health(studio: StudioServer) -> None:
    answer = httpx.get(studio.url + "/health", timeout=10)
    assert answer.status_code == 200
    assert studio.url.startswith("http://127.0.0.1:")


def test_binds_only_loopback(studio: StudioServer) -> None:
    assert studio.process is not None
    listening = [
        conn.laddr
        for conn in psutil.Process(studio.process.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listening, "label-studio listens on nothing"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_legacy_token(studio: StudioServer) -> None:
    answer = studio.api("GET", "/api/current-user/whoami")
    assert answer.status_code == 200, answer.text
    assert answer.json()["email"] == studio.email
    wrong = studio.api(
        "GET", "/api/current-user/whoami", headers={"Authorization": "Token " + "0" * 40}
    )
    assert wrong.status_code == 401


def _refresh(studio: StudioServer, pat: str) -> httpx.Response:
    """Exchange the PAT for an access token.

    This once answered 401 "Token is invalid" after a restart: Label Studio had generated two
    signing keys at its first start (two processes, two SECRET_KEY lines in its .env) and
    read back the other one. StudioServer now sets SECRET_KEY itself."""
    return httpx.post(studio.url + "/api/token/refresh", json={"refresh": pat}, timeout=30)


def test_personal_access_token(studio: StudioServer) -> None:
    pat = studio.personal_access_token()
    assert pat.startswith("eyJ")
    assert studio.personal_access_token() == pat  # cached
    assert studio.pat_path.read_text() == pat

    refreshed = _refresh(studio, pat)
    assert refreshed.status_code == 200, refreshed.text
    access = refreshed.json()["access"]
    bearer = studio.api(
        "GET", "/api/current-user/whoami", headers={"Authorization": f"Bearer {access}"}
    )
    assert bearer.status_code == 200, bearer.text
    assert bearer.json()["email"] == studio.email

    direct = studio.api(
        "GET", "/api/current-user/whoami", headers={"Authorization": f"Bearer {pat}"}
    )
    assert direct.status_code == 401
    as_token = studio.api(
        "GET", "/api/current-user/whoami", headers={"Authorization": f"Token {pat}"}
    )
    assert as_token.status_code == 401


def test_project_and_upload(studio: StudioServer, project_id: int) -> None:
    short = studio.api("POST", "/api/projects", json={"title": "ab", "label_config": LABEL_CONFIG})
    assert short.status_code == 400, short.text

    image = png_bytes()
    answer = studio.api(
        "POST",
        f"/api/projects/{project_id}/import",
        files={"file0": ("img0.png", image, "image/png")},
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["task_count"] == 1

    tasks = studio.api("GET", "/api/tasks", params={"project": project_id}).json()["tasks"]
    url = tasks[-1]["data"]["image"]
    assert url.startswith(f"/data/upload/{project_id}/"), url
    assert url.endswith("-img0.png"), url

    served = studio.api("GET", url)
    assert served.status_code == 200
    assert served.content == image
    assert httpx.get(studio.url + url, timeout=30).status_code == 401


def test_local_files(studio: StudioServer, project_id: int) -> None:
    folder = studio.document_root / "sub"
    folder.mkdir()
    image = png_bytes((30, 200, 30))
    (folder / "x.png").write_bytes(image)

    storage = studio.api(
        "POST",
        "/api/storages/localfiles",
        json={"project": project_id, "title": "imgs", "path": str(folder), "use_blob_urls": True},
    )
    assert storage.status_code == 201, storage.text

    url = "/data/local-files/?d=sub/x.png"
    answer = studio.api(
        "POST", f"/api/projects/{project_id}/import", json=[{"data": {"image": url}}]
    )
    assert answer.status_code == 201, answer.text

    served = studio.api("GET", url)
    assert served.status_code == 200, served.text
    assert served.content == image
    assert served.content.startswith(b"\x89PNG")
    assert httpx.get(studio.url + url, timeout=30).status_code == 401
    assert studio.api("GET", "/data/local-files/?d=sub/missing.png").status_code == 404

    # The document root itself is refused as a storage path: it must be a subfolder.
    root = studio.api(
        "POST",
        "/api/storages/localfiles",
        json={"project": project_id, "title": "root", "path": str(studio.document_root)},
    )
    assert root.status_code == 400, root.text


def test_restart_keeps_data_and_tokens(studio: StudioServer, project_id: int) -> None:
    """Runs last: restarts the module's server on the same folder (a few seconds)."""
    pat = studio.personal_access_token()
    studio.stop()
    assert not studio.running
    studio.start()
    assert studio.start_seconds is not None

    assert studio.api("GET", f"/api/projects/{project_id}").status_code == 200
    # A new StudioServer on the same folder finds the PAT that run_dir keeps.
    again = StudioServer(studio.run_dir, port=studio.port)
    assert again.personal_access_token() == pat
    refreshed = _refresh(studio, pat)
    assert refreshed.status_code == 200, refreshed.text
