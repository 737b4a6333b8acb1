"""Prometheus metrics of one sidecar, on their own registry (several sidecars may share a process)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, TypeVar

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, values

#: Latency buckets for LLM calls: from cache-hit fast to multi-minute generations.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Time to first token: a warm small model answers in tens of ms, a long prompt on a busy vendor in tens of s.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 30, 60)
#: Time per output token: ~1 ms (small models, speculative decoding) to a crawl of 1 s per token.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)

#: Values of the ``outcome`` label of ``llmroute_requests_total`` and ``llmroute_request_duration_seconds``.
OUTCOMES = (
    "ok",
    "client_error",
    "quota_rejected",
    "unauthorized",
    "validation_error",
    "overloaded",
    "upstream_error",
    "deadline_exceeded",
    "client_disconnected",
    "draining",
    "breaker_open",
    "store_unavailable",
)
#: Values of the ``outcome`` label of ``llmroute_upstream_duration_seconds`` (one per attempt).
UPSTREAM_OUTCOMES = ("ok", "http_5xx", "http_4xx", "timeout", "connect_error")
#: Values of the ``reason`` label of ``llmroute_upstream_fallbacks_total``.
FALLBACK_REASONS = ("quota", "breaker_open", "http_429", "http_5xx", "timeout", "connect_error")
#: ``kind`` of ``llmroute_tokens_total``; ``layer`` of ``llmroute_timeouts_total``.
TOKEN_KINDS = ("prompt", "completion", "reserved", "refunded", "overrun")
TIMEOUT_LAYERS = ("queue", "attempt", "deadline", "stream")


_M = TypeVar("_M")


class _BoundChildren:
    """``labels()`` through a plain dict of the children already made.

    prometheus_client validates, converts and locks on every ``labels()`` call; the request path calls
    it a dozen times per request with the same few label sets, so the child is looked up once and kept.
    ``remove``/``clear`` forget the kept children too.
    """

    _bound: dict[tuple[Any, ...], Any]

    def labels(self: _M, *values: Any, **named: Any) -> _M:
        if named:
            return super().labels(*values, **named)  # type: ignore[misc,no-any-return]
        try:
            return self._bound[values]  # type: ignore[attr-defined,no-any-return]
        except AttributeError:
            self._bound = {}  # type: ignore[attr-defined]
        except KeyError:
            pass
        child: _M = super().labels(*values)  # type: ignore[misc]
        self._bound[values] = child  # type: ignore[attr-defined]
        return child

    def remove(self, *values: Any) -> None:
        self._bound = {}
        super().remove(*values)  # type: ignore[misc]

    def clear(self) -> None:
        self._bound = {}
        super().clear()  # type: ignore[misc]


class _Plain:
    """A sample's value without a lock (prometheus_client takes one per ``inc``): the sidecar updates
    and renders its metrics on its event loop's thread only."""

    __slots__ = ("_exemplar", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def get(self) -> float:
        return self._value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get_exemplar(self) -> Any:
        return self._exemplar


#: Plain values only where prometheus_client would use its in-process locked value (not in its
#: multiprocess mode, whose values live in shared files).
_PLAIN = values.ValueClass is values.MutexValue


class Counter(_BoundChildren, prometheus_client.Counter):
    """A Counter whose labelled children are bound once and count without a lock."""

    def _metric_init(self) -> None:
        super()._metric_init()
        if _PLAIN:
            self._value = _Plain()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        plain = getattr(self, "_value", None)  # none on a labelled parent: prometheus_client says so
        if type(plain) is _Plain and amount >= 0 and not exemplar:
            plain._value += amount
        else:
            super().inc(amount, exemplar)


class Gauge(_BoundChildren, prometheus_client.Gauge):
    """A Gauge whose labelled children are bound once and move without a lock."""

    def _metric_init(self) -> None:
        super()._metric_init()
        if _PLAIN:
            self._value = _Plain()

    def set(self, value: float) -> None:
        plain = getattr(self, "_value", None)  # none on a labelled parent: prometheus_client says so
        if type(plain) is _Plain:
            plain._value = float(value)
        else:
            super().set(value)

    def inc(self, amount: float = 1) -> None:
        plain = getattr(self, "_value", None)
        if type(plain) is _Plain:
            plain._value += amount
        else:
            super().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self.inc(-amount)


class Histogram(_BoundChildren, prometheus_client.Histogram):
    """A Histogram whose labelled children are bound once, observe without a lock and find their
    bucket by bisection."""

    def _metric_init(self) -> None:
        super()._metric_init()
        if _PLAIN:
            self._sum = _Plain()
            self._buckets = [_Plain() for _ in self._upper_bounds]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        plain = getattr(self, "_sum", None)  # none on a labelled parent: prometheus_client says so
        if type(plain) is not _Plain or exemplar:
            super().observe(amount, exemplar)
            return
        plain._value += amount
        bounds = self._upper_bounds
        index = bisect_left(bounds, amount)
        if index < len(bounds) and amount <= bounds[index]:  # NaN lands in no bucket, as upstream
            self._buckets[index]._value += 1


class SidecarMetrics:
    """Every ``llmroute_*`` metric the sidecar exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "llmroute_requests_total",
            "Requests served, by outcome and status code.",
            ["route", "method", "outcome", "code"],
            registry=r,
        )
        self.request_duration_seconds = Histogram(
            "llmroute_request_duration_seconds",
            "Whole-request duration as the client saw it.",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration_seconds = Histogram(
            "llmroute_upstream_duration_seconds",
            "Duration of one upstream attempt until its response headers.",
            ["route", "upstream", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_byte_seconds = Histogram(
            "llmroute_time_to_first_byte_seconds",
            "Time from request arrival to the first response body byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "llmroute_time_to_first_token_seconds",
            "Time from request arrival to the first completion content relayed (streams: the first SSE"
            " event with text; JSON: the first body byte); model: the request's, at most 50 per route.",
            ["route", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token_seconds = Histogram(
            "llmroute_time_per_output_token_seconds",
            "Completed streams: (last content event - first content event) / (completion tokens - 1).",
            ["route", "model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.quota_utilization = Gauge(
            "llmroute_quota_utilization",
            "Share (0-1) of a route-scoped limit (key: route) in use after the last admission decision"
            " this sidecar saw; fleet-wide with the Redis store.",
            ["route", "limit", "dimension"],
            registry=r,
        )
        self.quota_rejections_total = Counter(
            "llmroute_quota_rejections_total",
            "Requests rejected by a limit.",
            ["route", "limit", "dimension"],
            registry=r,
        )
        self.budget_near_limit_total = Counter(
            "llmroute_budget_near_limit_total",
            "Admitted requests that left a day or month budget at or above its warnAtPercent.",
            ["route", "limit"],
            registry=r,
        )
        self.quota_shadow_rejections_total = Counter(
            "llmroute_quota_shadow_rejections_total",
            "Requests a shadow-mode limit would have rejected.",
            ["route", "limit", "dimension"],
            registry=r,
        )
        self.tokens_total = Counter(
            "llmroute_tokens_total",
            "Tokens by kind: prompt and completion (counted); reserved, refunded and overrun (charged past"
            " the reservation): reserved - refunded + overrun is what the quota was charged.",
            ["route", "kind"],
            registry=r,
        )
        self.client_tokens_total = Counter(
            "llmroute_client_tokens_total",
            "Tokens used per client (a tier, or a 12-hex key id; never a key), at most 100 clients per"
            " route, then 'other'; 'anonymous' without a client identity.",
            ["route", "client"],
            registry=r,
        )
        self.cost_total = Counter(
            "llmroute_cost_total",
            "Cost of requests: their tokens at their model's price (spec.pricing, per million tokens, in"
            " the currency of the prices); at most 50 models per route, then 'other'.",
            ["route", "model"],
            registry=r,
        )
        self.inflight_requests = Gauge(
            "llmroute_inflight_requests", "Requests in flight in this sidecar.", ["route"], registry=r
        )
        self.queue_wait_seconds = Histogram(
            "llmroute_queue_wait_seconds",
            "Time spent waiting for admission (concurrency queue included).",
            ["route"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.retries_total = Counter(
            "llmroute_retries_total",
            "Upstream retries, by the failure that caused them.",
            ["route", "upstream", "reason"],
            registry=r,
        )
        self.upstream_fallbacks_total = Counter(
            "llmroute_upstream_fallbacks_total",
            "Requests that moved on from an upstream to the next candidate, by why: quota (its own limit "
            "rejected), breaker_open, http_429, http_5xx, timeout, connect_error.",
            ["route", "upstream", "reason"],
            registry=r,
        )
        self.timeouts_total = Counter(
            "llmroute_timeouts_total",
            "Timeouts by layer: queue, attempt, deadline, stream (upstream idle mid-response).",
            ["route", "layer"],
            registry=r,
        )
        self.upstream_errors_total = Counter(
            "llmroute_upstream_errors_total",
            "Failed upstream attempts by upstream ('default' for spec.upstream) and type.",
            ["route", "upstream", "type"],
            registry=r,
        )
        self.store_errors_total = Counter(
            "llmroute_store_errors_total",
            "Quota store operations that failed.",
            ["route", "operation"],
            registry=r,
        )
        self.store_state = Gauge(
            "llmroute_store_state",
            "Quota store state: 0 up, 1 busy (answers, but operations wait past their budget), 2 down.",
            ["route"],
            registry=r,
        )
        self.store_busy_total = Counter(
            "llmroute_store_busy_total",
            "Store operations that failed as busy (back-pressure while the store answers).",
            ["route"],
            registry=r,
        )
        self.settlements_lost_total = Counter(
            "llmroute_settlements_lost_total",
            "Settlements given up on (or pending at shutdown); their leases expire on their own.",
            ["route"],
            registry=r,
        )
        self.store_fallback_total = Counter(
            "llmroute_store_fallback_total",
            "Admissions decided by the local fallback limiter.",
            ["route"],
            registry=r,
        )
        self.circuit_breaker_state = Gauge(
            "llmroute_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["route", "upstream"],
            registry=r,
        )
        self.client_disconnects_total = Counter(
            "llmroute_client_disconnects_total",
            "Requests whose client went away before the end.",
            ["route"],
            registry=r,
        )
        self.config_reloads_total = Counter(
            "llmroute_config_reloads_total", "Route file reloads by result.", ["route", "result"], registry=r
        )
        self.connections_open = Gauge(
            "llmroute_connections_open", "Open client connections.", ["listener"], registry=r
        )
        self.connections_rejected_total = Counter(
            "llmroute_connections_rejected_total",
            "Client connections closed by the sidecar: max_connections, header_timeout.",
            ["listener", "reason"],
            registry=r,
        )
        self.ready = Gauge("llmroute_ready", "1 when the sidecar reports ready.", ["route"], registry=r)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
