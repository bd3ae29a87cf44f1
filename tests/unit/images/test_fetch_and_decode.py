"""Image loading over real HTTP: URL kinds, limits and decoding.

The fake Label Studio and the other origin (``http_origins.py``) record the headers they
receive, so the tests can prove where the token went and that it never reached another
origin. How the token itself is sent, exchanged and refreshed is in ``test_studio_auth.py``.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from http_origins import (
    LEGACY,
    PAT,
    Servers,
    assert_secret_free,
    make_settings,
    png,
)
from PIL import Image, ImageFile

from label_studio_sahi.errors import (
    ImageError,
    ImageForbidden,
    ImageFormatError,
    ImageTooLarge,
    ImageUnreachable,
    ImageURLError,
)
from label_studio_sahi.images.decode import decode_image, decode_pixels, rgb_pixels
from label_studio_sahi.images.fetch import ImageLoader, load_local_image

# --- images ---------------------------------------------------------------------------


def noise_png(size: int = 64) -> bytes:
    rng = __import__("random").Random(0)
    pixels = bytes(rng.randrange(256) for _ in range(size * size * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(out, "PNG")
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (8, 8), 3).save(out, "GIF")
    return out.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


# --- URL kinds --------------------------------------------------------------------------


def test_upload_url_is_fetched_from_label_studio_with_legacy_token(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png(24, 16)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load("/data/upload/1/x.png")
    assert image.mode == "RGB" and image.size == (24, 16)
    assert [s.authorization for s in servers.state.requests_to("ls")] == [f"Token {LEGACY}"]


def test_label_studio_url_with_trailing_slash_is_joined_cleanly(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()
    with ImageLoader(make_settings(servers.ls + "/")) as loader:
        loader.load("/data/upload/1/x.png")
    assert servers.state.requests_to("ls")[0].path == "/data/upload/1/x.png"


def test_upload_url_without_label_studio_url_asks_for_it(servers: Servers) -> None:
    with ImageLoader(make_settings(None)) as loader, pytest.raises(ImageURLError) as err:
        loader.load("/data/upload/1/x.png")
    assert "LABEL_STUDIO_URL" in str(err.value)


def test_absolute_url_on_label_studio_origin_gets_the_token(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png()
    with ImageLoader(make_settings(servers.ls)) as loader:
        loader.load(f"{servers.ls}/data/upload/1/x.png")
    assert servers.state.requests_to("ls")[0].authorization == f"Token {LEGACY}"


def test_plain_http_url_elsewhere_never_gets_the_token(servers: Servers) -> None:
    # Same host, another port: another origin.
    servers.state.files["pic.png"] = png(10, 12)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load(f"{servers.other}/public/pic.png")
    assert image.size == (10, 12)
    assert [s.authorization for s in servers.state.requests_to("other")] == [None]
    assert servers.state.requests_to("ls") == []


def test_redirect_from_label_studio_to_another_origin_drops_the_token(servers: Servers) -> None:
    servers.state.files["moved.png"] = png(5, 7)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load(f"{servers.ls}/data/redirect-away/moved.png")
    assert image.size == (5, 7)
    assert servers.state.requests_to("ls")[0].authorization == f"Token {LEGACY}"
    assert [s.authorization for s in servers.state.requests_to("other")] == [None]


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/dir/a b.png",
        "gs://bucket/c.png",
        "gcs://bucket/d.png",
        "azure-blob://box/e.png",
    ],
)
def test_cloud_uri_is_presigned_by_label_studio_and_signed_url_gets_no_token(
    servers: Servers, uri: str
) -> None:
    name = uri.rsplit("/", 1)[-1]
    servers.state.files[name] = png(9, 9)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load(uri, task_id=7)
    assert image.size == (9, 9)
    (presign,) = servers.state.requests_to("ls")
    assert presign.path == "/tasks/7/presign/"
    assert base64.urlsafe_b64decode(presign.query["fileuri"][0]).decode() == uri
    assert presign.authorization == f"Token {LEGACY}"
    (signed,) = servers.state.requests_to("other")
    assert signed.authorization is None
    assert signed.query["X-Amz-Signature"] == ["s3cr3t"]


def test_cloud_uri_without_task_id_is_refused(servers: Servers) -> None:
    with ImageLoader(make_settings(servers.ls)) as loader, pytest.raises(ImageURLError) as err:
        loader.load("s3://bucket/x.png")
    assert "task id" in str(err.value)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("file:///etc/passwd", "file"),
        ("ftp://example.com/x.png", "ftp"),
        ("data:image/png;base64,AAAA", "data"),
        ("", "empty"),
        ("   ", "empty"),
        (42, "int"),
        (None, "NoneType"),
        ("images/x.png", "/data/"),
        ("//example.com/x.png", "scheme"),
    ],
)
def test_unsupported_urls_are_refused_naming_the_problem(
    servers: Servers, url: Any, named: str
) -> None:
    with ImageLoader(make_settings(servers.ls)) as loader, pytest.raises(ImageURLError) as err:
        loader.load(url)
    assert named in str(err.value)
    assert servers.state.seen == []


# --- local files ------------------------------------------------------------------------


def test_local_files_are_read_directly_under_the_document_root(
    servers: Servers, tmp_path: Path
) -> None:
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "sub dir" / "a+b.png").write_bytes(png(3, 4))
    settings = make_settings(servers.ls, local_files_document_root=tmp_path)
    with ImageLoader(settings) as loader:
        relative = loader.load("/data/local-files/?d=sub%20dir/a%2Bb.png")
        absolute = loader.load(f"{servers.ls}/data/local-files/?d=sub%20dir/a%2Bb.png")
    assert relative.size == absolute.size == (3, 4)
    assert servers.state.seen == []  # Label Studio was never asked


def test_local_files_work_without_label_studio_url(servers: Servers, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(png(3, 4))
    settings = make_settings(None, None, local_files_document_root=tmp_path)
    with ImageLoader(settings) as loader:
        assert loader.load("/data/local-files/?d=x.png").size == (3, 4)


def test_local_files_without_root_are_fetched_from_label_studio(servers: Servers) -> None:
    servers.state.files["imgs/x.png"] = png(6, 2)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load("/data/local-files/?d=imgs/x.png")
    assert image.size == (6, 2)
    (seen,) = servers.state.requests_to("ls")
    assert seen.query["d"] == ["imgs/x.png"] and seen.authorization == f"Token {LEGACY}"


@pytest.mark.parametrize(
    "d", ["../secret.png", "%2e%2e/secret.png", "sub/../../secret.png", "/../secret.png"]
)
def test_local_files_dotdot_escape_is_forbidden(tmp_path: Path, d: str) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(png())
    settings = make_settings(None, None, local_files_document_root=root)
    with ImageLoader(settings) as loader, pytest.raises(ImageForbidden) as err:
        loader.load(f"/data/local-files/?d={d}")
    assert "LOCAL_FILES_DOCUMENT_ROOT" in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_local_files_symlink_escape_is_forbidden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png())
    (root / "inside.png").write_bytes(png(2, 2))
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "dirlink").symlink_to(tmp_path)
    (root / "ok-link.png").symlink_to(root / "inside.png")
    settings = make_settings(None, None, local_files_document_root=root)
    with ImageLoader(settings) as loader:
        for d in ("link.png", "dirlink/secret.png"):
            with pytest.raises(ImageForbidden):
                loader.load(f"/data/local-files/?d={d}")
        assert loader.load("/data/local-files/?d=ok-link.png").size == (2, 2)


def test_missing_local_file_names_the_path_relative_to_the_root(tmp_path: Path) -> None:
    settings = make_settings(None, None, local_files_document_root=tmp_path)
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load("/data/local-files/?d=sub/missing.png")
    assert "'sub/missing.png'" in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_local_file_over_the_byte_limit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(noise_png())
    settings = make_settings(None, None, local_files_document_root=tmp_path, max_image_bytes=1000)
    with ImageLoader(settings) as loader, pytest.raises(ImageTooLarge) as err:
        loader.load("/data/local-files/?d=x.png")
    assert "MAX_IMAGE_BYTES" in str(err.value)


def test_load_local_image_for_the_cli(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(jpeg_with_orientation(40, 20, 6))
    settings = make_settings()
    assert load_local_image(tmp_path / "x.jpg", settings).size == (20, 40)
    with pytest.raises(ImageUnreachable):
        load_local_image(tmp_path / "nope.png", settings)
    with pytest.raises(ImageUnreachable):
        load_local_image(tmp_path, settings)  # a directory


# --- network limits -----------------------------------------------------------------------


def test_slow_server_times_out_naming_the_setting(servers: Servers) -> None:
    settings = make_settings(servers.ls, image_read_timeout=0.2)
    started = time.monotonic()
    with ImageLoader(settings) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/slow")
    assert time.monotonic() - started < 0.9
    assert "timed out" in str(err.value) and "IMAGE_READ_TIMEOUT" in str(err.value)


def test_connect_timeout_names_the_setting() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    with (
        ImageLoader(make_settings(egress_allow=["example.invalid"]), client=client) as loader,
        pytest.raises(ImageUnreachable) as err,
    ):
        loader.load("http://example.invalid/x.png")
    assert "timed out" in str(err.value) and "IMAGE_CONNECT_TIMEOUT" in str(err.value)
    client.close()


def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ImageLoader(make_settings()) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"http://127.0.0.1:{port}/x.png")
    assert "cannot connect" in str(err.value)


@pytest.mark.parametrize("code", [404, 500, 503])
def test_http_error_status_is_unreachable_with_the_code(servers: Servers, code: int) -> None:
    with ImageLoader(make_settings(servers.ls)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/status/{code}")
    assert str(code) in str(err.value)


def test_redirect_loop_is_bounded(servers: Servers) -> None:
    with ImageLoader(make_settings(servers.ls)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/loop")
    assert "redirects" in str(err.value)
    assert len(servers.state.seen) <= 6


def test_declared_content_length_over_the_limit_is_refused_before_reading(
    servers: Servers,
) -> None:
    settings = make_settings(servers.ls, max_image_bytes=100_000)
    with ImageLoader(settings) as loader, pytest.raises(ImageTooLarge) as err:
        loader.load(f"{servers.ls}/big-declared")
    assert "MAX_IMAGE_BYTES" in str(err.value) and "50.0 MiB" in str(err.value)


def test_undeclared_body_over_the_limit_stops_the_download_early(servers: Servers) -> None:
    settings = make_settings(servers.ls, max_image_bytes=100_000)
    with ImageLoader(settings) as loader, pytest.raises(ImageTooLarge) as err:
        loader.load(f"{servers.ls}/big-undeclared")
    assert "MAX_IMAGE_BYTES" in str(err.value)
    deadline = time.monotonic() + 2
    while servers.state.streamed_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 < servers.state.streamed_bytes < 32 * 2**20  # the server was cut off


def test_body_shorter_than_its_content_length_is_unreachable(servers: Servers) -> None:
    with ImageLoader(make_settings(servers.ls)) as loader, pytest.raises(ImageUnreachable) as err:
        loader.load(f"{servers.ls}/short-body")
    assert "closed before" in str(err.value)


# --- decoding -----------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The header claims 5000x5000 but there are no pixels behind it: only a header check
    # can answer "too large" rather than "truncated".
    settings = make_settings(max_image_pixels=1_000_000)
    with pytest.raises(ImageTooLarge) as err:
        decode_image(png_header_claiming(5000, 5000), settings)
    message = str(err.value)
    assert "5000x5000" in message and "25 megapixels" in message
    assert "MAX_IMAGE_PIXELS" in message


def test_decompression_bomb_header_is_too_large() -> None:
    with pytest.raises(ImageTooLarge) as err:
        decode_image(png_header_claiming(100_000, 100_000), make_settings())
    assert "MAX_IMAGE_PIXELS" in str(err.value) and "megapixels" in str(err.value)


def test_pixel_limit_applies_to_downloads(servers: Servers) -> None:
    servers.state.files["1/x.png"] = png(20, 20)
    with (
        ImageLoader(make_settings(servers.ls, max_image_pixels=100)) as loader,
        pytest.raises(ImageTooLarge) as err,
    ):
        loader.load("/data/upload/1/x.png")
    assert "20x20" in str(err.value)


def test_format_outside_the_allowed_list_is_refused_naming_both() -> None:
    settings = make_settings(allowed_image_formats=["PNG", "JPEG"])
    with pytest.raises(ImageFormatError) as err:
        decode_image(gif(), settings)
    message = str(err.value)
    assert "GIF" in message and "ALLOWED_IMAGE_FORMATS" in message and "PNG, JPEG" in message
    # Allowed by default.
    assert decode_image(gif(), make_settings()).mode == "RGB"


def test_comma_separated_formats_setting_is_honoured() -> None:
    settings = make_settings(allowed_image_formats="png, jpeg")
    with pytest.raises(ImageFormatError):
        decode_image(gif(), settings)
    assert decode_image(png(), settings).size == (24, 16)


def test_truncated_image_fails_even_when_pil_is_told_to_load_truncated_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = noise_png()
    with pytest.raises(ImageFormatError) as err:
        decode_image(data[: len(data) // 2], make_settings())
    assert "the PNG is truncated" in str(err.value)  # image_checks names the problem
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as found


@pytest.mark.parametrize("data", [b"", b"hello, not an image", png()[:20]])
def test_undecodable_bytes_are_a_format_error(data: bytes) -> None:
    with pytest.raises(ImageFormatError) as err:
        decode_image(data, make_settings())
    assert "truncated or not an image" in str(err.value)


def test_exif_orientation_is_applied(servers: Servers) -> None:
    servers.state.files["1/phone.jpg"] = jpeg_with_orientation(40, 20, 6)
    with ImageLoader(make_settings(servers.ls)) as loader:
        image = loader.load("/data/upload/1/phone.jpg")
    assert image.size == (20, 40)
    assert image.mode == "RGB"


def test_transparent_and_16_bit_images_become_rgb() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(out, "PNG")
    rgba = decode_image(out.getvalue(), make_settings())
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)

    deep = Image.new("I;16", (4, 4), 0)
    deep.putpixel((1, 1), 30000)
    deep.putpixel((2, 2), 60000)
    out = io.BytesIO()
    deep.save(out, "PNG")
    grey = decode_image(out.getvalue(), make_settings())
    assert grey.mode == "RGB"
    assert grey.getpixel((0, 0)) == (0, 0, 0)
    assert grey.getpixel((2, 2)) == (255, 255, 255)
    middle = grey.getpixel((1, 1))
    assert isinstance(middle, tuple) and 100 < middle[0] < 155  # scaled, not clipped


def test_error_messages_never_contain_the_token(servers: Servers, tmp_path: Path) -> None:
    # The access token Label Studio issues is a secret too.
    servers.state.files["bad.png"] = b"not an image"
    urls = [
        "/data/upload/missing.png",
        "/data/upload/bad.png",
        f"{servers.ls}/status/500",
        f"{servers.ls}/short-body",
        f"{servers.ls}/data/local-files/?d=../../etc/passwd",
        "ftp://x/y.png",
        "s3://bucket/none.png",
    ]
    for key in (LEGACY, PAT):
        with ImageLoader(make_settings(servers.ls, key)) as loader:
            for url in urls:
                with pytest.raises(ImageError) as err:
                    loader.load(url, task_id=1 if url.startswith("s3") else None)
                assert_secret_free(err.value, *servers.state.valid_access)


# --- pixels straight from the decoder ------------------------------------------------


def encoded(mode: str, fmt: str, size: tuple[int, int] = (97, 61)) -> bytes:
    rng = np.random.default_rng(0)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8).squeeze()
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encoded("RGB", "JPEG"), id="jpeg"),
        pytest.param(encoded("L", "JPEG"), id="grey-jpeg"),
        pytest.param(encoded("RGB", "PNG"), id="png"),
        pytest.param(encoded("L", "PNG"), id="grey-png"),
        pytest.param(encoded("RGBA", "PNG"), id="transparent-png"),  # PIL: onto white
        pytest.param(jpeg_with_orientation(40, 20, 6), id="rotated-jpeg"),  # PIL: turned
        pytest.param(gif(), id="gif"),
    ],
)
def test_pixels_decoded_directly_equal_pil_decoding_then_converting(data: bytes) -> None:
    settings = make_settings()
    want = rgb_pixels(decode_image(data, settings))
    got = decode_pixels(data, settings)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)


def test_a_truncated_jpeg_is_refused_by_the_direct_decoder_too() -> None:
    data = encoded("RGB", "JPEG", (400, 300))
    with pytest.raises(ImageFormatError) as err:
        decode_pixels(data[: len(data) // 2], make_settings())
    assert "the JPEG is truncated" in str(err.value)


def test_large_images_are_decoded_without_a_second_copy() -> None:
    # torchvision's one array, not PIL's image beside it (4 bytes a pixel) and a conversion.
    data = encoded("RGB", "PNG", (300, 200))
    pixels = decode_pixels(data, make_settings())
    assert isinstance(pixels.base, torch.Tensor)  # the decoder's own buffer, not a copy
