"""The shielded finish of every request: settle the lease, count metrics, write the access log.

Leases of a store that ``settles_in_background`` (Redis) are handed to the ``Settler``: the response,
and the next request on its keep-alive connection, never wait for settlement. The memory store
settles inline (``settle_now``: it never waits on anything). With either, the finish is synchronous
(``finish_now``): it cannot be cancelled half-way, so it needs no shielding task.
"""

from __future__ import annotations

import asyncio
import logging
import time

from llmroute_sidecar.accesslog import AccessLog, AccessRecord
from llmroute_sidecar.client_tokens import ClientTokens
from llmroute_sidecar.cost import CostMeter, cost_micros
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota.base import Lease, QuotaStore, StoreUnavailableError
from llmroute_sidecar.settlement import Settler
from llmroute_sidecar.token_timing import TokenTiming

log = logging.getLogger("llmroute.proxy")


class Finisher:
    """Runs after every request, whatever happened to it (cancellation included)."""

    def __init__(
        self, store: QuotaStore, metrics: SidecarMetrics, health: HealthState, access_log: AccessLog
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.health = health
        self.access_log = access_log
        self.settler = Settler(metrics)
        self.token_timing = TokenTiming(metrics)
        self.client_tokens = ClientTokens(metrics)
        self.cost = CostMeter(metrics)
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self, route: str) -> None:
        """Count a request in flight (paired with ``finish``)."""
        self.health.inflight += 1
        self.idle.clear()
        self.metrics.inflight_requests.labels(route).set(self.health.inflight)

    def finish_now(self, ex: Exchange) -> bool:
        """The whole finish without waiting, when the lease's store allows it: Redis settles in the
        background, the memory store at once. No task and no extra event-loop turn before the response
        goes out, and nothing to shield (synchronous code is never cancelled half-way). False, with
        nothing done, for a store whose settlement must be awaited (``finish``)."""
        leases = self._leases(ex)
        if any(not _settles_without_waiting(store) for store, _ in leases):
            return False
        try:
            actual = tokens_to_charge(ex)
            for store, lease in leases:
                self.settle_early(store, lease, actual, ex, self.cost_to_charge(ex, lease))
            if ex.lease is not None:
                self._count_settled(ex, actual)
            self._count(ex)
        finally:
            self._leave(ex.route)
        return True

    async def finish(self, ex: Exchange) -> None:
        """Settle quota, update metrics and write the access log, whatever happened before."""
        if self.finish_now(ex):
            return
        try:
            actual = tokens_to_charge(ex)
            for store, lease in self._leases(ex):
                try:
                    await store.settle(lease, actual, self.cost_to_charge(ex, lease))
                except Exception as error:
                    self._settle_failed(ex, error)
            if ex.lease is not None:
                self._count_settled(ex, actual)
            self._count(ex)
        finally:
            self._leave(ex.route)

    def _leases(self, ex: Exchange) -> list[tuple[QuotaStore, Lease]]:
        """Every lease the request holds, with its store: its upstream's, then the route's."""
        leases = list(ex.upstream_leases)
        if ex.lease is not None:
            leases.append((ex.lease_store or self.store, ex.lease))
        return leases

    def cost_to_charge(self, ex: Exchange, lease: Lease | None) -> int | None:
        """The actual cost (micro-units) of a lease that reserved some; None: the store's default (0 when
        nothing is charged, else the reservation)."""
        if lease is None or lease.request.cost <= 0 or ex.tokens_actual is None or ex.model is None:
            return None
        price = self.cost.price(ex.model, ex.pricing)
        return cost_micros(ex.prompt_tokens, ex.completion_tokens, price, ex.cached_tokens)

    async def settle_lease(
        self, store: QuotaStore, lease: Lease, actual: int, ex: Exchange, cost: int | None = None
    ) -> None:
        """Settle one lease now: without waiting where the store allows it, else awaited."""
        if _settles_without_waiting(store):
            self.settle_early(store, lease, actual, ex, cost)
            return
        try:
            await store.settle(lease, actual, cost)
        except Exception as error:  # the lease expires on its own
            self._settle_failed(ex, error)

    def settle_early(
        self, store: QuotaStore, lease: Lease, actual: int, ex: Exchange, cost: int | None = None
    ) -> None:
        """Settle one lease without waiting (background or inline); for stores that allow it."""
        try:
            settle_now = getattr(store, "settle_now", None)
            if settle_now is not None and not getattr(store, "settles_in_background", False):
                settle_now(lease, actual, cost)
            else:
                self.settler.submit(store, lease, actual, cost)
        except Exception as error:
            self._settle_failed(ex, error)

    def _settle_failed(self, ex: Exchange, error: Exception) -> None:
        if isinstance(error, StoreUnavailableError):
            # The lease expires on its own; the reservation stays charged until its window ends.
            self.metrics.store_errors_total.labels(ex.route, "settle").inc()
            self.health.store_available = False
            return
        log.error(
            "settling the lease failed",
            exc_info=error,
            extra={"fields": {"request_id": ex.request_id}},
        )

    def _count_settled(self, ex: Exchange, actual: int) -> None:
        assert ex.lease is not None
        refund = ex.lease.reserved_tokens - actual
        if refund > 0:
            self.metrics.tokens_total.labels(ex.route, "refunded").inc(refund)
        elif refund < 0:
            self.metrics.tokens_total.labels(ex.route, "overrun").inc(-refund)

    def _count(self, ex: Exchange) -> None:
        """Metrics, the access line and telemetry of a finished request."""
        policy_name = ex.route
        if ex.tokens_actual is not None:
            self.client_tokens.count(policy_name, ex.client, ex.tokens_actual)
            self.cost.count(
                policy_name, ex.model, ex.prompt_tokens, ex.completion_tokens, ex.pricing, ex.cached_tokens
            )
            self.metrics.tokens_total.labels(policy_name, "prompt").inc(ex.prompt_tokens)
            self.metrics.tokens_total.labels(policy_name, "completion").inc(max(0, ex.completion_tokens))
        self.token_timing.observe(ex)
        if ex.client_disconnected and not ex.delivered:  # only real mid-response disconnects
            ex.outcome = "client_disconnected"
            self.metrics.client_disconnects_total.labels(policy_name).inc()
        duration = time.monotonic() - ex.started
        code = str(ex.status or 499)
        self.metrics.requests_total.labels(policy_name, ex.method, ex.outcome, code).inc()
        self.metrics.request_duration_seconds.labels(policy_name, ex.outcome).observe(duration)
        self.access_log.write(_record(ex, duration))
        if ex.telemetry is not None:
            ex.telemetry.recorder.record(ex, duration)  # span and GenAI metrics; never raises

    def _leave(self, route: str) -> None:
        self.health.inflight -= 1
        self.metrics.inflight_requests.labels(route).set(self.health.inflight)
        if self.health.inflight == 0:
            self.idle.set()


def _settles_without_waiting(store: QuotaStore) -> bool:
    return bool(getattr(store, "settles_in_background", False)) or hasattr(store, "settle_now")


def tokens_to_charge(ex: Exchange) -> int:
    """Actual usage when known; nothing when no response came; the reservation otherwise."""
    if ex.tokens_actual is not None:
        return ex.tokens_actual
    if not ex.response_started or ex.status >= 400:
        return 0
    return ex.tokens_reserved


def _record(ex: Exchange, duration: float) -> AccessRecord:
    return AccessRecord(
        request_id=ex.request_id,
        trace_id=ex.trace_id,
        route=ex.route,
        method=ex.method,
        path=ex.path,
        status=ex.status or 499,
        outcome=ex.outcome,
        duration_ms=round(duration * 1000, 2),
        upstream_ms=round(ex.upstream_seconds * 1000, 2) if ex.upstream_seconds is not None else None,
        attempts=ex.attempts,
        stream=ex.stream,
        tokens_reserved=ex.tokens_reserved,
        tokens_actual=ex.tokens_actual,
        limit=ex.limit,
        client=ex.client,
        queue_wait_ms=round(ex.queue_wait * 1000, 2),
        client_disconnected=ex.client_disconnected,
        error=ex.error,
        upstream=ex.upstream or None,
    )
