"""DNS rebinding: a loopback backend answers only to loopback names (ALLOWED_HOSTS).

A page whose DNS name is rebound to 127.0.0.1 talks to the backend as a same-origin page
of that name, so its requests carry ``Host: <that name>``: refused on every route with a
400 naming ALLOWED_HOSTS, before any login prompt. On a network bind any name is served
unless ALLOWED_HOSTS says otherwise (Label Studio uses whatever name the deployer chose).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from label_studio_sahi.serving.browser_guard import HostPolicy
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import LiveServer, make_settings, serving

REBOUND = "rebind.attacker.test"


def with_host(live: LiveServer, method: str, path: str, host: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{live.url}{path}", headers={"Host": host}, timeout=30, **kw)


def test_a_loopback_backend_refuses_a_rebound_name_on_every_route(bundle: ModelBundle) -> None:
    with serving(bundle, host="127.0.0.1") as live:
        port = live.url.rsplit(":", 1)[1]
        for method, path in (("GET", "/health"), ("GET", "/versions"), ("GET", "/ui/7"),
                             ("GET", "/metrics"), ("POST", "/setup")):  # fmt: skip
            for host in (REBOUND, f"{REBOUND}:{port}", "127.0.0.1.nip.io", "localhost.evil"):
                answer = with_host(live, method, path, host, json={"project": "7"})
                assert answer.status_code == 400, (method, path, host, answer.text)
                error = answer.json()
                assert error["error"] == "host_not_allowed" and "ALLOWED_HOSTS" in error["detail"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert with_host(live, "GET", "/health", host).status_code == 200, host
            setup = with_host(live, "POST", "/setup", host, json={"project": "7"})
            assert setup.status_code == 200, (host, setup.text)


def test_the_rebound_name_gets_no_login_prompt(bundle: ModelBundle) -> None:
    with serving(bundle, host="127.0.0.1", auth="basic", basic_auth_user="u",
                 basic_auth_pass="p") as live:  # fmt: skip
        answer = with_host(live, "GET", "/versions", REBOUND)
        assert answer.status_code == 400 and "www-authenticate" not in answer.headers


def test_a_network_backend_serves_any_name_unless_told(bundle: ModelBundle) -> None:
    with serving(bundle, host="0.0.0.0", auth="off") as live:
        for host in ("ml.example.org", "backend:9090", "10.0.0.5:9090", REBOUND):
            assert with_host(live, "GET", "/health", host).status_code == 200, host
    with serving(
        bundle, host="0.0.0.0", auth="off", allowed_hosts=["ml.example.org:9090", "backend"]
    ) as live:
        for host in ("ml.example.org:9090", "backend", "backend:9090"):
            assert with_host(live, "GET", "/health", host).status_code == 200, host
        for host in ("ml.example.org", "ml.example.org:80", "localhost", REBOUND):
            assert with_host(live, "GET", "/health", host).status_code == 400, host


def test_allowed_hosts_reads_names_ports_and_a_star(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_HOSTS", "localhost, ml.example.org:9090,::1")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allowed_hosts == ["localhost", "ml.example.org:9090", "::1"]
    policy = HostPolicy.from_settings(settings)
    assert policy.allows("localhost:1234") and policy.allows("[::1]:9090")
    assert policy.allows("ml.example.org:9090") and not policy.allows("ml.example.org")
    assert not policy.allows(None) and not policy.allows("") and not policy.allows("a b")
    assert HostPolicy.from_settings(make_settings(allowed_hosts=["*"], host="::1")).any_host
    with pytest.raises(ValueError, match="ALLOWED_HOSTS"):
        HostPolicy.from_settings(make_settings(allowed_hosts=["http://x/y"]))
