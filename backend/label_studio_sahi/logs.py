"""Structured logging: one event per line as ``key=value`` pairs; secrets never printed.

Code logs events like ``log.info("model_loaded version=%s", version)``. Request bodies are
never logged (they carry Label Studio tokens and storage credentials); as a last guard, a
filter masks anything that looks like a token in a formatted line.
"""

from __future__ import annotations

import logging
import re
import sys

# Authorization headers, JWTs and 40-hex legacy tokens, wherever they appear in a message.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(token|bearer|basic)\s+[A-Za-z0-9._\-+/=]{8,}"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"),
    re.compile(r"\b[0-9a-f]{40}\b"),
    re.compile(r"(?i)(access_token|password|api_key|secret)([\"']?\s*[:=]\s*[\"']?)[^\s,\"'}]+"),
)


def redact(text: str) -> str:
    """``text`` with anything token-like replaced by ``***``."""
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)} ***", text)
    text = _SECRET_PATTERNS[1].sub("***", text)
    text = _SECRET_PATTERNS[2].sub("***", text)
    return _SECRET_PATTERNS[3].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(level: str = "INFO") -> None:
    """Route the backend's, uvicorn's and rq's loggers through one redacting handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request URL at INFO; URLs can carry presigned signatures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
