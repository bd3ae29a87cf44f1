"""Who may call the backend: HTTP basic auth, on by default wherever the network can reach it.

``credentials(settings)`` is the login the server checks, or ``None`` when auth is off:

* ``AUTH=off``: none (a proxy in front authenticates);
* ``AUTH=auto`` (the default): none when HOST is a loopback address (only this machine can
  connect), otherwise as ``AUTH=basic``;
* ``AUTH=basic``: BASIC_AUTH_USER / BASIC_AUTH_PASS when set; else ``label-studio`` and a
  random password generated once, kept in ``MODEL_DIR/auth.json`` (mode 0600) and shown
  once on the terminal that started the server (``/dev/tty``), as notebook servers do with
  their token. It never goes to stdout or stderr: those are the log stream (``docker logs``,
  journald, a file) whenever the server runs without a terminal; a log line names the file.

``ls-sahi-connect`` reads the same login to give it to Label Studio (the ML backend's basic
auth and the webhook's Authorization header), so turning auth on never breaks the wiring.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from label_studio_sahi import names
from label_studio_sahi.private_files import write_new
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

GENERATED_USER = "label-studio"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str

    def header(self) -> str:
        """The ``Authorization`` header value of this login."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def __repr__(self) -> str:  # never a password in a log line or a traceback
        return f"Credentials(user={self.user!r}, password='**********')"


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_required(settings: Settings) -> bool:
    if settings.auth == "off":
        return False
    return settings.auth == "basic" or not is_loopback(settings.host)


def credentials(settings: Settings, *, create: bool = True) -> Credentials | None:
    """The login requests must carry, or ``None`` when auth is off (see the module doc).

    ``create=False`` only reads a generated login (for ``ls-sahi-connect``)."""
    if not auth_required(settings):
        return None
    if settings.basic_auth_user and settings.basic_auth_pass:
        return Credentials(settings.basic_auth_user, settings.basic_auth_pass.get_secret_value())
    path = Path(settings.model_dir) / names.AUTH_FILE
    stored = _read(path)
    if stored is not None or not create:
        return stored
    login = Credentials(GENERATED_USER, secrets.token_urlsafe(24))
    if _write_new(path, login):
        shown = _tell_terminal(
            f"label-studio-sahi: basic auth is on (HOST={settings.host}). Login: "
            f"{login.user} / {login.password} (kept in {path}; ls-sahi-connect passes it to "
            "Label Studio)"
        )
        # Where to find it, never what it is.
        log.warning(
            "basic_auth_login_generated user=%s file=%s shown_on_terminal=%s",
            login.user,
            path,
            str(shown).lower(),
        )
        return login
    # Another process generated it first: use theirs.
    return _read(path)


def _tell_terminal(text: str) -> bool:
    """Write ``text`` to the controlling terminal, if the process has one.

    ``/dev/tty`` rather than stdout-if-it-is-a-tty: under ``ls-sahi up 2>&1 | tee log`` the
    operator sits at a terminal while stdout and stderr go to the log; started by Docker,
    systemd or a test there is no terminal, opening it fails, and the file is the way in."""
    try:
        fd = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return False
    with os.fdopen(fd, "w") as tty:
        tty.write(text + "\n")
    return True


def stored_login(model_dir: Path) -> Credentials | None:
    """The login generated for ``model_dir``, if one was (for ``ls-sahi-connect``)."""
    return _read(Path(model_dir) / names.AUTH_FILE)


def _read(path: Path) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
        return Credentials(str(data["user"]), str(data["password"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"cannot read the basic-auth login in {path}: {exc}") from None


def _write_new(path: Path, login: Credentials) -> bool:
    """Write the login (owner-only, whole or not at all); False when the file exists already."""
    return write_new(path, json.dumps({"user": login.user, "password": login.password}))
