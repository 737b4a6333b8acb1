"""``llmroute_quota_utilization``: how much of each route-scoped limit is in use, from admission decisions.

Only limits with ``key: route`` are exported: their state is the route's whole budget (fleet-wide with
the Redis store), so the gauge has one series per limit and dimension. Per-key and per-header limits
count one subject each and are left to ``llmroute_quota_rejections_total``. Decisions of the local
fallback (store down) describe this pod's share only and are skipped.
"""

from __future__ import annotations

from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota.base import Decision

ROUTE_SCOPE = "route"


class QuotaUtilization:
    """Sets the gauge from each decision (label children are kept by ``metrics``)."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self.metrics = metrics

    def record(self, route: str, decision: Decision) -> None:
        """The used share of every route-scoped limit dimension in ``decision`` (0 to 1)."""
        if decision.degraded:
            return
        for state in decision.states:
            if state.scope != ROUTE_SCOPE or state.limit_value <= 0:
                continue
            used = 1.0 - state.remaining / state.limit_value
            gauge = self.metrics.quota_utilization.labels(route, state.limit, state.dimension.value)
            gauge.set(min(1.0, max(0.0, used)))
