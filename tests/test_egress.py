"""Image fetches never reach private addresses, and the token never leaves Label Studio.

Real HTTP servers on loopback (tests/http_origins.py) play Label Studio and an outside
origin; each test asserts on what those servers received, not only on the error."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from http_origins import LEGACY, PAT, Servers, make_settings, png

import label_studio_sahi.images as images
from label_studio_sahi.errors import ImageForbidden, ImageUnreachable
from label_studio_sahi.images import ImageLoader


def _endpoint(url: str) -> str:
    return urlsplit(url).netloc


def _strict(servers: Servers, *allow: str, key: str | None = LEGACY, **overrides: Any) -> Any:
    """The default policy (nothing private allowed but Label Studio), plus ``allow``."""
    return make_settings(servers.ls, key, egress_allow=list(allow), **overrides)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # a cloud's metadata
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.10:6379/", "private"),
        ("http://[::1]:6379/", "loopback"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://[::ffff:127.0.0.1]:9/", "loopback"),
    ],
)
def test_non_public_addresses_are_refused_by_default(servers: Servers, url: str, kind: str) -> None:
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden) as err:
        loader.load(url)
    assert err.value.status == 403
    assert kind in err.value.message and "EGRESS_ALLOW" in err.value.message


def test_a_loopback_server_that_is_not_label_studio_gets_no_request(servers: Servers) -> None:
    servers.state.files["pic.png"] = png()
    for url in (f"{servers.other}/public/pic.png",
                f"http://localhost:{urlsplit(servers.other).port}/public/pic.png"):  # fmt: skip
        with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden):
            loader.load(url)
    assert servers.state.requests_to("other") == []
    # Listed, it is an image store like any other.
    with ImageLoader(_strict(servers, _endpoint(servers.other))) as loader:
        assert loader.load(f"{servers.other}/public/pic.png").size == (24, 16)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{other_port}/public/pic.png",  # another port of this machine
        "http://localhost:{other_port}/public/pic.png",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[::1]:{other_port}/public/pic.png",
    ],
)
def test_every_redirect_hop_is_checked(servers: Servers, target: str) -> None:
    servers.state.files["pic.png"] = png()
    target = target.format(other_port=urlsplit(servers.other).port)
    # Label Studio itself is allowed; its open redirector must not lead anywhere private.
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden) as err:
        loader.load(f"{servers.ls}/redirect?to={quote(target, safe='')}")
    assert "redirected to" in err.value.message
    assert servers.state.requests_to("other") == []


def test_the_token_goes_only_to_label_studios_file_paths(servers: Servers) -> None:
    servers.state.files["a.png"] = png()
    with ImageLoader(_strict(servers)) as loader:
        loader.load(f"{servers.ls}/data/upload/a.png")
        for url in (
            f"{servers.ls}/api/projects",  # an API path given as an image URL
            "/data/upload/../../api/projects",  # a traversal out of /data/
            f"{servers.ls}/data/upload/%2e%2e/%2e%2e/api/projects",
            f"{servers.ls}/redirect?to={quote(servers.ls + '/api/projects', safe='')}",
        ):
            with pytest.raises(ImageUnreachable):
                loader.load(url)
    seen = servers.state.requests_to("ls")
    assert seen[0].path == "/data/upload/a.png" and seen[0].authorization == f"Token {LEGACY}"
    assert [s.authorization for s in seen[1:]] == [None] * (len(seen) - 1), seen


def test_a_presign_redirect_to_storage_never_carries_the_token(servers: Servers) -> None:
    servers.state.files["e.png"] = png(7, 5)
    with ImageLoader(_strict(servers, _endpoint(servers.other))) as loader:
        assert loader.load("s3://bucket/e.png", task_id=3).size == (7, 5)
    assert [s.authorization for s in servers.state.requests_to("other")] == [None]
    # The same storage on a private address nobody allowed: refused after the presign.
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageForbidden):
        loader.load("s3://bucket/e.png", task_id=3)
    assert len(servers.state.requests_to("other")) == 1


def test_the_pat_refresh_never_follows_a_redirect(servers: Servers) -> None:
    servers.state.files["a.png"] = png()
    servers.state.refresh_redirect = f"{servers.other}/steal"
    settings = _strict(servers, _endpoint(servers.other), key=PAT)
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/data/upload/a.png")
    assert "307" in err.value.message
    assert servers.state.requests_to("other") == []  # the PAT never left


def test_a_drip_feed_is_cut_at_the_deadline_and_at_the_rate_floor(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _strict(servers, image_download_deadline=0.5, image_min_bytes_per_second=0)
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/drip")
    assert "IMAGE_DOWNLOAD_DEADLINE" in err.value.message
    monkeypatch.setattr(images, "RATE_GRACE_SECONDS", 0.3)
    with ImageLoader(_strict(servers)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/drip")
    assert "IMAGE_MIN_BYTES_PER_SECOND" in err.value.message


def test_egress_allow_reads_hosts_ports_and_networks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from label_studio_sahi.settings import Settings

    monkeypatch.setenv("EGRESS_ALLOW", "minio:9000, 10.0.0.0/8,storage.internal")
    assert Settings(_env_file=None).egress_allow == [  # type: ignore[call-arg]
        "minio:9000", "10.0.0.0/8", "storage.internal",
    ]  # fmt: skip
