"""Errors a user can act on, each with the HTTP status it maps to.

Everything the server answers with a 4xx/5xx JSON error is one of these; the message
names the problem and, where there is one, the setting that governs it.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` a stable machine-readable name."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, object]:
        return {"error": self.code, "detail": self.message, "status_code": self.status}


class InternalError(BackendError):
    """A bug or an unforeseen failure; the detail names the exception type, the log the rest."""


class HTTPError(BackendError):
    """An HTTP-level error of the web framework itself: an unknown route (404), a wrong method
    (405). Its status is the framework's."""

    code = "http_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class BadRequest(BackendError):
    """The request itself is malformed (not JSON, missing fields, too many tasks)."""

    status = 400
    code = "bad_request"


class NotFound(BackendError):
    """A project's version (or its file) that does not exist."""

    status = 404
    code = "not_found"


class RequestTooLarge(BadRequest):
    """The request body or its batch of tasks is above MAX_REQUEST_BYTES / MAX_TASKS_PER_REQUEST."""

    status = 413
    code = "request_too_large"


class Unauthorized(BackendError):
    """Basic auth is configured (BASIC_AUTH_USER) and the request did not pass it."""

    status = 401
    code = "unauthorized"


class LabelConfigError(BackendError):
    """The labeling config has nothing this backend can predict, or is not valid XML."""

    status = 422
    code = "unsupported_label_config"


class ImageError(BackendError):
    """A task's image could not be used. Subclasses say why."""

    status = 422
    code = "image_error"


class ImageURLError(ImageError):
    """The URL kind is unknown or cannot be resolved with the current settings."""

    status = 400
    code = "bad_image_url"


class ImageForbidden(ImageError):
    """The URL points somewhere this backend must not read (a path outside the root)."""

    status = 403
    code = "image_forbidden"


class ImageUnreachable(ImageError):
    """The image server could not be reached, timed out or answered an error status."""

    status = 424
    code = "image_unreachable"


class ImageTooLarge(ImageError):
    """The image exceeds MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS."""

    status = 413
    code = "image_too_large"


class ImageFormatError(ImageError):
    """The bytes are not a decodable image of an allowed format (or are truncated)."""

    status = 415
    code = "unsupported_image"


class Busy(BackendError):
    """A shared resource (a lock, Redis) did not answer in time; trying again may work."""

    status = 503
    code = "busy"


class ModelLoadError(BackendError):
    """A model could not be loaded from a hub id or local folder."""

    status = 503
    code = "model_unavailable"
