"""Relay: the upstream response to the client as it arrives (SSE event by event), usage read aside."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from llmroute_sidecar import errors
from llmroute_sidecar.config import Settings
from llmroute_sidecar.cost import price_of
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.headers import end_to_end
from llmroute_sidecar.livecharge import LiveCharge
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.requests import ParsedRequest
from llmroute_sidecar.openai.sse import (
    SSEStream,
    StreamUsage,
    cached_tokens_from_json,
    heartbeat,
    loads,
    usage_from_json,
)
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens
from llmroute_sidecar.policy import RoutePolicy
from llmroute_sidecar.upstream_client import RelayedResponse, UpstreamConnectionError, UpstreamResponse

#: JSON responses up to this size are kept to read their usage.
USAGE_BODY_LIMIT = 8 * 1024 * 1024
RESPONSE_KEY = web.RequestKey("llmroute.response", web.StreamResponse)


class HeadersWithBody(web.StreamResponse):
    """A relayed response whose headers leave with its first body bytes (one write, not two).

    SSE responses keep aiohttp's default (headers at once: clients see the stream open); for the rest
    the first chunk follows the headers within microseconds anyway. aiohttp's ``web.Response`` buffers
    its headers the same way.
    """

    _send_headers_immediately = False


class Relay:
    """Streams upstream responses to clients, counting what they used."""

    def __init__(self, settings: Settings, metrics: SidecarMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    async def relay(
        self,
        request: web.Request,
        policy: RoutePolicy,
        ex: Exchange,
        upstream: RelayedResponse,
        parsed: ParsedRequest | None,
        strip_usage: bool,
    ) -> web.StreamResponse:
        """Send the upstream response to the client as it arrives."""
        live: LiveCharge | None = None
        try:
            is_sse = upstream.content_type == "text/event-stream"
            ex.stream = ex.stream or is_sse
            drop = ["Content-Length"] if (strip_usage and is_sse) else []
            headers = end_to_end(upstream.headers, drop)
            headers.update(ex.headers)
            headers["X-Request-ID"] = ex.request_id
            # An SSE response's headers go at once (clients see the stream open) unless body bytes are
            # already in: then they leave together, in one send.
            ready = isinstance(upstream, UpstreamResponse) and upstream.buffered > 0
            response_type = web.StreamResponse if (is_sse and not ready) else HeadersWithBody
            response = response_type(status=upstream.status, headers=headers)
            request[RESPONSE_KEY] = response
            ex.status = upstream.status
            if upstream.status >= 500:
                ex.outcome = "upstream_error"
            elif upstream.status >= 400:
                ex.outcome = "client_error"
            await response.prepare(request)
            ex.response_started = True
            observe = ex.telemetry.observe if ex.telemetry is not None else None
            usage = StreamUsage(on_document=observe) if (parsed is not None and is_sse) else None
            sse = SSEStream(usage, strip_usage) if usage is not None else None
            kept = bytearray() if (parsed is not None and not is_sse) else None
            prompt = estimate_prompt_tokens(parsed) if parsed is not None else 0
            live = self._live_charge(policy, ex, prompt) if usage is not None else None
            timeout = ex.upstream_timeout
            chars = 0
            at_eof = upstream.content.at_eof
            tail, tail_terminal = b"", False  # the body's last bytes: they leave with its end
            chunks = self._chunks(upstream, response, timeout, sse, is_sse, policy.name, ex.upstream)
            async for chunk in chunks:
                if ex.first_byte is None:
                    ex.first_byte = time.monotonic()
                    self.metrics.time_to_first_byte_seconds.labels(policy.name).observe(
                        ex.first_byte - ex.started
                    )
                out = chunk
                terminal = False
                if sse is not None and usage is not None:
                    # With strip_usage exactly the usage the sidecar asked for goes, nothing else.
                    out, terminal = sse.feed(chunk)
                    if usage.streamed_chars != chars:  # completion text: first/last token times
                        chars = usage.streamed_chars
                        ex.last_token = time.monotonic()
                        if ex.first_token is None:
                            ex.first_token = ex.last_token
                    _stream_usage_into(ex, usage, prompt)  # kept current: a cut stream settles it
                    _charge_live(live, ex)  # the store sees a stream outgrowing its reservation
                elif kept is not None and len(kept) + len(chunk) <= USAGE_BODY_LIMIT:
                    kept.extend(chunk)
                if out and at_eof():  # nothing more is coming: write it with the end of the body
                    tail, tail_terminal = out, terminal
                    continue
                if out:
                    await response.write(out)
                ex.delivered = ex.delivered or terminal
            if sse is not None and strip_usage and sse.pending():
                tail += sse.pending()
            if kept is not None and upstream.status < 400:
                _json_usage_into(ex, bytes(kept))
            ex.delivered = ex.delivered or tail_terminal
            await response.write_eof(tail)
            ex.delivered = True  # the whole upstream body reached the client
            return response
        except (ConnectionResetError, errors.ProxyError):
            if not ex.delivered:
                raise
            # After the terminal event the response is complete: the client closing (the openai SDK does
            # after [DONE]) or the upstream failing now changes nothing for the client.
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
            return response
        finally:
            upstream.release()
            if live is not None:
                await live.aclose()  # before settlement: it must be the lease's last write

    def _live_charge(self, policy: RoutePolicy, ex: Exchange, prompt: int) -> LiveCharge | None:
        """Live charging for a stream holding leases (``spec.tokens``): the route's and those of
        limits attached to its upstream; None without a lease."""
        leases = list(ex.upstream_leases)
        if ex.lease is not None and ex.lease_store is not None:
            leases.insert(0, (ex.lease_store, ex.lease))
        if not leases:
            return None

        def failed(error: BaseException) -> None:
            self.metrics.store_errors_total.labels(policy.name, "charge").inc()

        price = price_of(ex.model, ex.pricing) if ex.model else None
        (store, lease), *also = leases
        return LiveCharge(store, lease, policy.route.spec.tokens, prompt, failed, price=price, also=also)

    async def _chunks(
        self,
        upstream: RelayedResponse,
        response: web.StreamResponse,
        timeout: float,
        parser: SSEStream | None,
        is_sse: bool,
        route: str = "",
        upstream_name: str = "",
    ) -> AsyncIterator[bytes]:
        """Upstream body chunks as they arrive; heartbeats on idle SSE streams; idle timeout per chunk.

        The upstream may stay silent ``timeout`` seconds since its last chunk; an SSE stream gets a
        heartbeat after ``heartbeat_seconds`` of silence (since the last chunk or heartbeat). One
        watchdog timer per response enforces both, not a timeout per read: it is re-armed only when
        it fires (at most once per period on a flowing stream), and it only ever interrupts the read
        (never the write to the client), by cancelling it as ``asyncio.timeout`` would.
        """
        content = upstream.content
        beat = self.settings.heartbeat_seconds if is_sse else timeout
        watch = _Watchdog(timeout, beat)
        clock = watch.clock
        lean = content if isinstance(content, UpstreamResponse) else None  # knows if a read would wait
        try:
            while True:
                if watch.handle is None and not (lean is not None and lean.ready()):
                    watch.arm()  # only a read that may wait needs it: a body already in needs none
                watch.reading = True
                try:
                    chunk = await content.readany()
                except asyncio.CancelledError:
                    if not watch.woke or watch.task.uncancel() > 0:
                        raise  # not (only) the watchdog: the request's deadline, a shutdown
                    watch.woke = False
                    if clock() >= watch.idle_since + timeout:  # as ``due()`` computes it
                        self.metrics.timeouts_total.labels(route, "stream").inc()
                        errors_total = self.metrics.upstream_errors_total
                        errors_total.labels(route, upstream_name, "stream_timeout").inc()
                        raise errors.ProxyError(
                            502,
                            "upstream_timeout",
                            f"the upstream sent nothing for {timeout:g}s",
                            "upstream_error",
                            "upstream_error",
                        ) from None
                    watch.reading = False
                    watch.ticked = clock()
                    if is_sse and (parser is None or not parser.pending()):
                        await response.write(heartbeat())
                    continue
                except (
                    aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError,
                    UpstreamConnectionError,
                ) as error:
                    raise errors.upstream_failed(
                        f"the upstream connection broke mid-response: {error}"
                    ) from None
                finally:
                    watch.reading = False
                if not chunk:
                    return
                watch.idle_since = watch.ticked = clock()
                yield chunk
        finally:
            watch.stop()


class _Watchdog:
    """The one timer of a relayed response: fires when the upstream was silent ``timeout`` seconds
    (since its last chunk) or a heartbeat is due (``beat`` seconds since the last chunk or heartbeat),
    and then cancels the read it interrupts (only while ``reading``), as ``asyncio.timeout`` would.

    It re-arms itself only when it fires early (at most once per period on a flowing stream). An
    object rather than closures: a closure that re-arms itself is a reference cycle through the
    request's task, left for the cycle collector; ``stop`` leaves nothing behind.
    """

    __slots__ = (
        "beat",
        "clock",
        "handle",
        "idle_since",
        "loop",
        "reading",
        "task",
        "ticked",
        "timeout",
        "woke",
    )

    def __init__(self, timeout: float, beat: float) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.clock = self.loop.time
        self.timeout, self.beat = timeout, beat
        self.idle_since = self.ticked = self.clock()  # the last chunk; the last chunk or heartbeat
        self.reading = self.woke = False
        self.handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.handle = self.loop.call_at(self._due(), self._wake)

    def _due(self) -> float:
        return min(self.idle_since + self.timeout, self.ticked + self.beat)

    def _wake(self) -> None:
        self.handle = None
        if not self.reading:
            return  # the next read re-arms it
        when = self._due()
        if self.clock() < when:
            self.handle = self.loop.call_at(when, self._wake)
        else:
            self.woke = True
            self.task.cancel()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _stream_usage_into(ex: Exchange, usage: StreamUsage, prompt: int) -> None:
    ex.tokens_actual = usage.actual_tokens(prompt)
    ex.prompt_tokens = usage.prompt_tokens if usage.saw_usage else prompt
    ex.completion_tokens = ex.tokens_actual - ex.prompt_tokens
    ex.cached_tokens = usage.cached_tokens


def _charge_live(live: LiveCharge | None, ex: Exchange) -> None:
    if live is not None and ex.tokens_actual is not None:
        live.observe(ex.tokens_actual, ex.completion_tokens)


def _json_usage_into(ex: Exchange, body: bytes) -> None:
    document = loads(body)
    if document is None:
        return
    found = usage_from_json(document) if isinstance(document, dict) else None
    if ex.telemetry is not None and isinstance(document, dict):
        ex.telemetry.observe(document)
    if found is not None:
        ex.prompt_tokens, ex.completion_tokens, ex.tokens_actual = found
        ex.cached_tokens = cached_tokens_from_json(document)
