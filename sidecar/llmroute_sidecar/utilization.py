"""``llmroute_quota_utilization``: how much of each route-scoped limit is in use, from admission decisions.

Only limits with ``key: route`` are exported: their state is the route's whole budget (fleet-wide with
the Redis store), so the gauge has one series per limit and dimension. Per-key and per-header limits
count one subject each and are left to ``llmroute_quota_rejections_total``. Decisions of the local
fallback (store down) describe this pod's share only and are skipped.
"""

from __future__ import annotations

from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota.base import Decision, Dimension

ROUTE_SCOPE = "route"
#: Values remembered per (route, limit, dimension) before the memory restarts (a restart only sets
#: each series once more).
LAST_SIZE = 4096


class QuotaUtilization:
    """Sets the gauge from each decision, each series only when its value moved (this is the only
    writer of the gauge, and its series are never removed; label children are kept by ``metrics``)."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics
        self._last: dict[tuple[str, str, Dimension], float] = {}
        """(route, limit, dimension) -> the value last set."""

    def record(self, route: str, decision: Decision) -> None:
        """The used share of every route-scoped limit dimension in ``decision`` (0 to 1)."""
        if decision.degraded:
            return
        last = self._last
        for state in decision.states:
            value = state.limit_value
            if state.scope != ROUTE_SCOPE or value <= 0:
                continue
            used = 1.0 - state.remaining / value
            used = used if used > 0.0 else 0.0  # min(1.0, max(0.0, used)) without the calls
            used = used if used < 1.0 else 1.0
            key = (route, state.limit, state.dimension)
            if last.get(key) == used:
                continue
            if len(last) >= LAST_SIZE:
                last.clear()
            last[key] = used
            self.metrics.quota_utilization.labels(route, state.limit, state.dimension.value).set(used)
