"""Readiness: the rules that tell Kubernetes to send this pod's traffic elsewhere.

Not ready while draining, when saturated (in flight >= readiness.maxInFlight), when the circuit
breaker is open, when the upstream health path fails, when the upstream error rate over the last
minute exceeds readiness.maxErrorRate (with several upstreams: every upstream's breaker, health
path or error rate), and when the quota store is down under onStoreFailure: deny.
A store that reports its state counts as down only when it is ``down`` (refused, reset, or no
answer to PING); ``busy`` (answers, but operations wait past their budget) keeps the pod ready.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmroute_sidecar.api.spec import Readiness, StoreFailurePolicy

ERROR_WINDOW_SECONDS = 60.0
MIN_ERROR_SAMPLES = 10


class ErrorRate:
    """Share of failed upstream requests over a sliding minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = ERROR_WINDOW_SECONDS):
        self._clock = clock
        self._window = window
        self._events: deque[tuple[float, bool]] = deque()
        self._failures = 0

    def record(self, ok: bool) -> None:
        self._events.append((self._clock(), ok))
        self._failures += not ok
        self._prune()

    def _prune(self) -> None:
        horizon = self._clock() - self._window
        while self._events and self._events[0][0] < horizon:
            _, ok = self._events.popleft()
            self._failures -= not ok

    def snapshot(self) -> tuple[int, float]:
        """(samples, failure share) over the window."""
        self._prune()
        samples = len(self._events)
        return samples, (self._failures / samples if samples else 0.0)


@dataclass
class HealthState:
    """What readiness depends on, updated by the proxy and background probes."""

    draining: bool = False
    inflight: int = 0
    breaker_open: bool = False
    upstream_healthy: bool | None = None
    """Result of the last upstream health probe; None when not probed."""
    upstream_health_detail: str = ""
    store_available: bool = True
    """Outcome of the last store operation (for stores that do not report a state)."""
    store_state: str = ""
    """The store's own state (``up``, ``busy``, ``down``) when it reports one."""
    errors: ErrorRate = field(default_factory=ErrorRate)
    upstream_errors: dict[str, ErrorRate] = field(default_factory=dict)
    """Each configured upstream's own error rate (then ``errors`` is unused): the pod is not ready
    only when every upstream's rate is too high (one upstream still able to serve keeps it ready)."""

    @property
    def store_down(self) -> bool:
        """The store counts as unavailable for readiness."""
        return self.store_state == "down" if self.store_state else not self.store_available


def readiness_reasons(state: HealthState, rules: Readiness, store_policy: StoreFailurePolicy) -> list[str]:
    """Every rule that currently makes the pod not ready; empty means ready."""
    reasons = []
    if state.draining:
        reasons.append("draining: shutting down, finishing in-flight requests")
    if state.inflight >= rules.max_in_flight:
        reasons.append(
            f"saturated: {state.inflight} requests in flight (readiness.maxInFlight {rules.max_in_flight})"
        )
    if state.breaker_open:
        reasons.append("circuit breaker open: the upstream keeps failing")
    if state.upstream_healthy is False:
        reasons.append(
            f"upstream unhealthy: {rules.upstream_health_path} {state.upstream_health_detail}".rstrip()
        )
    rates = [errors.snapshot() for errors in (state.upstream_errors.values() or [state.errors])]
    failing = [
        rate for samples, rate in rates if samples >= MIN_ERROR_SAMPLES and rate > rules.max_error_rate
    ]
    if rates and len(failing) == len(rates):
        whose = "every upstream's lowest error rate" if len(rates) > 1 else "error rate"
        reasons.append(
            f"{whose} {min(failing):.0%} over the last minute exceeds "
            f"readiness.maxErrorRate {rules.max_error_rate:.0%}"
        )
    if state.store_down and store_policy is StoreFailurePolicy.DENY:
        reasons.append("quota store unavailable and onStoreFailure is deny")
    return reasons
