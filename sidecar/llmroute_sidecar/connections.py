"""Client connections: a header-read timeout, a cap on open connections, JSON parser errors.

aiohttp's ``RequestHandler`` has no header timeout and answers unparsable requests with a text body
that quotes the raw line (credentials included). ``GuardedHandler`` adds: a timer from accept (or
the end of the previous response) until a request's headers are complete, which closes the
connection with a 408; a cap on open connections beyond which new ones get a 503 and are closed;
and a JSON 400 for requests that fail HTTP parsing, without the offending bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.tracing import request_id

log = logging.getLogger("llmroute.connections")


@dataclass
class ConnectionGuard:
    """Shared by the connections of one listener: its limits and its open count."""

    listener: str
    metrics: SidecarMetrics
    header_timeout: float
    max_connections: int = 0
    """0: no cap."""
    open: int = 0

    def admit(self) -> bool:
        if self.max_connections and self.open >= self.max_connections:
            self.metrics.connections_rejected_total.labels(self.listener, "max_connections").inc()
            return False
        self.open += 1
        self.metrics.connections_open.labels(self.listener).set(self.open)
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.connections_open.labels(self.listener).set(self.open)


def raw_error(status: int, reason: str, code: str, message: str, kind: str) -> bytes:
    """A complete HTTP/1.1 error response (JSON body, connection closed), for writing to a transport."""
    rid = request_id(None)
    body = json.dumps(
        {"error": {"message": message, "type": kind, "code": code}, "request_id": rid},
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHandler(RequestHandler):
    """``RequestHandler`` with a header-read timeout, a connection cap and JSON parse errors."""

    __slots__ = ("_admitted", "_guard", "_header_timer", "_headers_due", "_seen_requests")

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_due: float | None = None
        """When the awaited request's headers are due (loop time); None while none is awaited."""
        self._admitted = False
        self._seen_requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit():
            assert isinstance(transport, asyncio.Transport)
            transport.write(
                raw_error(
                    503,
                    "Service Unavailable",
                    "too_many_connections",
                    "this sidecar has too many open connections; retry later or on another replica",
                    "overloaded_error",
                )
            )
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._stop_timer()
        self._guard.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._seen_requests:  # a request's headers are complete
            self._seen_requests = self._request_count
            self._disarm()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if not self._messages:  # the next request's headers are due within the timeout
            self._arm()
        return result

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON error naming the problem's kind only: the raw request line may carry credentials."""
        fields = {"status": status, "error": type(exc).__name__ if exc else None}
        if status == 400:  # the parser's message quotes the raw bytes: only the error's kind is logged
            log.warning("unparsable request", extra={"fields": fields})
        else:
            log.error("request failed outside the gateway", exc_info=exc, extra={"fields": fields})
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        rid = request_id(None)
        if status == 400:
            code, kind, text = "malformed_request", "invalid_request_error", "the request is not valid HTTP"
        else:
            code, kind, text = "internal_error", "server_error", "internal error"
        body = {"error": {"message": text, "type": kind, "code": code}, "request_id": rid}
        response = web.json_response(body, status=status, headers={"X-Request-ID": rid})
        response.force_close()
        return response

    # -- header timer ----------------------------------------------------------------------------

    def _arm(self) -> None:
        """The next request's headers are due within the timeout. One timer per connection, kept
        armed across its requests (a request's headers cost no timer of their own): when it fires
        early it waits on for the current due time."""
        if self._guard.header_timeout > 0:
            self._headers_due = self._loop.time() + self._guard.header_timeout
            if self._header_timer is None:
                self._header_timer = self._loop.call_at(self._headers_due, self._headers_late)

    def _disarm(self) -> None:
        self._headers_due = None

    def _stop_timer(self) -> None:
        self._headers_due = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        due = self._headers_due
        if due is None:  # headers came; the next request re-arms it
            return
        if self._loop.time() < due:
            self._header_timer = self._loop.call_at(due, self._headers_late)
            return
        if self._messages or self._request_in_progress or self.transport is None:
            return
        self._guard.metrics.connections_rejected_total.labels(self._guard.listener, "header_timeout").inc()
        self.transport.write(
            raw_error(
                408,
                "Request Timeout",
                "header_timeout",
                f"request headers not complete within {self._guard.header_timeout:g}s",
                "invalid_request_error",
            )
        )
        self.force_close()
