"""What the backend writes is its owner's alone: MODEL_DIR, checkpoints, the login, Redis data.

``MODEL_DIR`` holds the generated basic-auth login, the Redis append-only file (every job's
arguments, Label Studio URLs) and fine-tuned checkpoints. The commands that write there run
under ``PRIVATE_UMASK``, so every file and folder they create is 0600 / 0700 whoever
creates it (the registry, rq, the redis-server child, which has no umask option of its own).

A ``MODEL_DIR`` that exists already with wider modes is left as it is and named in a log
warning: it is the user's folder (a shared volume, a group-readable home), and changing its
mode under them can break what else uses it. New files in it are 0600 all the same. The
embedded Redis's own folder is the backend's alone, so its modes are tightened.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from label_studio_sahi import names

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077  # files 0600, folders 0700
DIR_MODE = 0o700
FILE_MODE = 0o600


def use_private_umask() -> None:
    """From now on this process (and every child it starts) creates files 0600, folders 0700."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` created 0700 (its missing parents too) if it does not exist; when it does and
    others may read it, a warning (see the module doc: the user's folder is not changed)."""
    path = Path(path)
    if not path.exists():
        old = os.umask(PRIVATE_UMASK)
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        finally:
            os.umask(old)
        return path
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "model_dir_not_private path=%s mode=%04o: other users of this machine may read "
            "the login, the Redis data and the checkpoints in it; new files are 0600, "
            "run `chmod 700 %s` to close it",
            path,
            mode,
            path,
        )
    return path


def tighten(folder: Path) -> None:
    """``folder`` and everything in it to 0700 (folders) / 0600 (files): for folders only
    the backend writes (the embedded Redis's), left wider by an earlier version."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(DIR_MODE)
        elif path.is_file():  # not the socket: redis-server sets its mode (unixsocketperm)
            path.chmod(FILE_MODE)


def write_new(path: Path, text: str) -> bool:
    """Write ``path`` readable by its owner only, whole or not at all, never replacing it;
    False when it exists already (another process won the race, and its file stands)."""
    private_dir(path.parent)
    tmp = path.with_name(f"{names.TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, path)  # atomic, and refuses to replace an existing file
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
