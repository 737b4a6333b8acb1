"""The request path: admit, forward with retries, relay (streaming), settle.

One ``Gateway`` per process handles every request of the traffic port. The order is fixed:
request id and trace → body and validation → identity → candidate upstreams (``routing``: by model,
priority, weight, open breakers skipped) → quota admission (``admission``, queueing for concurrency)
→ upstream attempts (``dispatch``: each candidate's own quota and attempts, then the next;
``upstream``: breaker, per-attempt timeout, retries with backoff) → relay (``relay``: SSE event by
event) → shielded finish (``finish``: settle tokens and release the leases, metrics, access log),
all inside the route's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from llmroute_sidecar import errors
from llmroute_sidecar.accesslog import AccessLog
from llmroute_sidecar.admission import Admission
from llmroute_sidecar.api.spec import PromptCounting
from llmroute_sidecar.authn import Authenticator
from llmroute_sidecar.config import Settings
from llmroute_sidecar.cost import reserved_cost
from llmroute_sidecar.dispatch import Dispatcher
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.finish import Finisher
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.requests import (
    ParsedRequest,
    RequestValidationError,
    kind_for_path,
    parse_request,
    with_stream_usage,
)
from llmroute_sidecar.openai.sse import sse_error_event
from llmroute_sidecar.openai.tokenizer import TOKENIZER, count_prompt
from llmroute_sidecar.openai.tokens import bound_completion, estimate_cost
from llmroute_sidecar.policy import RoutePolicy
from llmroute_sidecar.quota.base import QuotaStore
from llmroute_sidecar.relay import RESPONSE_KEY, Relay
from llmroute_sidecar.request_body import BodyReader, too_large
from llmroute_sidecar.routing import candidates, eligible, model_listing
from llmroute_sidecar.telemetry import Telemetry
from llmroute_sidecar.tracing import child_trace, request_id
from llmroute_sidecar.upstream import Body, Upstream, breaker_open
from llmroute_sidecar.upstream_state import UpstreamStates

log = logging.getLogger("llmroute.proxy")

#: Bodies of non-OpenAI requests up to this size are buffered (so they can be retried).
BUFFERED_BODY_LIMIT = 1024 * 1024


class Gateway:
    """The traffic port's handler: runs each request through admission, upstream, relay and finish."""

    def __init__(
        self,
        policy: RoutePolicy,
        store: QuotaStore,
        settings: Settings,
        metrics: SidecarMetrics,
        health: HealthState,
        access_log: AccessLog,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.policy = policy
        self.telemetry = telemetry
        """OpenTelemetry export; None (the default) costs a request a few ``is None`` checks."""
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.upstreams = UpstreamStates(metrics, health)
        """Each upstream's breaker and health, by name."""
        self.upstreams.sync(policy)
        self.admission = Admission(store, settings, metrics, health)
        self.authenticator = Authenticator()
        self.upstream = Upstream(metrics, health)
        self.relay = Relay(settings, metrics)
        self.finisher = Finisher(store, metrics, health, access_log)
        self.dispatcher = Dispatcher(self.upstream, self.admission, self.finisher, self.upstreams, metrics)
        self.rng = random.Random()
        """Weighted choice among upstreams of one priority."""
        self._active: dict[asyncio.Task[object], Exchange] = {}
        self._cutting = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.upstream.start()
        await self.authenticator.start(lambda: self.policy)
        if self.policy.route.spec.tokens.prompt_counting is PromptCounting.TIKTOKEN:
            TOKENIZER.preload()

    async def close(self) -> None:
        await self.authenticator.close()
        await self.upstream.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.upstream.session

    def update_policy(self, policy: RoutePolicy) -> None:
        """Swap the configuration; requests in flight keep the one they started with."""
        self.policy = policy
        self.upstreams.sync(policy)
        if policy.route.spec.tokens.prompt_counting is PromptCounting.TIKTOKEN:
            TOKENIZER.preload()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self.finisher.idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def cut_streams(self, timeout: float = 2.0) -> None:
        """End the drain period: cancel what is still in flight; open streams get a ``draining`` event."""
        self._cutting = True
        tasks = list(self._active)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _send_drain_event(self, request: web.Request, ex: Exchange) -> None:
        ex.outcome, ex.error = "draining", "draining"
        response = request.get(RESPONSE_KEY)
        if not isinstance(response, web.StreamResponse):
            return
        event = sse_error_event(
            "this sidecar is shutting down and its drain period ended; retry the request",
            "overloaded_error",
            "draining",
            ex.request_id,
        )
        try:
            await response.write(event)
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            ex.client_disconnected = True

    # -- request path ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request of the traffic port."""
        policy = self.policy
        telemetry = self.telemetry
        ratio = telemetry.sampling_ratio if telemetry is not None else 1.0
        trace = child_trace(request.headers.get("traceparent"), ratio)
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
        if telemetry is not None:
            ex.telemetry = telemetry.begin(trace, ex, policy.upstream_url)
        self.finisher.enter(policy.name)
        task = asyncio.current_task()
        if task is not None:
            self._active[task] = ex
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
            ex.client_disconnected = not ex.delivered
            response = request.get(RESPONSE_KEY)
            return response if isinstance(response, web.StreamResponse) else web.Response(status=499)
        except asyncio.CancelledError:
            if self._cutting and ex.stream and ex.response_started:
                await self._send_drain_event(request, ex)
                raise
            if not ex.delivered:  # closing after the terminal event is how clients end a stream
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
            if task is not None:
                self._active.pop(task, None)
            if not self.finisher.finish_now(ex):  # every shipped store: no task, no extra loop turn
                await asyncio.shield(self.finisher.finish(ex))

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
        response = request.get(RESPONSE_KEY)
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
        if not request.raw_path.startswith("/"):  # absolute-form or authority-form: not a proxy
            raise errors.bad_request(
                "invalid_request_target", "the request target must be a path (origin-form), not a URL"
            )
        kind = kind_for_path(request.path)
        if kind is not None and request.method != "POST":
            raise _method_not_allowed(request.method, request.path)
        identity = await self.authenticator.identify(policy, request.headers)  # before reading the body
        ex.client = identity.label
        if request.path == "/v1/models" and request.method == "GET" and spec.upstreams:
            listing = model_listing(spec.upstreams)  # from the configuration, when it names models
            if listing is not None:
                ex.status = 200
                return web.json_response(listing, headers={"X-Request-ID": ex.request_id})
        parsed: ParsedRequest | None = None
        body: Body
        if kind is not None:
            raw = await BodyReader(request, spec.max_request_bytes).read()
            try:
                parsed = parse_request(request.path, raw)
            except RequestValidationError as error:
                raise errors.bad_request(error.code, error.message, error.status, error.param) from None
            parsed, raw = bound_completion(parsed, raw, spec.tokens)  # spec.tokens.injectMaxTokens
            if spec.tokens.prompt_counting is PromptCounting.TIKTOKEN:
                parsed = await count_prompt(parsed)
            if ex.telemetry is not None:
                ex.telemetry.request(parsed)
            ex.stream, ex.model, ex.pricing = parsed.stream, parsed.model, policy.pricing
            injected = with_stream_usage(parsed)
            body = injected if injected is not None else raw
        else:
            body = await self._pass_through_body(request, spec.max_request_bytes)
            injected = None
        tokens = estimate_cost(parsed, spec.tokens.default_reservation) if parsed is not None else 0
        ex.tokens_reserved = tokens
        if parsed is not None and policy.has_cost_budgets:
            ex.cost_reserved = reserved_cost(parsed, tokens, policy.pricing)
        model = parsed.model if parsed is not None else None
        chosen = candidates(policy.upstreams, model, self.rng, self.upstreams.open_names())
        if not chosen:  # fail fast, before the request consumes quota
            raise breaker_open() if eligible(policy.upstreams, model) else _model_not_found(model)
        await self.admission.admit(policy, identity, request.headers, ex, tokens)  # headers into ex
        upstream = await self.dispatcher.dispatch(
            request, policy, ex, body, chosen, identity, request.headers
        )
        return await self.relay.relay(request, policy, ex, upstream, parsed, injected is not None)

    async def _pass_through_body(self, request: web.Request, limit: int) -> Body:
        if not request.body_exists:
            return None
        reader = BodyReader(request, limit)
        length = request.content_length
        if length is not None and length <= BUFFERED_BODY_LIMIT and not reader.decoded:
            return await reader.read()
        if length is not None and length > limit and not reader.decoded:
            raise too_large(limit)
        return StreamedBody(reader)


class StreamedBody:
    """A body streamed upstream as it arrives; ``reader.error`` tells a client fault from an upstream one."""

    def __init__(self, reader: BodyReader) -> None:
        self.reader = reader

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.reader.chunks()


def _model_not_found(model: str | None) -> ProxyError:
    """404 as OpenAI answers an unknown model: no upstream of the route serves it."""
    return ProxyError(
        404,
        "model_not_found",
        f"the model {model!r} is not served by this route" if model else "no upstream serves this request",
        "invalid_request_error",
        "client_error",
    )


#: OpenAI endpoints accept POST only.
OPENAI_METHODS = "POST"


def _method_not_allowed(method: str, path: str) -> ProxyError:
    return ProxyError(
        405,
        "method_not_allowed",
        f"{method} is not allowed on {path}; use POST",
        "invalid_request_error",
        "client_error",
        {"Allow": OPENAI_METHODS},
    )
