"""A real Label Studio (``label-studio start``) in a folder of its own, for end-to-end tests.

Label Studio lives in its own virtualenv (``scripts/label-studio-venv`` builds it and prints
its python; pass that path as ``LS_SAHI_LS_PYTHON`` or as ``python``)::

    with StudioServer(tmp_path / "ls") as studio:
        studio.api("GET", "/api/current-user/whoami").json()  # legacy token
        pat = studio.personal_access_token()                # a JWT refresh token
        access = studio.access_token()                      # Bearer, 5 minutes

Everything it writes (HOME, XDG dirs, TMPDIR, its SQLite data dir, logs) stays under
``run_dir``; it binds 127.0.0.1 only. ``document_root`` (``run_dir/data``) is the local
files root: put files in a subfolder, add a local storage with that subfolder's path and
import ``/data/local-files/?d=<subfolder>/<name>``. ``stop()`` ends the whole process group.
A second ``start()`` on the same folder is a restart (data kept, a few seconds).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

DEFAULT_LEGACY_TOKEN = "5a1d" * 10  # 40 hex characters, like Label Studio's own tokens
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 20.0

# Passed through from the caller's environment; everything else is left out on purpose,
# so a developer's LABEL_STUDIO_*, DJANGO_*, POSTGRE_* ... never reach the test server.
_PASS_THROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, start: int = 0, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class StudioServer:
    """One ``label-studio start`` process; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        python: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        email: str = "admin@example.com",
        password: str = "e2e-Password-1",
        legacy_token: str = DEFAULT_LEGACY_TOKEN,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        python = python or os.environ.get("LS_SAHI_LS_PYTHON")
        if not python:
            raise RuntimeError(
                "no Label Studio python: set LS_SAHI_LS_PYTHON=$(scripts/label-studio-venv | tail -1)"
            )
        self.python = Path(python)
        # Not resolved: the venv's bin/python is usually a link to the system python.
        self.executable = self.python.parent / "label-studio"
        if not self.executable.exists():
            raise RuntimeError(f"{self.executable} not found (is {self.python} a venv python?)")
        self.run_dir = Path(run_dir).absolute()
        self.home = self.run_dir / "home"
        self.data_dir = self.run_dir / "lsdata"
        self.document_root = self.run_dir / "data"
        self.tmp_dir = self.run_dir / "tmp"
        self.stdout_path = self.run_dir / "label-studio.out"
        self.stderr_path = self.run_dir / "label-studio.err"
        self.pat_path = self.run_dir / "personal-access-token"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.email = email
        self.password = password
        self.legacy_token = legacy_token
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start() took
        self._pat: str | None = None
        self._log_offsets = (0, 0)

    # -- lifecycle -----------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASS_THROUGH if k in os.environ}
        env["PATH"] = os.pathsep.join([str(self.python.parent), env.get("PATH", "/usr/bin:/bin")])
        flags = {
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "ENABLE_LEGACY_API_TOKEN": "true",
            "BASE_DATA_DIR": str(self.data_dir),
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
        }
        for name, value in flags.items():
            env[name] = value
            env["LABEL_STUDIO_" + name] = value
        env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            XDG_STATE_HOME=str(self.home / ".local" / "state"),
            TMPDIR=str(self.tmp_dir),
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            SECRET_KEY=self._secret_key(),
        )
        return env

    def _secret_key(self) -> str:
        """Django's SECRET_KEY, which also signs the JWTs, kept in run_dir across restarts.

        Without it Label Studio generates one at start and appends it to its data folder's
        .env; two of its processes starting at once each appended their own (seen: two
        SECRET_KEY lines), and after a restart the one read back was not the one that had
        signed the personal access token: "Token is invalid"."""
        path = self.run_dir / "secret-key"
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(50))
        return path.read_text().strip()

    def command(self) -> list[str]:
        return [
            str(self.executable),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--host",
            self.url,
            "--data-dir",
            str(self.data_dir),
            "--username",
            self.email,
            "--password",
            self.password,
            "--user-token",
            self.legacy_token,
            "--enable-legacy-api-token",
        ]

    def start(self) -> StudioServer:
        if self.running:
            raise RuntimeError("Label Studio is already running")
        for folder in (
            self.home / ".config",
            self.home / ".local" / "share",
            self.home / ".local" / "state",
            self.home / ".cache",
            self.data_dir,
            self.document_root,
            self.tmp_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._log_offsets = (
            self.stdout_path.stat().st_size if self.stdout_path.exists() else 0,
            self.stderr_path.stat().st_size if self.stderr_path.exists() else 0,
        )
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.run_dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        atexit.register(self.stop)  # a script that forgets stop() leaves no server behind
        try:
            self._wait_healthy(began)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_healthy(self, began: float) -> None:
        assert self.process is not None
        deadline = began + self.start_timeout
        with httpx.Client(timeout=5) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"label-studio exited with {code} before answering /health\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"label-studio did not answer /health in {self.start_timeout:.0f} s\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.25)

    def log_tail(self, lines: int = 40) -> str:
        """The end of this run's stderr and stdout (where Label Studio logs)."""
        return (
            f"--- {self.stderr_path.name} ---\n"
            f"{_tail(self.stderr_path, self._log_offsets[1], lines)}\n"
            f"--- {self.stdout_path.name} ---\n"
            f"{_tail(self.stdout_path, self._log_offsets[0], lines)}"
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 20 s, and leave no process behind."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        group = process.pid  # start_new_session: the process leads its own group and session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # anything left in the group
        for proc in self._session_processes(group):
            with contextlib.suppress(Exception):
                proc.kill()

    @staticmethod
    def _session_processes(session: int) -> list[Any]:
        """Processes still in the server's session (even ones that left its group)."""
        try:
            import psutil
        except ImportError:
            return []
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == session:
                    found.append(proc)
        return found

    def __enter__(self) -> StudioServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to ``url + path`` with ``Authorization: Token <legacy_token>``.

        ``headers`` in ``kwargs`` are merged (an ``Authorization`` there wins); the other
        keyword arguments go to ``httpx.request`` (``json``, ``params``, ``files``, ...).
        """
        headers = {"Authorization": f"Token {self.legacy_token}"}
        headers.update(kwargs.pop("headers", None) or {})
        kwargs.setdefault("timeout", 30)
        return httpx.request(method, self.url + path, headers=headers, **kwargs)

    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token), made once and cached.

        Logs in through the HTML form (CSRF cookie + ``csrfmiddlewaretoken`` + ``Referer``),
        then POST ``/api/token/`` from that session (201 ``{"token": ...}``). A user gets one
        PAT (a second POST answers 409) and it outlives restarts, so it is also kept in
        ``run_dir/personal-access-token`` for the next ``StudioServer`` on the same folder.
        """
        if self._pat is None and self.pat_path.exists():
            self._pat = self.pat_path.read_text().strip() or None
        if self._pat is None:
            login = self.url + "/user/login/"
            with httpx.Client(base_url=self.url, timeout=30, follow_redirects=False) as client:
                client.get("/user/login/").raise_for_status()
                answer = client.post(
                    "/user/login/",
                    data={
                        "email": self.email,
                        "password": self.password,
                        "csrfmiddlewaretoken": client.cookies["csrftoken"],
                    },
                    headers={"Referer": login},
                )
                if answer.status_code != 302:
                    raise RuntimeError(f"login failed: {answer.status_code} {answer.text[:500]}")
                # Django rotates the CSRF token on login: read the cookie again.
                answer = client.post(
                    "/api/token/",
                    headers={"X-CSRFToken": client.cookies["csrftoken"], "Referer": login},
                )
                if answer.status_code == 409:
                    # One PAT per user, and GET /api/token/ lists it without its signature.
                    raise RuntimeError(
                        f"{self.email} already has a personal access token that is not in "
                        f"{self.pat_path}; only the one who made it can use it"
                    )
                answer.raise_for_status()
                self._pat = str(answer.json()["token"])
            self.pat_path.write_text(self._pat)
        return self._pat

    def access_token(self) -> str:
        """A fresh 5-minute access token from the PAT (``Authorization: Bearer <it>``)."""
        answer = httpx.post(
            self.url + "/api/token/refresh",
            json={"refresh": self.personal_access_token()},
            timeout=30,
        )
        answer.raise_for_status()
        return str(answer.json()["access"])
