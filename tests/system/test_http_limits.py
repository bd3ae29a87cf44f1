"""A slow client holds a connection only as long as HEADER_TIMEOUT and BODY_DEADLINE allow.

Raw sockets against the backend served by a real uvicorn, configured as ``ls-sahi serve``
configures it (http_limits.uvicorn_config), with deadlines of a fraction of a second. Every
wait is bounded by a count of steps or a socket timeout, never measured."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from labelled_project import CONFIG
from PIL import Image

from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import LiveServer, make_settings, start_uvicorn, stop_uvicorn

HEADER_TIMEOUT = 0.5
BODY_DEADLINE = 1.0
SLOW_IMAGE_SECONDS = 1.5  # the app's own work: longer than both deadlines
STEP = 0.1  # seconds between two drips of a slow client
STEPS = 100  # a slow client gives up after this many drips (10 s: far past every deadline)


@pytest.fixture(scope="module")
def live(bundle: ModelBundle) -> Iterator[LiveServer]:
    def slow_image(url: str, task_id: int | None) -> Image.Image:
        time.sleep(SLOW_IMAGE_SECONDS)
        return Image.new("RGB", (64, 48), "gray")

    settings = make_settings(header_timeout=HEADER_TIMEOUT, body_deadline=BODY_DEADLINE)
    server = start_uvicorn(create_app(settings, Service(settings, bundle, load_image=slow_image)))
    yield server
    stop_uvicorn(server)


def _connect(live: LiveServer) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response: status, headers (lower-case names), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed its end: a read gives end-of-file (or a reset)."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _drip(sock: socket.socket, pieces: Iterator[bytes]) -> int:
    """Send one piece every STEP seconds until the server answers or closes; how many went."""
    sent = 0
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        sent += 1
        sock.settimeout(STEP)
        try:
            sock.recv(1, socket.MSG_PEEK)  # returns once the server spoke or closed
        except TimeoutError:
            continue  # nothing yet: the next piece
        except ConnectionResetError:
            pass
        finally:
            sock.settimeout(10)
        break
    return sent


def _header_lines() -> Iterator[bytes]:
    yield b"POST /predict HTTP/1.1\r\nHost: localhost\r\n"
    for i in range(STEPS):
        yield f"X-Slow-{i}: still typing\r\n".encode()


def _predict_body() -> bytes:
    body = {"tasks": [{"id": 1, "data": {"image": "http://x/a.png"}}], "label_config": CONFIG}
    return json.dumps(body).encode()


def _request(path: str, body: bytes | None = None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _assert_request_timeout(sock: socket.socket, setting: str) -> None:
    status, headers, body = _read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)
    assert error["error"] == "request_timeout" and error["status_code"] == 408
    assert setting in error["detail"]
    assert _closed_by_server(sock)


@pytest.mark.parametrize("after_a_first_request", [False, True])
def test_headers_sent_one_line_at_a_time_are_cut_at_the_header_timeout(
    live: LiveServer, after_a_first_request: bool
) -> None:
    with _connect(live) as sock:
        if after_a_first_request:  # on a kept-alive connection, counted from its end
            sock.sendall(_request("/health"))
            assert _read_response(sock)[0] == 200
        sent = _drip(sock, _header_lines())
        assert sent < STEPS  # cut long before the client would have stopped
        _assert_request_timeout(sock, "HEADER_TIMEOUT")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(live: LiveServer) -> None:
    with _connect(live) as sock:
        # The socket's 10 s timeout bounds the wait; the server closes it after 0.5 s.
        assert sock.recv(65536) == b""


def test_a_body_sent_one_byte_at_a_time_gets_408_at_the_body_deadline(live: LiveServer) -> None:
    body = _predict_body()
    head, _, _ = _request("/predict", body).partition(b"\r\n\r\n")
    with _connect(live) as sock:
        sock.sendall(head + b"\r\n\r\n")
        sent = _drip(sock, (body[i : i + 1] for i in range(min(len(body), STEPS))))
        assert sent < min(len(body), STEPS)
        _assert_request_timeout(sock, "BODY_DEADLINE")
    # The app heard the client leave, and serves the next one.
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200


def test_a_prompt_kept_alive_client_is_served_however_long_the_app_works(
    live: LiveServer,
) -> None:
    with _connect(live) as sock:
        for _ in range(2):
            sock.sendall(_request("/health"))
            status, headers, _ = _read_response(sock)
            assert status == 200 and headers.get("connection") != "close"
            time.sleep(HEADER_TIMEOUT / 2)  # a pause between requests, within the timeout
        # A /predict whose image takes longer than both deadlines: the deadlines are the
        # client's, not the app's.
        sock.sendall(_request("/predict", _predict_body()))
        status, _, body = _read_response(sock)
        assert status == 200, body
        sock.sendall(_request("/health"))  # and the connection is still good
        assert _read_response(sock)[0] == 200


def test_many_slow_clients_at_once_are_all_cut_and_the_server_still_answers(
    live: LiveServer,
) -> None:
    outcomes: list[int] = []
    lock = threading.Lock()

    def slow_client() -> None:
        with _connect(live) as sock:
            sent = _drip(sock, _header_lines())
            status = _read_response(sock)[0]
            with lock:
                outcomes.append(status if sent < STEPS else 0)

    clients = [threading.Thread(target=slow_client) for _ in range(20)]
    for client in clients:
        client.start()
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
    for client in clients:
        client.join(30)
    assert outcomes == [408] * 20
