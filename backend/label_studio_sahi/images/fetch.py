"""Turn the image URL of a Label Studio task into a checked RGB ``PIL.Image``.

Label Studio's ML backend contract sends tasks as they are stored: the image is a URL in the
task's ``data`` under the key the labeling config's ``<Image value="$key">`` names, and the
backend must fetch the bytes itself. These URLs come in several kinds:

* ``/data/upload/...`` and other ``/data/...`` paths: files served by Label Studio itself,
  fetched from ``LABEL_STUDIO_URL`` with the API token;
* ``/data/local-files/?d=<path>``: Label Studio's local storage. When this backend can see
  the same folder (``LOCAL_FILES_DOCUMENT_ROOT``) the file is read directly, which is
  faster and needs no token; paths that resolve outside the root are refused;
* ``http(s)://``: anywhere. The token is attached only when the URL is on Label Studio's
  own origin, and httpx drops it when a redirect leaves that origin;
* ``s3://``, ``gs://``/``gcs://``, ``azure-blob://``: cloud storage, presigned by Label
  Studio (``/tasks/<id>/presign/?fileuri=<base64url>``) which redirects to a signed URL.

The Label Studio SDK's downloader has no timeout and no size cap. Here every download has
connect/read timeouts, a byte cap enforced from ``Content-Length`` *and* while streaming,
and every decode checks the format and the pixel count from the header before any pixel
is decoded. Each failure is one of the ``ImageError`` subclasses with a one-line message
naming the setting to change; messages never contain the token (they are returned to
Label Studio and logged).
"""

from __future__ import annotations

import base64
import logging
import re
import stat
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import numpy as np
from PIL import Image

from label_studio_sahi.errors import (
    ImageError,
    ImageForbidden,
    ImageTooLarge,
    ImageUnreachable,
    ImageURLError,
)
from label_studio_sahi.images.decode import (
    EncodedImage,
    decode_image,
    decode_pixels,
    open_encoded,
    size_text,
)
from label_studio_sahi.images.egress import EgressPolicy, pinned_transport
from label_studio_sahi.labelstudio.tokens import LabelStudioAuth, TokenRefreshError, same_origin
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "azure-blob"})
LOCAL_FILES_PATH = "/data/local-files"
MAX_REDIRECTS = 5
RATE_GRACE_SECONDS = 5.0  # a slow start (TLS, a cold storage) is not a drip yet
PRESIGN_PATH = re.compile(r"/tasks/\d+/presign/?")
_MAX_SHOWN_URL = 200


# --- local files ----------------------------------------------------------------------


def _read_file(path: Path, shown: str, settings: Settings) -> bytes:
    """Read at most MAX_IMAGE_BYTES from a regular file; ``shown`` names it in errors."""
    limit = settings.max_image_bytes
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the worker forever
            raise ImageUnreachable(f"{shown} is not a regular file")
        if info.st_size > limit:
            raise ImageTooLarge(
                f"{shown} is {size_text(info.st_size)}, over MAX_IMAGE_BYTES ({size_text(limit)})"
            )
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since stat()
    except FileNotFoundError:
        raise ImageUnreachable(f"no such file: {shown}") from None
    except PermissionError:
        raise ImageUnreachable(f"cannot read {shown}: permission denied") from None
    except OSError as exc:
        raise ImageUnreachable(f"cannot read {shown}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ImageTooLarge(f"{shown} is over MAX_IMAGE_BYTES ({size_text(limit)})")
    return data


def load_local_image(path: str | Path, settings: Settings) -> Image.Image:
    """Read and decode a local image file (the CLI's way in), with the same limits."""
    file = Path(path).expanduser()
    return decode_image(_read_file(file, str(path), settings), settings)


# --- the loader -----------------------------------------------------------------------


class ImageLoader:
    """Fetches task images by URL kind and decodes them with :func:`decode_image`.

    Thread-safe: one loader (one connection pool, one token cache) serves all requests.
    ``client`` is for tests; by default the loader owns an ``httpx.Client`` configured
    from ``settings`` and closes it in :meth:`close`.
    """

    def __init__(self, settings: Settings, client: httpx.Client | None = None) -> None:
        self._settings = settings
        self._timeout = httpx.Timeout(
            connect=settings.image_connect_timeout,
            read=settings.image_read_timeout,
            write=settings.image_read_timeout,
            pool=settings.image_read_timeout,
        )
        self._ls_url = (settings.label_studio_url or "").strip().rstrip("/") or None
        key = settings.label_studio_api_key
        self._api_key = key.get_secret_value().strip() if key is not None else ""
        self._auth: LabelStudioAuth | None = None
        self._egress = EgressPolicy(settings.egress_allow, [self._ls_url])
        self._owns_client = client is None
        # Connections go only to the addresses the egress check approved (egress.py).
        self._client = client or httpx.Client(
            timeout=self._timeout, follow_redirects=False, transport=pinned_transport(self._egress)
        )
        if self._ls_url and self._api_key and urlsplit(self._ls_url).scheme in ("http", "https"):
            self._auth = LabelStudioAuth(self._api_key, self._ls_url)

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if the loader created it."""
        if self._owns_client:
            self._client.close()

    def load(self, url: str, task_id: int | None = None) -> Image.Image:
        """The task's image as RGB, EXIF-oriented; ``task_id`` is needed for cloud URLs."""
        data = self.fetch_bytes(url, task_id)
        try:
            return decode_image(data, self._settings)
        except ImageError as exc:
            raise self._scrubbed(exc) from None

    def load_pixels(self, url: str, task_id: int | None = None) -> np.ndarray:
        """``load``'s image as its HWC uint8 pixels, decoded without a second copy."""
        data = self.fetch_bytes(url, task_id)
        try:
            return decode_pixels(data, self._settings)
        except ImageError as exc:
            raise self._scrubbed(exc) from None

    def load_encoded(self, url: str, task_id: int | None = None) -> EncodedImage:
        """``load_pixels``'s image fetched and its header checked, not yet decoded: its size
        can be budgeted before ``EncodedImage.pixels`` decodes it."""
        data = self.fetch_bytes(url, task_id)
        try:
            return open_encoded(data, self._settings)
        except ImageError as exc:
            raise self._scrubbed(exc) from None

    def fetch_bytes(self, url: str, task_id: int | None = None) -> bytes:
        """The raw bytes behind a task URL, within MAX_IMAGE_BYTES (not decoded)."""
        try:
            return self._fetch(url, task_id)
        except ImageError as exc:
            raise self._scrubbed(exc) from None

    # --- dispatch by URL kind -----------------------------------------------------------

    def _fetch(self, url: object, task_id: int | None) -> bytes:
        if not isinstance(url, str):
            raise ImageURLError(f"the image URL must be a string, not {type(url).__name__}")
        url = url.strip()
        if not url:
            raise ImageURLError("the image URL is empty")
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ImageURLError(f"cannot parse the image URL {_shown(url)}") from None
        scheme = parts.scheme.lower()

        if not scheme and not parts.netloc:
            if not parts.path.startswith("/data/"):
                raise ImageURLError(
                    f"the image URL {_shown(url)} has no scheme and is not a Label Studio "
                    "/data/ path: use http(s)://, /data/upload/..., /data/local-files/?d=... "
                    "or a cloud storage URI"
                )
            if self._is_local_files(parts.path) and self._settings.local_files_document_root:
                return self._read_local_files(parts.query)
            return self._download(self._require_ls_url(url) + url, url, ls=True)

        if scheme in ("http", "https"):
            _check_host(url)
            ls_path = self._path_under_ls(url)
            if (
                ls_path is not None
                and self._is_local_files(ls_path)
                and self._settings.local_files_document_root
            ):
                return self._read_local_files(parts.query)
            return self._download(url, url, ls=ls_path is not None)

        if scheme in CLOUD_SCHEMES:
            return self._presigned(url, task_id)

        if not scheme:
            raise ImageURLError(
                f"the image URL {_shown(url)} has no scheme: use http:// or https://"
            )
        raise ImageURLError(
            f"unsupported image URL scheme '{scheme}:' in {_shown(url)}: use http(s)://, "
            "/data/upload/..., /data/local-files/?d=..., s3://, gs:// or azure-blob://"
        )

    def _require_ls_url(self, url: str) -> str:
        if not self._ls_url:
            raise ImageURLError(
                f"the image URL {_shown(url)} is served by Label Studio: set LABEL_STUDIO_URL "
                "(and LABEL_STUDIO_API_KEY) so this backend can fetch it"
            )
        if urlsplit(self._ls_url).scheme not in ("http", "https"):
            raise ImageURLError("LABEL_STUDIO_URL must start with http:// or https://")
        return self._ls_url

    def _path_under_ls(self, url: str) -> str | None:
        """The path of ``url`` relative to LABEL_STUDIO_URL, or None if it is elsewhere."""
        if not self._ls_url or not same_origin(url, self._ls_url):
            return None
        path = urlsplit(url).path
        prefix = urlsplit(self._ls_url).path.rstrip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return path[len(prefix) :] or "/"
        return path  # same origin without the prefix: still Label Studio's host

    @staticmethod
    def _is_local_files(path: str) -> bool:
        return path.rstrip("/") == LOCAL_FILES_PATH

    def _read_local_files(self, query: str) -> bytes:
        root = self._settings.local_files_document_root
        assert root is not None  # checked by the caller
        # Like Label Studio's own view: d= is form-decoded and taken relative to the root.
        values = parse_qs(query, keep_blank_values=True).get("d", [""])
        relative = values[0].lstrip("/")
        if not relative:
            raise ImageURLError("the /data/local-files/ URL has no file path in its d= parameter")
        if "\x00" in relative:
            raise ImageURLError("the /data/local-files/ path contains a NUL byte")
        try:
            root_resolved = root.expanduser().resolve()
            # resolve() follows symlinks: a link inside the root that points outside is caught.
            target = (root_resolved / relative).resolve()
        except (OSError, RuntimeError, ValueError):  # symlink loops, unreadable components
            raise ImageUnreachable(
                f"cannot resolve local file '{relative}' under LOCAL_FILES_DOCUMENT_ROOT"
            ) from None
        if not target.is_relative_to(root_resolved):
            raise ImageForbidden(
                f"local file '{relative}' resolves outside LOCAL_FILES_DOCUMENT_ROOT "
                "(through '..' or a symlink): refusing to read it"
            )
        shown = f"'{relative}' under LOCAL_FILES_DOCUMENT_ROOT"
        return _read_file(target, shown, self._settings)

    def _presigned(self, uri: str, task_id: int | None) -> bytes:
        if task_id is None or isinstance(task_id, bool):
            raise ImageURLError(
                f"the cloud storage URL {_shown(uri)} can only be fetched through Label "
                "Studio's presign endpoint, which needs the task id"
            )
        base = self._require_ls_url(uri)
        # Label Studio decodes fileuri with urlsafe_b64decode; httpx percent-encodes '='.
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode("ascii")
        presign = f"{base}/tasks/{int(task_id)}/presign/"
        return self._download(presign, uri, ls=True, params={"fileuri": fileuri})

    # --- HTTP -----------------------------------------------------------------------------

    def _download(
        self,
        url: str,
        original: str,
        *,
        ls: bool,
        params: dict[str, str] | None = None,
    ) -> bytes:
        """GET ``url`` streaming, within the byte cap, the deadline and the rate floor;
        ``original`` is the task's URL (for messages).

        Redirects are followed here, not by httpx, so that every hop passes the egress
        policy and the token goes only to Label Studio's own /data/ and presign paths: never
        to the storage a presign redirects to, nor to any other origin. ``auth`` is passed
        explicitly even when None, so that an injected client's own auth never applies.
        """
        where = _shown(original, keep_query=ls)
        started = time.monotonic()
        current, hops = url, 0
        while True:
            hop_where = where if hops == 0 else f"{where} (redirected to {_shown(current)})"
            auth = self._auth if ls and self._token_may_go_to(current) else None
            try:
                with (
                    # Checked at every hop; this hop connects only where the check approved.
                    self._egress.pinned(current, hop_where),
                    self._client.stream(
                        "GET",
                        current,
                        params=params if hops == 0 else None,
                        auth=auth,
                        follow_redirects=False,
                        timeout=self._timeout,
                        # Images are already compressed; identity also avoids gzip bombs.
                        headers={"Accept": "image/*, */*;q=0.5", "Accept-Encoding": "identity"},
                    ) as response,
                ):
                    location = response.headers.get("Location")
                    if response.is_redirect and location:
                        hops += 1
                        if hops > MAX_REDIRECTS:
                            raise ImageUnreachable(
                                f"more than {MAX_REDIRECTS} redirects while fetching {where}"
                            )
                        current = str(response.url.join(location))
                        if urlsplit(current).scheme not in ("http", "https"):
                            raise ImageURLError(f"{where} redirects to a non-http URL")
                        continue
                    self._check_status(response, hop_where, ls=ls and hops == 0)
                    return self._read_body(response, hop_where, started)
            except httpx.ConnectTimeout:
                raise ImageUnreachable(
                    f"timed out connecting for {hop_where} after "
                    f"{self._settings.image_connect_timeout:g} s (IMAGE_CONNECT_TIMEOUT)"
                ) from None
            except httpx.TimeoutException:
                raise ImageUnreachable(
                    f"timed out waiting for the image bytes of {hop_where} after "
                    f"{self._settings.image_read_timeout:g} s (IMAGE_READ_TIMEOUT)"
                ) from None
            except TokenRefreshError as exc:
                raise ImageUnreachable(
                    f"{exc}; check LABEL_STUDIO_API_KEY (needed for {where})"
                ) from None
            except httpx.ConnectError:
                # Not the OS's reason: it would tell a port scan which ports are open.
                raise ImageUnreachable(f"cannot connect to the server of {hop_where}") from None
            except httpx.RemoteProtocolError:
                raise ImageUnreachable(
                    f"the connection closed before the whole image of {hop_where} arrived"
                ) from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol):
                raise ImageURLError(f"invalid image URL {hop_where}") from None
            except httpx.HTTPError as exc:
                raise ImageUnreachable(f"cannot fetch {hop_where}: {type(exc).__name__}") from None

    def _read_body(self, response: httpx.Response, where: str, started: float) -> bytes:
        limit = self._settings.max_image_bytes
        deadline = self._settings.image_download_deadline
        floor = self._settings.image_min_bytes_per_second
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(
                f"{where} is {size_text(int(declared))}, over MAX_IMAGE_BYTES ({size_text(limit)})"
            )
        chunks: list[bytes] = []
        received = 0
        first_byte_at: float | None = None
        for chunk in response.iter_bytes():
            if not chunk:
                continue
            if first_byte_at is None:
                first_byte_at = time.monotonic()
            received += len(chunk)
            if received > limit:  # Content-Length missing or lying: stop here
                raise ImageTooLarge(
                    f"{where} is over MAX_IMAGE_BYTES ({size_text(limit)}); stopped downloading"
                )
            chunks.append(chunk)
            now = time.monotonic()
            if now - started > deadline:
                raise ImageUnreachable(
                    f"{where} took over {deadline:g} s to download (IMAGE_DOWNLOAD_DEADLINE)"
                )
            # The rate counts from the first byte: waiting for it is IMAGE_READ_TIMEOUT's
            # business, and a server that thinks, then sends a small image whole, is no drip.
            flowing = now - first_byte_at
            if flowing > RATE_GRACE_SECONDS and received < floor * flowing:
                raise ImageUnreachable(
                    f"{where} arrives at {received / flowing:.0f} bytes/s, below "
                    f"IMAGE_MIN_BYTES_PER_SECOND ({floor}); stopped downloading"
                )
        return b"".join(chunks)

    def _token_may_go_to(self, url: str) -> bool:
        """Label Studio's own origin, and there only its file paths: /data/... and the
        presign endpoint (``/tasks/<id>/presign/``), with no dot segments in the path."""
        if not self._ls_url or not same_origin(url, self._ls_url):
            return False
        # As the server will route it: dot segments resolved, percent-escapes decoded.
        path = httpx.URL(url).path
        if ".." in path.split("/"):  # /data/upload/%2e%2e/%2e%2e/api/... stays a traversal
            return False
        prefix = urlsplit(self._ls_url).path.rstrip("/")
        if prefix:
            if not path.startswith(prefix + "/"):
                return False
            path = path[len(prefix) :]
        return path.startswith("/data/") or PRESIGN_PATH.fullmatch(path) is not None

    def _check_status(self, response: httpx.Response, where: str, *, ls: bool) -> None:
        code = response.status_code
        if code < 400:
            return
        final = str(response.url)
        # Judge by where the answer came from: after a presign redirect, a 403 comes from
        # the storage (an expired signature), not from Label Studio refusing the token.
        by_ls = ls and self._ls_url is not None and same_origin(final, self._ls_url)
        if response.history and not by_ls:
            where = f"{where} (redirected to {_shown(final)})"
        if by_ls and code in (401, 403):
            if self._api_key:
                raise ImageUnreachable(
                    f"Label Studio refused the token (HTTP {code}) for {where}: "
                    "check LABEL_STUDIO_API_KEY"
                )
            raise ImageUnreachable(
                f"Label Studio answered HTTP {code} for {where}: set LABEL_STUDIO_API_KEY "
                "to a token of a Label Studio user"
            )
        if code == 404:
            raise ImageUnreachable(f"image not found (HTTP 404) at {where}")
        raise ImageUnreachable(f"the image server answered HTTP {code} for {where}")

    def _scrubbed(self, exc: ImageError) -> ImageError:
        """The same error, its message guaranteed free of the API key."""
        if self._api_key and self._api_key in exc.message:
            return type(exc)(exc.message.replace(self._api_key, "**********"))
        return exc


def _check_host(url: str) -> None:
    """An http(s) URL must name a host that DNS could look up (IDNA: labels of 1-63 chars)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise ImageURLError(f"the image URL {_shown(url)} has no host")
        host.encode("idna")
        _ = parts.port  # ValueError when out of range or not a number
    except (UnicodeError, ValueError):
        raise ImageURLError(f"the image URL {_shown(url)} has an invalid host name") from None


def _shown(url: str, *, keep_query: bool = False) -> str:
    """A URL fit for an error message: no credentials, no query of foreign URLs, bounded.

    Query strings of presigned URLs carry signatures, so only Label Studio's own URLs
    (``keep_query``) and relative ones keep theirs, where ``?d=`` names the file.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    if parts.scheme in ("http", "https"):
        netloc = parts.hostname or ""
        if port is not None:
            netloc = f"{netloc}:{port}"
        query = parts.query if keep_query else ("..." if parts.query else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    elif parts.scheme:
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    if len(url) > _MAX_SHOWN_URL:
        url = url[: _MAX_SHOWN_URL - 3] + "..."
    return f"'{url}'"
