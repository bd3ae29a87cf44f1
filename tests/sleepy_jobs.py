"""Jobs for tests that stop workers mid-job: importable by a worker started with
``PYTHONPATH=tests``, and they run until the test lets them end."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for_file(path: str, timeout: float = 600) -> str:
    """Run until ``path`` exists (the test creates it when the job may end)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)
    return "done"
