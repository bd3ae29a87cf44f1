"""Basic auth: on by default wherever the network reaches the server, off on loopback."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from label_studio_sahi.serving.auth import credentials
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import make_settings, serving


def test_on_a_network_address_a_login_is_generated_once_and_required(
    bundle: ModelBundle, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(bundle, host="0.0.0.0", model_dir=tmp_path) as live:
        stored = tmp_path / "auth.json"
        login = json.loads(stored.read_text())
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert login["user"] == "label-studio" and len(login["password"]) >= 24
        # Shown on the terminal (/dev/tty) if there is one, never on stdout or stderr: they
        # are the log stream wherever the server runs without a terminal.
        printed = capfd.readouterr()
        assert login["password"] not in printed.out + printed.err
        assert login["password"] not in caplog.text  # never in the log
        assert f"file={stored}" in caplog.text  # the log says where it is

        denied = httpx.post(f"{live.url}/setup", json={"project": "1"})
        assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
        assert denied.headers["www-authenticate"].startswith("Basic")
        wrong = httpx.post(f"{live.url}/setup", json={"project": "1"}, auth=("label-studio", "x"))
        assert wrong.status_code == 401
        auth = (login["user"], login["password"])
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}, auth=auth).status_code == 200
        assert httpx.get(f"{live.url}/health").status_code == 200  # Label Studio's probe
        assert httpx.get(f"{live.url}/metrics").status_code == 401
        assert httpx.get(f"{live.url}/metrics", auth=auth).status_code == 200
        assert httpx.get(f"{live.url}/versions").status_code == 401

    with serving(bundle, host="0.0.0.0", model_dir=tmp_path):  # a restart keeps the login
        assert json.loads(stored.read_text()) == login
        assert login["password"] not in capfd.readouterr().err


def test_on_loopback_auth_is_off_unless_asked_for(bundle: ModelBundle, tmp_path: Path) -> None:
    with serving(bundle, host="127.0.0.1", model_dir=tmp_path) as live:
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}).status_code == 200
    assert not (tmp_path / "auth.json").exists()
    with serving(bundle, host="localhost", auth="basic", model_dir=tmp_path) as live:
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}).status_code == 401


def test_configured_login_and_explicit_opt_outs(bundle: ModelBundle, tmp_path: Path) -> None:
    with serving(bundle, host="0.0.0.0", basic_auth_user="ls", basic_auth_pass="s3cret") as live:
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}).status_code == 401
        ok = httpx.post(f"{live.url}/setup", json={"project": "1"}, auth=("ls", "s3cret"))
        assert ok.status_code == 200
    with serving(bundle, host="0.0.0.0", auth="off", model_dir=tmp_path) as live:
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}).status_code == 200
    with serving(bundle, host="0.0.0.0", metrics_open=True, model_dir=tmp_path) as live:
        assert httpx.get(f"{live.url}/metrics").status_code == 200
        assert httpx.post(f"{live.url}/setup", json={"project": "1"}).status_code == 401


@pytest.mark.parametrize("password", [None, ""])
def test_a_user_without_a_password_is_refused_at_start(password: str | None) -> None:
    with pytest.raises(ValidationError, match="BASIC_AUTH_PASS"):
        make_settings(basic_auth_user="ls", basic_auth_pass=password)


def test_a_login_never_shows_its_password(tmp_path: Path) -> None:
    login = credentials(make_settings(host="0.0.0.0", model_dir=tmp_path))
    assert login is not None and login.password not in repr(login)
    assert credentials(make_settings(host="::1", model_dir=tmp_path)) is None
