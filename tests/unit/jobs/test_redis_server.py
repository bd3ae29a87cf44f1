"""The embedded Redis of a MODEL_DIR: one server however many processes start it, kept
until the last of them leaves, and its data kept across restarts (AOF)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from processes import redis_servers_of

from label_studio_sahi.jobs.redis_server import _answers, connect

USER = """
import sys
from pathlib import Path
from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
server = EmbeddedRedis(Path(sys.argv[1]))
connect(server.start()).incr("starts")
print("up", flush=True)
sys.stdin.readline()  # until the test says go
server.stop()
"""


def _user(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", USER, str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_processes_started_together_share_one_server_and_the_last_out_stops_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "redis"
    first, second = _user(folder), _user(folder)  # at once, racing to start it
    for user in (first, second):
        assert user.stdout is not None and user.stdout.readline().strip() == "up"
    url = f"unix://{folder / 'redis.sock'}"
    assert len(redis_servers_of(folder)) == 1
    assert int(connect(url).get("starts")) == 2

    first.communicate("\n", timeout=30)  # the one that started it leaves first
    assert _answers(url), "the server went away under the other process"
    connect(url).set("kept", "yes")
    second.communicate("\n", timeout=30)
    assert not _answers(url) and redis_servers_of(folder) == []

    third = _user(folder)  # a restart finds what was written (AOF)
    assert third.stdout is not None and third.stdout.readline().strip() == "up"
    assert connect(url).get("kept") == b"yes" and int(connect(url).get("starts")) == 3
    third.communicate("\n", timeout=30)
    assert redis_servers_of(folder) == []
