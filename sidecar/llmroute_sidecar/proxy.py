"""The request path: admit, forward with retries, relay (streaming), settle.

One ``Gateway`` per process handles every request of the traffic port. The order is fixed:
request id and trace → body and validation → identity → quota admission (queueing for concurrency)
→ upstream attempts (breaker, per-attempt timeout, retries with backoff) → relay (SSE event by event)
→ shielded finish (settle tokens and release the lease, metrics, access log), all inside the
route's deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from llmroute_sidecar import errors
from llmroute_sidecar.accesslog import AccessLog, AccessRecord
from llmroute_sidecar.api.spec import StoreFailurePolicy
from llmroute_sidecar.backoff import backoff_delays, bounded_delay
from llmroute_sidecar.breaker import BreakerState, CircuitBreaker
from llmroute_sidecar.config import Settings
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.headers import end_to_end, rate_limit_headers, retry_after
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.requests import (
    ParsedRequest,
    RequestValidationError,
    kind_for_path,
    parse_request,
    with_stream_usage,
)
from llmroute_sidecar.openai.sse import (
    SSEParser,
    StreamUsage,
    heartbeat,
    is_injected_usage_event,
    sse_error_event,
    usage_from_json,
)
from llmroute_sidecar.openai.tokens import estimate_cost, estimate_prompt_tokens
from llmroute_sidecar.policy import ClientIdentity, RoutePolicy, build_checks, identify
from llmroute_sidecar.quota.base import (
    AdmissionRequest,
    Decision,
    Lease,
    LimitCheck,
    QuotaStore,
    StoreUnavailableError,
)
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.tracing import child_trace, request_id

log = logging.getLogger("llmroute.proxy")

#: Bodies of non-OpenAI requests up to this size are buffered (so they can be retried).
BUFFERED_BODY_LIMIT = 1024 * 1024
#: JSON responses up to this size are kept to read their usage.
USAGE_BODY_LIMIT = 8 * 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Exchange:
    """What one request did; filled in as it goes, read by the shielded finish."""

    request_id: str
    trace_id: str
    route: str
    method: str
    path: str
    started: float
    status: int = 0
    outcome: str = "ok"
    attempts: int = 0
    upstream_seconds: float | None = None
    queue_wait: float = 0.0
    stream: bool = False
    tokens_reserved: int = 0
    tokens_actual: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limit: str | None = None
    client: str | None = None
    client_disconnected: bool = False
    error: str | None = None
    lease: Lease | None = None
    lease_store: QuotaStore | None = None
    response_started: bool = False
    first_byte: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


class UpstreamAttemptError(Exception):
    """One upstream attempt failed in a retryable way."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Gateway:
    """The traffic port's handler and the state it shares across requests."""

    def __init__(
        self,
        policy: RoutePolicy,
        store: QuotaStore,
        settings: Settings,
        metrics: SidecarMetrics,
        health: HealthState,
        access_log: AccessLog,
    ) -> None:
        self.policy = policy
        self.store = store
        self.fallback = MemoryQuotaStore()
        """Local limiter used while the shared store is unreachable (onStoreFailure: allow)."""
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.access_log = access_log
        cb = policy.route.spec.upstream.circuit_breaker
        self.breaker = CircuitBreaker(
            cb.consecutive_failures, cb.open_seconds, on_change=self._breaker_changed
        )
        self._session: aiohttp.ClientSession | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None),
        )
        self._breaker_changed(self.breaker.state)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Gateway.start() was not awaited"
        return self._session

    def update_policy(self, policy: RoutePolicy) -> None:
        """Swap the configuration; requests in flight keep the one they started with."""
        self.policy = policy
        cb = policy.route.spec.upstream.circuit_breaker
        self.breaker.reconfigure(cb.consecutive_failures, cb.open_seconds)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _breaker_changed(self, state: BreakerState) -> None:
        value = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}[state]
        self.metrics.circuit_breaker_state.labels(self.policy.name, self.policy.upstream_url).set(value)
        self.health.breaker_open = state is BreakerState.OPEN
        if state is not BreakerState.CLOSED:
            log.warning(
                "circuit breaker %s", state.value, extra={"fields": {"upstream": self.policy.upstream_url}}
            )

    # -- request path ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request of the traffic port."""
        policy = self.policy
        trace = child_trace(request.headers.get("traceparent"))
        ex = Exchange(
            request_id=request_id(request.headers.get("X-Request-ID")),
            trace_id=trace.trace_id,
            route=policy.name,
            method=request.method,
            path=request.path,
            started=time.monotonic(),
        )
        ex.headers = {"traceparent": trace.traceparent}
        if request.headers.get("tracestate"):
            ex.headers["tracestate"] = request.headers["tracestate"]
        self._enter()
        deadline = policy.route.spec.deadline_seconds
        timer = asyncio.timeout(deadline)
        try:
            async with timer:
                return await self._serve(request, policy, ex)
        except TimeoutError as error:
            if not timer.expired():  # a timeout below the deadline that no layer handled: still JSON
                ex.error = repr(error)
                return await self._fail(request, ex, errors.upstream_failed("the upstream timed out"))
            self.metrics.timeouts_total.labels(policy.name, "deadline").inc()
            return await self._fail(request, ex, errors.deadline_exceeded(deadline))
        except ProxyError as error:
            return await self._fail(request, ex, error)
        except ConnectionResetError:  # the client went away while we wrote to it
            ex.client_disconnected = True
            response = request.get("llmroute.response")
            return response if isinstance(response, web.StreamResponse) else web.Response(status=499)
        except asyncio.CancelledError:
            ex.client_disconnected = True
            ex.outcome = "client_disconnected"
            raise
        except Exception as error:  # a bug must still answer JSON and free the quota
            log.exception("unexpected error", extra={"fields": {"request_id": ex.request_id}})
            ex.error = repr(error)
            return await self._fail(
                request, ex, ProxyError(500, "internal_error", "internal error", "server_error")
            )
        finally:
            await asyncio.shield(self._finish(ex))

    def _enter(self) -> None:
        self.health.inflight += 1
        self._idle.clear()
        self.metrics.inflight_requests.labels(self.policy.name).set(self.health.inflight)

    async def _fail(self, request: web.Request, ex: Exchange, error: ProxyError) -> web.StreamResponse:
        """Answer an error: a JSON body, or an SSE error event when a stream already started."""
        ex.outcome = error.outcome
        ex.error = error.code
        if not ex.response_started:
            ex.status = error.status
            answer = error.response(ex.request_id)
            for name, value in ex.headers.items():
                if name.lower().startswith(("x-ratelimit", "ratelimit")):
                    answer.headers.setdefault(name, value)
            return answer
        response = request.get("llmroute.response")
        if isinstance(response, web.StreamResponse) and ex.stream:
            try:
                await response.write(sse_error_event(error.message, error.type, error.code, ex.request_id))
                await response.write_eof()
            except ConnectionResetError:
                ex.client_disconnected = True
            return response
        # A non-stream response already started: the only honest signal left is a broken connection.
        if request.transport is not None:
            request.transport.close()
        return response if isinstance(response, web.StreamResponse) else web.Response(status=error.status)

    async def _serve(self, request: web.Request, policy: RoutePolicy, ex: Exchange) -> web.StreamResponse:
        spec = policy.route.spec
        if self.health.draining:  # shutting down: send the client elsewhere, finish what is in flight
            raise errors.overloaded(
                "draining", "this sidecar is shutting down; retry on another replica", "draining"
            )
        identity = identify(policy, request.headers)  # authenticate before reading the body
        ex.client = identity.label
        kind = kind_for_path(request.path) if request.method == "POST" else None
        parsed: ParsedRequest | None = None
        body: bytes | AsyncIterator[bytes] | None
        if kind is not None:
            raw = await self._read_body(request, spec.max_request_bytes)
            try:
                parsed = parse_request(request.path, raw)
            except RequestValidationError as error:
                raise errors.bad_request(error.code, error.message, error.status) from None
            ex.stream = parsed.stream
            injected = with_stream_usage(parsed)
            body = injected if injected is not None else raw
        else:
            body = await self._pass_through_body(request, spec.max_request_bytes)
            injected = None
        tokens = estimate_cost(parsed) if parsed is not None else 0
        ex.tokens_reserved = tokens
        if self.breaker.state is BreakerState.OPEN:  # fail fast, before the request consumes quota
            raise self._breaker_open()
        decision = await self._admit(policy, identity, request, ex, tokens)
        ex.headers.update(rate_limit_headers(decision))
        upstream = await self._forward(request, policy, ex, body)
        return await self._relay(request, policy, ex, upstream, parsed, injected is not None)

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise self._too_large(limit)
        chunks = []
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _pass_through_body(
        self, request: web.Request, limit: int
    ) -> bytes | AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length <= BUFFERED_BODY_LIMIT:
            return await self._read_body(request, limit)
        if length is not None and length > limit:
            raise self._too_large(limit)
        return self._stream_body(request, limit)

    async def _stream_body(self, request: web.Request, limit: int) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise self._too_large(limit)
            yield chunk

    @staticmethod
    def _breaker_open() -> ProxyError:
        return errors.overloaded(
            "circuit_open", "the upstream is failing; its circuit breaker is open", "breaker_open"
        )

    @staticmethod
    def _too_large(limit: int) -> ProxyError:
        return errors.bad_request("request_too_large", f"request body exceeds {limit} bytes", status=413)

    async def _admit(
        self, policy: RoutePolicy, identity: ClientIdentity, request: web.Request, ex: Exchange, tokens: int
    ) -> Decision:
        """Ask the store, queueing up to queueTimeoutSeconds while only concurrency is short."""
        spec = policy.route.spec
        checks = build_checks(policy, identity, request.headers)
        if not checks:
            return Decision(admitted=True)
        admission = AdmissionRequest(
            route=policy.name,
            checks=checks,
            tokens=tokens,
            lease_seconds=spec.deadline_seconds + self.settings.lease_margin_seconds,
            request_id=ex.request_id,
        )
        started = time.monotonic()
        queue_deadline = started + spec.queue_timeout_seconds
        while True:
            decision, ex.lease_store = await self._store_admit(policy, admission)
            self._count_shadow(policy, decision)
            remaining = queue_deadline - time.monotonic()
            if decision.admitted or not decision.waits_for_concurrency or remaining <= 0:
                break
            await self.store.wait_for_capacity(min(remaining, 0.25))
        ex.queue_wait = time.monotonic() - started
        self.metrics.queue_wait_seconds.labels(policy.name).observe(ex.queue_wait)
        if decision.admitted:
            ex.lease = decision.lease
            if decision.lease is not None:
                self.metrics.tokens_total.labels(policy.name, "reserved").inc(tokens)
            return decision
        rejected = decision.rejected
        assert rejected is not None
        ex.limit = rejected.limit
        self.metrics.quota_rejections_total.labels(
            policy.name, rejected.limit, rejected.dimension.value
        ).inc()
        if decision.waits_for_concurrency:
            self.metrics.timeouts_total.labels(policy.name, "queue").inc()
        headers = {**rate_limit_headers(decision), "Retry-After": retry_after(decision)}
        raise ProxyError(
            429,
            f"{_snake(rejected.dimension.value)}_exceeded",
            f"rate limit exceeded: limit '{rejected.limit}' ({rejected.scope}) allows {rejected.limit_value} "
            f"{_describe(rejected.dimension.value)}; retry after {headers['Retry-After']}s",
            "rate_limit_error",
            "quota_rejected",
            headers,
        )

    async def _store_admit(
        self, policy: RoutePolicy, admission: AdmissionRequest
    ) -> tuple[Decision, QuotaStore]:
        """Admit through the shared store; on its failure apply the route's onStoreFailure policy."""
        try:
            decision = await self.store.admit(admission)
        except StoreUnavailableError as error:
            self.health.store_available = False
            self.metrics.store_errors_total.labels(policy.name, "admit").inc()
            if policy.route.spec.on_store_failure is StoreFailurePolicy.DENY:
                raise errors.overloaded(
                    "store_unavailable",
                    "the quota store is unavailable and this route denies traffic without it",
                    "store_unavailable",
                ) from error
            self.metrics.store_fallback_total.labels(policy.name).inc()
            local = replace(admission, checks=tuple(_share(c, self.replicas) for c in admission.checks))
            return replace(await self.fallback.admit(local), degraded=True), self.fallback
        self.health.store_available = True
        return decision, self.store

    @property
    def replicas(self) -> int:
        """Replicas sharing the route: configured, or seen by the store's fleet heartbeat."""
        seen = getattr(self.store, "replicas", 1)
        return max(self.settings.replicas, seen if isinstance(seen, int) else 1)

    def _count_shadow(self, policy: RoutePolicy, decision: Decision) -> None:
        for state in decision.shadow_rejections:
            self.metrics.quota_shadow_rejections_total.labels(
                policy.name, state.limit, state.dimension.value
            ).inc()

    def _upstream_headers(self, request: web.Request, policy: RoutePolicy, ex: Exchange) -> CIMultiDict[str]:
        spec = policy.route.spec
        drop = ["Host", "Content-Length"]
        if kind_for_path(request.path) is not None:
            drop.append("Accept-Encoding")  # usage is read from the response: keep it uncompressed
        if policy.vendor_key is not None:
            drop += ["Authorization", spec.identity.header]
        headers = end_to_end(request.headers, drop)
        if policy.vendor_key is not None:
            headers["Authorization"] = f"Bearer {policy.vendor_key}"
        headers["X-Request-ID"] = ex.request_id
        headers["traceparent"] = ex.headers["traceparent"]
        if "tracestate" in ex.headers:
            headers["tracestate"] = ex.headers["tracestate"]
        peer = request.remote or ""
        forwarded = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        return headers

    async def _forward(
        self,
        request: web.Request,
        policy: RoutePolicy,
        ex: Exchange,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Upstream attempts with one retry layer; returns the response to relay."""
        spec = policy.route.spec
        url = URL(policy.upstream_url + request.raw_path, encoded=True)
        headers = self._upstream_headers(request, policy, ex)
        retryable_body = not isinstance(body, AsyncIterator)
        attempts_allowed = 1 + (spec.upstream.retries if retryable_body else 0)
        delays = backoff_delays()
        deadline_at = ex.started + spec.deadline_seconds
        last_error, last_kind = "no attempt made", ""
        for attempt in range(1, attempts_allowed + 1):
            if not self.breaker.allow():
                raise self._breaker_open()
            ex.attempts = attempt
            started = time.monotonic()
            try:
                response = await self._attempt(
                    request.method, url, headers, body, spec.upstream.timeout_seconds
                )
            except UpstreamAttemptError as error:
                self._record_attempt(policy, ex, started, error.kind, ok=False)
                last_error, last_kind = f"{error.kind}: {error}", error.kind
            except BaseException:
                self.breaker.release_probe()
                raise
            else:
                ok = response.status < 500
                last_kind = _status_kind(response.status)
                self._record_attempt(policy, ex, started, last_kind, ok=ok)
                if ok or attempt == attempts_allowed:
                    return response
                last_error = f"upstream answered {response.status}"
                response.release()
            if attempt == attempts_allowed:
                break
            delay = bounded_delay(next(delays), deadline_at - time.monotonic())
            if delay is None:
                break
            self.metrics.retries_total.labels(policy.name, last_kind).inc()
            await asyncio.sleep(delay)
        raise errors.upstream_failed(f"upstream request failed after {ex.attempts} attempt(s): {last_error}")

    async def _attempt(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None,
        timeout: float,
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(timeout):
                return await self.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, compress=None
                )
        except TimeoutError:
            raise UpstreamAttemptError("timeout", f"no response within {timeout:g}s") from None
        except aiohttp.ClientConnectorError as error:
            raise UpstreamAttemptError("connect_error", str(error)) from None
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as error:
            raise UpstreamAttemptError("connect_error", str(error) or type(error).__name__) from None

    def _record_attempt(self, policy: RoutePolicy, ex: Exchange, started: float, kind: str, ok: bool) -> None:
        elapsed = time.monotonic() - started
        ex.upstream_seconds = (ex.upstream_seconds or 0.0) + elapsed
        self.metrics.upstream_duration_seconds.labels(policy.name, kind).observe(elapsed)
        self.health.errors.record(ok)
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
            self.metrics.upstream_errors_total.labels(policy.name, kind).inc()
            if kind == "timeout":
                self.metrics.timeouts_total.labels(policy.name, "attempt").inc()

    async def _relay(
        self,
        request: web.Request,
        policy: RoutePolicy,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
        parsed: ParsedRequest | None,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """Send the upstream response to the client as it arrives."""
        try:
            is_sse = upstream.content_type == "text/event-stream"
            ex.stream = ex.stream or is_sse
            drop = ["Content-Length"] if (strip_usage and is_sse) else []
            headers = end_to_end(upstream.headers, drop)
            headers.update(ex.headers)
            headers["X-Request-ID"] = ex.request_id
            response = web.StreamResponse(status=upstream.status, headers=headers)
            request["llmroute.response"] = response
            ex.status = upstream.status
            if upstream.status >= 500:
                ex.outcome = "upstream_error"
            elif upstream.status >= 400:
                ex.outcome = "client_error"
            await response.prepare(request)
            ex.response_started = True
            usage = StreamUsage() if (parsed is not None and is_sse) else None
            parser = SSEParser() if usage is not None else None
            kept = bytearray() if (parsed is not None and not is_sse) else None
            prompt = estimate_prompt_tokens(parsed) if parsed is not None else 0
            timeout = policy.route.spec.upstream.timeout_seconds
            async for chunk in self._chunks(upstream, response, timeout, parser, is_sse):
                if ex.first_byte is None:
                    ex.first_byte = time.monotonic()
                    self.metrics.time_to_first_byte_seconds.labels(policy.name).observe(
                        ex.first_byte - ex.started
                    )
                out = chunk
                if parser is not None and usage is not None:
                    events = parser.feed(chunk)
                    for event in events:
                        usage.consume(event)
                    if strip_usage:
                        out = b"".join(e.raw for e in events if not is_injected_usage_event(e))
                    self._stream_usage_into(ex, usage, prompt)  # kept current: a cut stream settles it
                elif kept is not None and len(kept) + len(chunk) <= USAGE_BODY_LIMIT:
                    kept.extend(chunk)
                if out:
                    await response.write(out)
            if parser is not None and strip_usage and parser.pending():
                await response.write(parser.pending())
            if kept is not None and upstream.status < 400:
                self._json_usage_into(ex, bytes(kept), parsed)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    async def _chunks(
        self,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        timeout: float,
        parser: SSEParser | None,
        is_sse: bool,
    ) -> AsyncIterator[bytes]:
        """Upstream body chunks as they arrive; heartbeats on idle SSE streams; idle timeout per chunk."""
        idle_since = time.monotonic()
        beat = self.settings.heartbeat_seconds
        while True:
            left = timeout - (time.monotonic() - idle_since)
            if left <= 0:
                raise errors.ProxyError(
                    502,
                    "upstream_timeout",
                    f"the upstream sent nothing for {timeout:g}s",
                    "upstream_error",
                    "upstream_error",
                )
            try:
                # A timeout context, not a task per chunk: the read stays cheap on the hot path.
                async with asyncio.timeout(min(left, beat) if is_sse else left):
                    chunk = await upstream.content.readany()
            except TimeoutError:
                if is_sse and (parser is None or not parser.pending()):
                    await response.write(heartbeat())
                continue
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
                raise errors.upstream_failed(f"the upstream connection broke mid-response: {error}") from None
            if not chunk:
                return
            idle_since = time.monotonic()
            yield chunk

    @staticmethod
    def _stream_usage_into(ex: Exchange, usage: StreamUsage, prompt: int) -> None:
        ex.tokens_actual = usage.actual_tokens(prompt)
        ex.prompt_tokens = usage.prompt_tokens if usage.saw_usage else prompt
        ex.completion_tokens = ex.tokens_actual - ex.prompt_tokens

    def _json_usage_into(self, ex: Exchange, body: bytes, parsed: ParsedRequest | None) -> None:
        try:
            document = json.loads(body)
        except ValueError:
            return
        found = usage_from_json(document) if isinstance(document, dict) else None
        if found is not None:
            ex.prompt_tokens, ex.completion_tokens, ex.tokens_actual = found

    async def _finish(self, ex: Exchange) -> None:
        """Settle quota, update metrics and write the access log, whatever happened before."""
        policy_name = ex.route
        try:
            if ex.lease is not None:
                actual = self._tokens_to_charge(ex)
                try:
                    await (ex.lease_store or self.store).settle(ex.lease, actual)
                except StoreUnavailableError:
                    # The lease expires on its own; the reservation stays charged until its window ends.
                    self.metrics.store_errors_total.labels(policy_name, "settle").inc()
                    self.health.store_available = False
                except Exception:
                    log.exception(
                        "settling the lease failed", extra={"fields": {"request_id": ex.request_id}}
                    )
                refund = ex.lease.reserved_tokens - actual
                if refund > 0:
                    self.metrics.tokens_total.labels(policy_name, "refunded").inc(refund)
            if ex.tokens_actual is not None:
                self.metrics.tokens_total.labels(policy_name, "prompt").inc(ex.prompt_tokens)
                self.metrics.tokens_total.labels(policy_name, "completion").inc(max(0, ex.completion_tokens))
            if ex.client_disconnected:
                ex.outcome = "client_disconnected"
                self.metrics.client_disconnects_total.labels(policy_name).inc()
            duration = time.monotonic() - ex.started
            code = str(ex.status or 499)
            self.metrics.requests_total.labels(policy_name, ex.method, ex.outcome, code).inc()
            self.metrics.request_duration_seconds.labels(policy_name, ex.outcome).observe(duration)
            self.access_log.write(
                AccessRecord(
                    request_id=ex.request_id,
                    trace_id=ex.trace_id,
                    route=policy_name,
                    method=ex.method,
                    path=ex.path,
                    status=ex.status or 499,
                    outcome=ex.outcome,
                    duration_ms=round(duration * 1000, 2),
                    upstream_ms=round(ex.upstream_seconds * 1000, 2)
                    if ex.upstream_seconds is not None
                    else None,
                    attempts=ex.attempts,
                    stream=ex.stream,
                    tokens_reserved=ex.tokens_reserved,
                    tokens_actual=ex.tokens_actual,
                    limit=ex.limit,
                    client=ex.client,
                    queue_wait_ms=round(ex.queue_wait * 1000, 2),
                    client_disconnected=ex.client_disconnected,
                    error=ex.error,
                )
            )
        finally:
            self.health.inflight -= 1
            self.metrics.inflight_requests.labels(policy_name).set(self.health.inflight)
            if self.health.inflight == 0:
                self._idle.set()

    @staticmethod
    def _tokens_to_charge(ex: Exchange) -> int:
        """Actual usage when known; nothing when no response came; the reservation otherwise."""
        if ex.tokens_actual is not None:
            return ex.tokens_actual
        if not ex.response_started or ex.status >= 400:
            return 0
        return ex.tokens_reserved


def _share(check: LimitCheck, replicas: int) -> LimitCheck:
    """This pod's share of a limit while it decides alone: value // replicas, at least 1."""

    def part(value: int | None) -> int | None:
        return None if value is None else max(1, value // replicas)

    return replace(
        check,
        requests_per_minute=part(check.requests_per_minute),
        requests_per_hour=part(check.requests_per_hour),
        tokens_per_minute=part(check.tokens_per_minute),
        concurrent_requests=part(check.concurrent_requests),
        burst=part(check.burst),
    )


def _status_kind(status: int) -> str:
    if status >= 500:
        return "http_5xx"
    if status >= 400:
        return "http_4xx"
    return "ok"


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _describe(dimension: str) -> str:
    return {
        "requestsPerMinute": "requests per minute",
        "requestsPerHour": "requests per hour",
        "tokensPerMinute": "tokens per minute",
        "concurrentRequests": "concurrent requests",
        "burst": "requests back to back (burst)",
    }.get(dimension, dimension)
