"""Structured JSON logs: one object per line; one access-log line per request (no keys, no bodies)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

ACCESS_LOGGER = "llmroute.access"
REDACTED = "[REDACTED]"
#: Credential-bearing header values, ``Bearer`` tokens and ``sk-`` style keys, wherever they appear.
_SECRET_PATTERNS = (
    re.compile(
        r"(?i)((?:proxy-)?authorization|api-key|x-api-key|cookie|set-cookie)(\\?['\"]?\s*[:=]\s*)"
        r"(?:(?!\\[rn])[^\r\n'\"])*"  # up to the line's end, also a repr'd ``\r``/``\n``
    ),
    re.compile(r"(?i)(bearer|basic)(\s+)[A-Za-z0-9._~+/=\-]+"),
    re.compile(r"()()\bsk-[A-Za-z0-9_\-]{4,}"),
)
_CORE_KEYS = frozenset({"ts", "level", "logger", "msg", "exc"})


def redact(text: str) -> str:
    """``text`` with credential header values, bearer tokens and ``sk-`` keys replaced."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return text


class RedactingFilter(logging.Filter):
    """Redacts credentials from a record's message, arguments and exception text (any logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields, "exc"?}`` per record, on one line.

    ``fields`` come from ``extra={"fields": {...}}``; one that collides with a core key is written as
    ``field_<name>`` rather than overwriting it.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out[f"field_{key}" if key in _CORE_KEYS else str(key)] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Log every record as one JSON line to ``stream`` (default stdout) at ``level`` and above.

    Idempotent: replaces a handler installed by an earlier call; other root handlers are kept.
    """
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())  # on the handler: library loggers' records pass it too
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours, in another format.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def key_id(raw_key: str) -> str:
    """A short, non-reversible id of a client key, safe for logs: first 12 hex of its sha256."""
    return hashlib.sha256(raw_key.encode()).hexdigest()[:12]


def strip_query(path: str) -> str:
    """The path without query string or fragment (queries may carry keys)."""
    return path.split("?", 1)[0].split("#", 1)[0]


@dataclass(frozen=True)
class AccessRecord:
    """What one request did; never a raw key or a body.

    ``client`` is a tier name or a ``key_id``; ``limit`` names the limit that rejected the request.
    """

    request_id: str
    trace_id: str
    route: str
    method: str
    path: str
    status: int
    outcome: str
    duration_ms: float
    upstream_ms: float | None = None
    attempts: int = 0
    stream: bool = False
    tokens_reserved: int = 0
    tokens_actual: int | None = None
    limit: str | None = None
    client: str | None = None
    queue_wait_ms: float = 0.0
    client_disconnected: bool = False
    error: str | None = None
    upstream: str | None = None
    """Name of the upstream that answered (spec.upstreams; 'default' for spec.upstream)."""


#: The access line's fields, in order (an ``AccessRecord``'s).
_ACCESS_FIELDS = tuple(field.name for field in dataclasses.fields(AccessRecord))
_ACCESS_HEAD = '"level":"INFO","logger":"' + ACCESS_LOGGER + '","msg":"access",'


class AccessLog:
    """Writes one ``msg="access"`` line per request on the ``llmroute.access`` logger.

    As shipped (``configure_logging``'s one JSON handler, nothing else listening), the line is built
    here and the lines of one event-loop turn reach that handler's stream in one write (stdout is
    unbuffered in the images: a write per line is a system call per request): the same bytes the
    handler would write, at a fraction of the logging machinery's cost. Any other logging set-up
    (extra handlers, filters, a logger given here) gets each line through ``logging``. ``flush``
    writes what is pending (the sidecar calls it when it stops).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        self._direct_allowed = logger is None
        self._pending: list[str] = []
        self._pending_handler: _JsonHandler | None = None
        self._second = -1
        self._stamp = ""

    def write(self, record: AccessRecord) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        path = record.path
        if "?" in path or "#" in path:
            record = dataclasses.replace(record, path=strip_query(path))
        handler = self._direct_handler()
        if handler is None:
            fields = {name: getattr(record, name) for name in _ACCESS_FIELDS}
            self._log.info("access", extra={"fields": fields})
            return
        encoded = orjson.dumps(record, default=str).decode()  # its fields in order, as the dict
        self._pending.append('{"ts":"' + self._timestamp() + '",' + _ACCESS_HEAD + encoded[1:] + "\n")
        if self._pending_handler is None:
            self._pending_handler = handler
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # outside an event loop: nothing to batch with
                self.flush()

    def _direct_handler(self) -> _JsonHandler | None:
        """The shipped JSON handler when it alone would see the access record; else None."""
        if not self._direct_allowed:
            return None
        log = self._log
        if log.handlers or log.filters or not log.propagate or log.disabled:
            return None
        root = logging.getLogger()
        handlers = root.handlers
        if len(handlers) != 1 or type(handlers[0]) is not _JsonHandler or root.filters:
            return None
        handler = handlers[0]
        return handler if handler.level <= logging.INFO else None

    def _timestamp(self) -> str:
        """Now as the JSON formatter writes it (UTC, milliseconds, ``Z``); the seconds part is cached."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def flush(self) -> None:
        """Write the pending lines in one go and flush the stream."""
        handler, self._pending_handler = self._pending_handler, None
        lines, self._pending = self._pending, []
        if handler is None or not lines:
            return
        handler.acquire()
        try:
            handler.stream.write("".join(lines))
            handler.flush()
        except (OSError, ValueError):  # a closed or broken stdout must not fail a request
            handler.handleError(logging.makeLogRecord({"msg": "access", "name": ACCESS_LOGGER}))
        finally:
            handler.release()
