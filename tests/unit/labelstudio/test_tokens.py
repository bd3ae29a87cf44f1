"""Label Studio authentication: legacy tokens, personal access tokens and their refresh.

``LabelStudioAuth`` (``labelstudio.tokens``) sends a legacy token as ``Token <key>``; a personal
access token (a JWT refresh token) is exchanged at ``/api/token/refresh`` for a short-lived
bearer token, cached, refreshed before it expires or once after a 401, and never sent to
another origin. Driven through ``ImageLoader`` and plain httpx clients against the fake
origins of ``http_origins.py``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from http_origins import (
    LEGACY,
    OTHER_PAT,
    PAT,
    Servers,
    assert_secret_free,
    make_settings,
    png,
)

from label_studio_sahi.errors import ImageUnreachable
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.labelstudio.tokens import (
    LabelStudioAuth,
    is_personal_access_token,
    jwt_claims,
    same_origin,
)


def test_personal_access_token_is_exchanged_for_a_cached_bearer_token(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()
    with ImageLoader(make_settings(servers.ls, PAT)) as loader:
        loader.load("/data/upload/1/x.png")
        loader.load("/data/upload/1/x.png")
    assert servers.state.refreshes == 1
    gets = [s for s in servers.state.requests_to("ls") if s.method == "GET"]
    (access,) = servers.state.valid_access
    assert [s.authorization for s in gets] == [f"Bearer {access}"] * 2
    assert all(PAT not in (s.authorization or "") for s in servers.state.seen)


def test_expired_access_token_is_refreshed_before_use(servers: Servers) -> None:
    servers.state.access_lifetime = 0  # every access token is born expired
    servers.state.files["1/x.png"] = png()
    with ImageLoader(make_settings(servers.ls, PAT)) as loader:
        loader.load("/data/upload/1/x.png")
        loader.load("/data/upload/1/x.png")
    assert servers.state.refreshes == 2


def test_access_token_refused_with_401_is_refreshed_once_and_retried(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()
    with ImageLoader(make_settings(servers.ls, PAT)) as loader:
        loader.load("/data/upload/1/x.png")
        servers.state.valid_access.clear()  # Label Studio revoked it
        image = loader.load("/data/upload/1/x.png")
    assert image.size == (24, 16)
    assert servers.state.refreshes == 2
    statuses = [(s.method, s.path) for s in servers.state.requests_to("ls")]
    assert statuses == [
        ("POST", "/api/token/refresh"),
        ("GET", "/data/upload/1/x.png"),
        ("GET", "/data/upload/1/x.png"),  # 401
        ("POST", "/api/token/refresh"),
        ("GET", "/data/upload/1/x.png"),
    ]


def test_threads_sharing_a_loader_refresh_the_token_once(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()
    servers.state.refresh_delay = 0.2  # widen the race window
    with ImageLoader(make_settings(servers.ls, PAT)) as loader, ThreadPoolExecutor(6) as pool:
        images = list(pool.map(lambda _: loader.load("/data/upload/1/x.png"), range(6)))
    assert len(images) == 6
    assert servers.state.refreshes == 1


def test_revoked_personal_access_token_error_names_the_setting(servers: Servers) -> None:
    with (
        ImageLoader(make_settings(servers.ls, OTHER_PAT)) as loader,
        pytest.raises(ImageUnreachable) as err,
    ):
        loader.load("/data/upload/1/x.png")
    assert "LABEL_STUDIO_API_KEY" in str(err.value) and "401" in str(err.value)
    assert_secret_free(err.value, OTHER_PAT)


def test_wrong_legacy_token_error_says_the_token_was_refused(servers: Servers) -> None:
    wrong = "f" * 40
    with (
        ImageLoader(make_settings(servers.ls, wrong)) as loader,
        pytest.raises(ImageUnreachable) as err,
    ):
        loader.load("/data/upload/1/x.png")
    message = str(err.value)
    assert "refused the token" in message and "LABEL_STUDIO_API_KEY" in message
    assert_secret_free(err.value, wrong)


def test_missing_token_error_asks_for_one(servers: Servers) -> None:
    with (
        ImageLoader(make_settings(servers.ls, None)) as loader,
        pytest.raises(ImageUnreachable) as err,
    ):
        loader.load("/data/upload/1/x.png")
    assert "set LABEL_STUDIO_API_KEY" in str(err.value)


def test_auth_never_sends_the_token_to_another_origin_even_client_wide(servers: Servers) -> None:
    servers.state.files["pic.png"] = png()
    auth = LabelStudioAuth(PAT, servers.ls)
    with httpx.Client(auth=auth) as client:
        assert client.get(f"{servers.other}/public/pic.png").status_code == 200
    assert [s.authorization for s in servers.state.seen] == [None]
    assert PAT not in repr(auth)


def test_auth_works_with_an_async_client(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()

    async def fetch() -> int:
        async with httpx.AsyncClient(auth=LabelStudioAuth(PAT, servers.ls)) as client:
            return (await client.get(f"{servers.ls}/data/upload/1/x.png")).status_code

    assert asyncio.run(fetch()) == 200
    assert servers.state.refreshes == 1


def test_token_helpers() -> None:
    assert is_personal_access_token(PAT)
    assert not is_personal_access_token(LEGACY)
    assert jwt_claims(PAT)["jti"] == "pat-1"
    assert jwt_claims("not.a-jwt.at all") == {}
    assert same_origin("http://LS:80/a", "http://ls/b")
    assert same_origin("https://ls/a", "https://ls:443")
    assert not same_origin("http://ls/a", "https://ls/a")
    assert not same_origin("http://ls:8080/a", "http://ls:8081/a")
    assert not same_origin("/data/upload/x", "/data/upload/x")
    assert not same_origin("http://ls:bad/", "http://ls:bad/")
