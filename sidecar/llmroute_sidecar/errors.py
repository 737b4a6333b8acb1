"""Error answers: one JSON shape for every error the sidecar produces.

``{"error": {"message", "type", "param", "code"}, "request_id"}``, as OpenAI answers (``param`` names the
offending request field, null when none applies), with the request id repeated in ``X-Request-ID``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class ProxyError(Exception):
    """An error answer decided by the sidecar (not relayed from the upstream)."""

    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    outcome: str = "client_error"
    headers: Mapping[str, str] = field(default_factory=dict)
    param: str | None = None
    """The request field at fault (OpenAI's ``param``), e.g. ``messages[0].role``."""

    def body(self, request_id: str) -> dict[str, object]:
        """The JSON error body."""
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
            "request_id": request_id,
        }

    def response(self, request_id: str) -> web.Response:
        """The error as an aiohttp response."""
        headers = {**self.headers, "X-Request-ID": request_id}
        return web.Response(
            status=self.status,
            body=json.dumps(self.body(request_id), separators=(",", ":")).encode(),
            content_type="application/json",
            headers=headers,
        )


def bad_request(code: str, message: str, status: int = 400, param: str | None = None) -> ProxyError:
    """A refused request (400 unless ``status`` says otherwise): never retried by OpenAI SDKs."""
    return ProxyError(status, code, message, "invalid_request_error", "validation_error", param=param)


def unauthorized(code: str, message: str) -> ProxyError:
    return ProxyError(401, code, message, "authentication_error", "unauthorized")


def overloaded(code: str, message: str, outcome: str = "overloaded", retry_after: int = 1) -> ProxyError:
    return ProxyError(503, code, message, "overloaded_error", outcome, {"Retry-After": str(retry_after)})


def upstream_failed(message: str) -> ProxyError:
    return ProxyError(502, "upstream_error", message, "upstream_error", "upstream_error")


def deadline_exceeded(seconds: float) -> ProxyError:
    return ProxyError(
        504,
        "deadline_exceeded",
        f"the request did not complete within its deadline of {seconds:g}s",
        "timeout_error",
        "deadline_exceeded",
    )
