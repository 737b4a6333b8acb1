"""Admission: ask the quota store (queueing while only concurrency is short), apply onStoreFailure."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from llmroute_sidecar import errors
from llmroute_sidecar.api.spec import LimitMode, StoreFailurePolicy
from llmroute_sidecar.config import Settings
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.headers import never_fits, rate_limit_headers, retry_headers
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.policy import ClientIdentity, RoutePolicy, build_checks
from llmroute_sidecar.quota.base import (
    BUDGET_DIMENSIONS,
    COST_DIMENSIONS,
    AdmissionRequest,
    Decision,
    Dimension,
    LimitCheck,
    LimitState,
    QuotaStore,
    StoreUnavailableError,
)
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.recent import RecentRejections
from llmroute_sidecar.utilization import QuotaUtilization


class Admission:
    """Quota admission of the request path; holds the local fallback limiter."""

    def __init__(
        self, store: QuotaStore, settings: Settings, metrics: SidecarMetrics, health: HealthState
    ) -> None:
        self.store = store
        self.recent = RecentRejections()
        """The last rejections, for ``/rejections``."""
        self.fallback = MemoryQuotaStore()
        """Local limiter used while the shared store is unreachable (onStoreFailure: allow)."""
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.utilization = QuotaUtilization(metrics)

    async def admit(
        self,
        policy: RoutePolicy,
        identity: ClientIdentity,
        headers: Mapping[str, str],
        ex: Exchange,
        tokens: int,
    ) -> Decision:
        """Ask the store, queueing up to queueTimeoutSeconds while only concurrency is short.

        Returns an admitting decision (its lease and rate-limit headers recorded in ``ex``) or raises
        the 429 ProxyError (the 400 one when the request can never fit a limit).
        """
        spec = policy.route.spec
        checks = build_checks(policy, identity, headers, ex.model)
        if not checks:
            return Decision(admitted=True)
        # cancellable: undone when every upstream's own quota says no (dispatch)
        admission = self._request(policy, ex, checks, tokens, cancellable=bool(policy.limited_upstreams))
        decision, ex.lease_store = await self._admit_waiting(
            policy, admission, ex, spec.queue_timeout_seconds
        )
        self.metrics.queue_wait_seconds.labels(policy.name).observe(ex.queue_wait)
        if decision.admitted:
            ex.lease = decision.lease
            if decision.lease is not None:
                self.metrics.tokens_total.labels(policy.name, "reserved").inc(tokens)
            size = _size(decision, tokens)
            ex.headers.update(rate_limit_headers(decision, policy.shadow_limits, size, ex.cost_reserved))
            near = near_limit(policy, decision)
            if near:
                ex.headers["x-llmroute-budget-warning"] = warning_header(near)
                for limit in dict.fromkeys(name for name, _ in near):  # each limit counted once
                    self.metrics.budget_near_limit_total.labels(policy.name, limit).inc()
            return decision
        raise self._rejected(policy, ex, decision, tokens)

    async def admit_upstream(
        self, policy: RoutePolicy, checks: tuple[LimitCheck, ...], ex: Exchange, tokens: int, queue: bool
    ) -> Decision:
        """Admit the limits attached to one upstream (``limit.upstream``): a rejection sends the request
        to the next candidate upstream, so only the last one (``queue``) waits for a concurrency slot,
        within what is left of queueTimeoutSeconds. An admitting decision's lease joins
        ``ex.upstream_leases``."""
        admission = self._request(policy, ex, checks, tokens)
        left = max(0.0, policy.route.spec.queue_timeout_seconds - ex.queue_wait) if queue else 0.0
        decision, store = await self._admit_waiting(policy, admission, ex, left)
        if decision.admitted and decision.lease is not None:
            ex.upstream_leases.append((store, decision.lease))
        return decision

    async def _admit_waiting(
        self, policy: RoutePolicy, admission: AdmissionRequest, ex: Exchange, queue_for: float
    ) -> tuple[Decision, QuotaStore]:
        """Ask the store; ask again while only a concurrency slot is short, for up to ``queue_for``
        seconds (0: once). The wait is added to ``ex.queue_wait``."""
        started = time.monotonic()
        queue_deadline = started + queue_for
        while True:
            decision, store = await self._store_admit(policy, admission)
            if decision.shadow_rejections:
                self._count_shadow(policy, decision)
            if decision.admitted or not decision.waits_for_concurrency:
                break
            remaining = queue_deadline - time.monotonic()
            if remaining <= 0:
                break
            if _never_fitting(policy, decision, admission.tokens, admission.cost):
                break
            await self.store.wait_for_capacity(min(remaining, 0.25))
        ex.queue_wait += time.monotonic() - started
        self.utilization.record(policy.name, decision)
        return decision, store

    def _request(
        self,
        policy: RoutePolicy,
        ex: Exchange,
        checks: tuple[LimitCheck, ...],
        tokens: int,
        cancellable: bool = False,
    ) -> AdmissionRequest:
        """What the store gets for one request: its checks, reserved tokens and cost, lease expiry."""
        return AdmissionRequest(
            route=policy.name,
            checks=checks,
            tokens=tokens,
            lease_seconds=policy.route.spec.deadline_seconds + self.settings.lease_margin_seconds,
            request_id=ex.request_id,
            cost=ex.cost_reserved,
            cancellable=cancellable,
        )

    def rejected(self, policy: RoutePolicy, ex: Exchange, decision: Decision, tokens: int) -> ProxyError:
        """The 429 (or 400) of a rejecting decision, counted like any other rejection."""
        return self._rejected(policy, ex, decision, tokens)

    def _rejected(self, policy: RoutePolicy, ex: Exchange, decision: Decision, tokens: int) -> ProxyError:
        """The 429 of a rejection; a non-retryable 400 when the request alone exceeds a limit."""
        rejected = decision.rejected
        assert rejected is not None
        oversize = _never_fitting(policy, decision, tokens, ex.cost_reserved)
        if oversize is not None:
            rejected = oversize
        ex.limit = rejected.limit
        self.metrics.quota_rejections_total.labels(
            policy.name, rejected.limit, rejected.dimension.value
        ).inc()
        headers = rate_limit_headers(
            decision, policy.shadow_limits, _size(decision, tokens), ex.cost_reserved
        )
        status = 400 if oversize is not None else 429
        retry = None if oversize is not None else max(0.0, decision.retry_after)
        self.recent.record(
            ex.request_id, rejected.limit, rejected.dimension.value, rejected.scope, ex.client, status, retry
        )
        if oversize is not None:
            # OpenAI SDKs retry 408, 409, 429 and 5xx: a 400 (and x-should-retry) ends the retries at once.
            return ProxyError(
                400,
                "request_too_large_for_limit",
                _too_large_message(oversize, tokens, ex.cost_reserved),
                "invalid_request_error",
                "quota_rejected",
                {**headers, "x-should-retry": "false"},
            )
        if decision.waits_for_concurrency:
            self.metrics.timeouts_total.labels(policy.name, "queue").inc()
        headers.update(retry_headers(decision))
        return ProxyError(
            429,
            f"{_snake(rejected.dimension.value)}_exceeded",
            f"rate limit exceeded: limit '{rejected.limit}' ({rejected.scope}) allows {_amount(rejected)} "
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
        tokens_per_day=part(check.tokens_per_day),
        tokens_per_month=part(check.tokens_per_month),
        cost_per_day=part(check.cost_per_day),
        cost_per_month=part(check.cost_per_month),
    )


def _never_fitting(policy: RoutePolicy, decision: Decision, tokens: int, cost: int = 0) -> LimitState | None:
    """The enforced state this request can never fit, however long it waits (None if every one can).

    Read from the decision (the stores report such a state with ``retry_after`` 60 and remaining 0):
    ``tokens`` above a tokensPerMinute value, a reservation (tokens, or ``cost``) above a whole day or
    month budget, or any limit of 0. A budget that is only almost spent is not: it frees when its
    window ends (a 429). Not for a degraded decision, whose values are this pod's share of the fleet
    limit.
    """
    if decision.admitted or decision.degraded:
        return None
    shadow = policy.shadow_limits
    return next((s for s in decision.states if s.limit not in shadow and never_fits(s, tokens, cost)), None)


def near_limit(policy: RoutePolicy, decision: Decision) -> list[tuple[str, float]]:
    """Each enforced budget at or above its warnAtPercent after an admission: (limit, used share)."""
    near = []
    for state in decision.states:
        if state.dimension not in BUDGET_DIMENSIONS or state.limit_value <= 0:
            continue
        limit = policy.limit(state.limit)
        if limit is None or limit.mode is LimitMode.SHADOW:
            continue
        used = (state.limit_value - state.remaining) / state.limit_value
        if used * 100 >= limit.warn_at_percent:
            near.append((state.limit, used))
    return near


def warning_header(near: list[tuple[str, float]]) -> str:
    """``x-llmroute-budget-warning``: ``<limit>; used=<ratio>`` per budget, comma-separated."""
    return ", ".join(f"{limit}; used={used:.2f}" for limit, used in near)


def budget_warning(policy: RoutePolicy, decision: Decision) -> str:
    """The ``x-llmroute-budget-warning`` of an admission; '' when no budget is near its limit."""
    return warning_header(near_limit(policy, decision))


def _amount(state: LimitState) -> str:
    """A limit value as a client reads it: money for cost budgets (micro-units inside)."""
    if state.dimension in COST_DIMENSIONS:
        return f"{state.limit_value / 1_000_000:g}"
    return str(state.limit_value)


def _size(decision: Decision, tokens: int) -> int | None:
    """The request size for hiding never-fitting states; None for a degraded (local share) decision."""
    return None if decision.degraded else tokens


def _too_large_message(state: LimitState, tokens: int, cost: int = 0) -> str:
    what = _describe(state.dimension.value)
    where = f"limit '{state.limit}' ({state.scope}) allows {_amount(state)} {what}"
    if state.dimension in COST_DIMENSIONS:
        return (
            f"request too large for the budget: its reservation costs {cost / 1_000_000:g} and {where}; "
            "lower max_tokens or shorten the prompt"
        )
    if state.dimension in BUDGET_DIMENSIONS:
        return (
            f"request too large for the budget: it reserves {tokens} tokens and {where}; "
            "lower max_tokens or shorten the prompt"
        )
    if state.dimension is Dimension.TOKENS_PER_MINUTE:
        return (
            f"request too large for the limit: it reserves {tokens} tokens and {where}; "
            "lower max_tokens or shorten the prompt"
        )
    return f"no request can be admitted: {where}"


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _describe(dimension: str) -> str:
    return {
        "requestsPerMinute": "requests per minute",
        "requestsPerHour": "requests per hour",
        "tokensPerMinute": "tokens per minute",
        "concurrentRequests": "concurrent requests",
        "burst": "requests back to back (burst)",
        "tokensPerDay": "tokens per UTC day",
        "tokensPerMonth": "tokens per UTC month",
        "costPerDay": "spend per UTC day",
        "costPerMonth": "spend per UTC month",
    }.get(dimension, dimension)
