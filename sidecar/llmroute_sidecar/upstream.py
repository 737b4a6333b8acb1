"""Upstream attempts on one upstream: breaker, per-attempt timeout, retries with backoff inside the
deadline. Moving on to another upstream (``dispatch``) is part of the same retry layer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from llmroute_sidecar import errors
from llmroute_sidecar.backoff import backoff_delays, bounded_delay
from llmroute_sidecar.breaker import CircuitBreaker
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.headers import end_to_end
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.requests import kind_for_path
from llmroute_sidecar.policy import RoutePolicy, UpstreamTarget
from llmroute_sidecar.upstream_client import (
    InvalidRequestError,
    RelayedResponse,
    UpstreamClient,
    UpstreamConnectionError,
)

Body = bytes | AsyncIterable[bytes] | None


def client_fault(body: Body) -> ProxyError | None:
    """The error a streamed request body hit (too large, bad encoding): the client's, not the upstream's."""
    reader = getattr(body, "reader", None)
    error = getattr(reader, "error", None)
    return error if isinstance(error, ProxyError) else None


class UpstreamAttemptError(Exception):
    """One upstream attempt failed in a retryable way."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class CandidateFailed(Exception):
    """An upstream gave no response to relay (before the first byte): the next candidate may serve.

    ``kind``: breaker_open, http_429, http_5xx, timeout or connect_error; ``error`` is what the client
    gets when no candidate is left.
    """

    def __init__(self, kind: str, error: ProxyError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


def breaker_open() -> ProxyError:
    return errors.overloaded(
        "circuit_open", "the upstream is failing; its circuit breaker is open", "breaker_open"
    )


class Upstream:
    """Sends a request upstream: attempts, retries, breaker bookkeeping, upstream metrics.

    Attempts with a buffered body (or none) go through the lean ``UpstreamClient``; a streamed body
    goes through aiohttp's ``ClientSession`` (``session``, also what health probes use).
    """

    def __init__(self, metrics: SidecarMetrics, health: HealthState) -> None:
        self.metrics = metrics
        self.health = health
        self._session: aiohttp.ClientSession | None = None
        self._client: UpstreamClient | None = None

    async def start(self) -> None:
        self._client = UpstreamClient()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def headers(
        self, request: web.Request, policy: RoutePolicy, ex: Exchange, vendor_key: str | None
    ) -> CIMultiDict[str]:
        """The request headers as the upstream gets them: end-to-end only, vendor key, ids, forwarding."""
        spec = policy.route.spec
        # Bodies are forwarded decoded (request_body), so their Content-Encoding never is.
        drop = ["Host", "Content-Length", "Content-Encoding"]
        if kind_for_path(request.path) is not None:
            drop.append("Accept-Encoding")  # usage is read from the response: keep it uncompressed
        if vendor_key is not None:
            drop += ["Authorization", spec.identity.header]
        headers = end_to_end(request.headers, drop)
        if vendor_key is not None:
            headers["Authorization"] = f"Bearer {vendor_key}"
        headers["X-Request-ID"] = ex.request_id
        headers["traceparent"] = ex.headers["traceparent"]
        if "tracestate" in ex.headers:
            headers["tracestate"] = ex.headers["tracestate"]
        peer = request.remote or ""
        forwarded = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        return headers

    async def forward(
        self,
        request: web.Request,
        policy: RoutePolicy,
        ex: Exchange,
        body: Body,
        target: UpstreamTarget,
        breaker: CircuitBreaker,
        last: bool = True,
    ) -> RelayedResponse:
        """Attempts on ``target`` with its retries; returns the response to relay.

        Raises ``CandidateFailed`` when it leaves nothing to relay: its breaker refuses, attempts fail,
        or (unless it is the ``last`` candidate) it answers 429, or 5xx on its final attempt. The last
        candidate's 429 and final 5xx are relayed as they are.
        """
        spec = policy.route.spec
        upstream = target.spec
        url = target.url + request.raw_path
        headers = self.headers(request, policy, ex, target.vendor_key)
        retryable_body = body is None or isinstance(body, bytes)
        attempts_allowed = 1 + (upstream.retries if retryable_body else 0)
        delays = backoff_delays()
        deadline_at = ex.started + spec.deadline_seconds
        last_error, last_kind = "no attempt made", ""
        for attempt in range(1, attempts_allowed + 1):
            if not breaker.allow():
                raise CandidateFailed("breaker_open", breaker_open())
            ex.attempts += 1
            started = time.monotonic()
            try:
                response = await self._attempt(request.method, url, headers, body, upstream.timeout_seconds)
            except UpstreamAttemptError as error:
                fault = client_fault(body)
                if fault is not None:  # the client's body failed mid-upload: no verdict on the upstream
                    breaker.release_probe()
                    raise fault from None
                self._record_attempt(policy, target.name, breaker, ex, started, error.kind, ok=False)
                last_error, last_kind = f"{error.kind}: {error}", error.kind
            except BaseException as error:
                breaker.release_probe()
                fault = client_fault(body)
                if fault is not None and fault is not error:
                    raise fault from None
                raise
            else:
                ok = response.status < 500
                last_kind = _status_kind(response.status)
                self._record_attempt(policy, target.name, breaker, ex, started, last_kind, ok=ok)
                if response.status == 429 and not last:
                    response.release()
                    raise CandidateFailed("http_429", _failed(ex, "upstream answered 429"))
                if ok or (attempt == attempts_allowed and last):
                    return response
                last_error = f"upstream answered {response.status}"
                response.release()
            if attempt == attempts_allowed:
                break
            delay = bounded_delay(next(delays), deadline_at - time.monotonic())
            if delay is None:
                break
            self.metrics.retries_total.labels(policy.name, target.name, last_kind).inc()
            await asyncio.sleep(delay)
        raise CandidateFailed(last_kind, _failed(ex, last_error))

    async def _attempt(
        self, method: str, url: str, headers: CIMultiDict[str], body: Body, timeout: float
    ) -> RelayedResponse:
        client = self._client
        try:
            async with asyncio.timeout(timeout):
                if (
                    client is not None
                    and (body is None or isinstance(body, bytes))
                    and url.startswith(("http://", "https://"))
                ):
                    return await client.request(method, url, headers, body)
                return await self.session.request(
                    method,
                    URL(url, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
        except TimeoutError:
            raise UpstreamAttemptError("timeout", f"no response within {timeout:g}s") from None
        except (UpstreamConnectionError, InvalidRequestError) as error:
            raise UpstreamAttemptError("connect_error", str(error)) from None
        except aiohttp.ClientConnectorError as error:
            raise UpstreamAttemptError("connect_error", str(error)) from None
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as error:
            raise UpstreamAttemptError("connect_error", str(error) or type(error).__name__) from None

    def _record_attempt(
        self,
        policy: RoutePolicy,
        upstream: str,
        breaker: CircuitBreaker,
        ex: Exchange,
        started: float,
        kind: str,
        ok: bool,
    ) -> None:
        elapsed = time.monotonic() - started
        ex.upstream_seconds = (ex.upstream_seconds or 0.0) + elapsed
        self.metrics.upstream_duration_seconds.labels(policy.name, upstream, kind).observe(elapsed)
        (self.health.upstream_errors.get(upstream) or self.health.errors).record(ok)
        if ok:
            breaker.record_success()
        else:
            breaker.record_failure()
            self.metrics.upstream_errors_total.labels(policy.name, upstream, kind).inc()
            if kind == "timeout":
                self.metrics.timeouts_total.labels(policy.name, "attempt").inc()


def _failed(ex: Exchange, detail: str) -> ProxyError:
    return errors.upstream_failed(f"upstream request failed after {ex.attempts} attempt(s): {detail}")


def _status_kind(status: int) -> str:
    if status >= 500:
        return "http_5xx"
    if status >= 400:
        return "http_4xx"
    return "ok"
