"""Each upstream's state in this process: its circuit breaker and health probe, kept across reloads.

Readiness looks at the upstreams together: the pod is not ready only when none can serve (every
breaker open, or every probed upstream failing its health path).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from llmroute_sidecar.breaker import BreakerState, CircuitBreaker
from llmroute_sidecar.health import ErrorRate, HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.policy import RoutePolicy

log = logging.getLogger("llmroute.proxy")
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass
class UpstreamState:
    """One upstream's breaker and last health probe."""

    name: str
    url: str
    breaker: CircuitBreaker
    healthy: bool | None = None
    """Result of the last health probe of readiness.upstreamHealthPath; None when not probed."""
    health_detail: str = field(default="")


class UpstreamStates:
    """The route's upstreams by name; mirrors them into ``HealthState`` and the breaker gauge."""

    def __init__(self, metrics: SidecarMetrics, health: HealthState) -> None:
        self.metrics = metrics
        self.health = health
        self.route = ""
        self._states: dict[str, UpstreamState] = {}

    def sync(self, policy: RoutePolicy) -> None:
        """Follow the policy's upstreams: new ones get a breaker, kept ones are reconfigured."""
        if self.route and self.route != policy.name:
            for name in self._states:
                self._forget_gauge(name)
            self._states = {}
        self.route = policy.name
        wanted = {target.name: target for target in policy.upstreams}
        for name in [name for name in self._states if name not in wanted]:
            self._forget_gauge(name)
            del self._states[name]
        for name, target in wanted.items():
            cb = target.spec.circuit_breaker
            state = self._states.get(name)
            if state is None:
                breaker = CircuitBreaker(
                    cb.consecutive_failures, cb.open_seconds, on_change=self._on_change(name)
                )
                self._states[name] = UpstreamState(name, target.url, breaker)
                self._on_change(name)(breaker.state)
            else:
                state.url = target.url
                state.breaker.reconfigure(cb.consecutive_failures, cb.open_seconds)
        rates = self.health.upstream_errors
        self.health.upstream_errors = {name: rates.get(name) or ErrorRate() for name in wanted}
        self._mirror()

    def breaker(self, name: str) -> CircuitBreaker:
        return self._states[name].breaker

    def open_names(self) -> frozenset[str]:
        """Upstreams whose breaker is open now (an open breaker whose time is up is half-open)."""
        return frozenset(
            name for name, state in self._states.items() if state.breaker.state is BreakerState.OPEN
        )

    def refresh(self) -> None:
        """Apply due open → half-open transitions, so readiness never disagrees with the breakers."""
        for state in self._states.values():
            state.breaker.state  # noqa: B018
        self._mirror()

    def set_health(self, name: str, healthy: bool | None, detail: str) -> None:
        state = self._states.get(name)
        if state is None:
            return
        if healthy != state.healthy and healthy is not None:
            log.info(
                "upstream health changed",
                extra={"fields": {"upstream": name, "healthy": healthy, "detail": detail}},
            )
        state.healthy, state.health_detail = healthy, detail
        self._mirror()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-upstream state for ``/hints`` and ``/readyz``."""
        return [
            {"name": s.name, "url": s.url, "breaker": s.breaker.state.value, "healthy": s.healthy}
            for s in self._states.values()
        ]

    def _mirror(self) -> None:
        """The aggregate readiness inputs: no upstream can serve."""
        states = list(self._states.values())
        self.health.breaker_open = bool(states) and all(s.breaker.state is BreakerState.OPEN for s in states)
        probed = [s for s in states if s.healthy is not None]
        if not probed:
            self.health.upstream_healthy = None
            self.health.upstream_health_detail = ""
            return
        self.health.upstream_healthy = any(s.healthy for s in probed)
        failing = [s for s in probed if not s.healthy]
        self.health.upstream_health_detail = "; ".join(
            f"{s.health_detail}" if len(states) == 1 else f"{s.name} {s.health_detail}" for s in failing
        )

    def _on_change(self, name: str) -> Any:
        def changed(state: BreakerState) -> None:
            self.metrics.circuit_breaker_state.labels(self.route, name).set(BREAKER_VALUES[state])
            if name in self._states:
                self._mirror()
            if state is not BreakerState.CLOSED:
                log.warning("circuit breaker %s", state.value, extra={"fields": {"upstream": name}})

        return changed

    def _forget_gauge(self, name: str) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.circuit_breaker_state.remove(self.route, name)
