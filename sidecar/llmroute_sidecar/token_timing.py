"""Time to first token and time per output token, per route and model, with a bounded model label.

Label children are bound once per (route, model) and kept: the finish of a request costs a dict
lookup and two histogram observations. A route gets at most ``MAX_MODELS_PER_ROUTE`` distinct model
labels, in the order models are first seen; requests for any further model count under ``other``.
"""

from __future__ import annotations

from prometheus_client import Histogram

from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.metrics import SidecarMetrics

MAX_MODELS_PER_ROUTE = 50
OTHER_MODEL = "other"


class TokenTiming:
    """Observes ``llmroute_time_to_first_token_seconds`` and ``llmroute_time_per_output_token_seconds``."""

    def __init__(self, metrics: SidecarMetrics, max_models: int = MAX_MODELS_PER_ROUTE) -> None:
        self.metrics = metrics
        self.max_models = max_models
        self._children: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        self._models: dict[str, int] = {}  # route -> distinct model labels bound (``other`` excluded)

    def observe(self, ex: Exchange) -> None:
        """Record one finished request: OpenAI requests the upstream answered below 400 only."""
        if ex.model is None or not 0 < ex.status < 400:
            return
        first = ex.first_token if ex.stream else ex.first_byte
        if first is None:
            return
        ttft, tpot = self._bound(ex.route, ex.model)
        ttft.observe(first - ex.started)
        tokens = ex.completion_tokens
        last = ex.last_token
        if ex.stream and ex.delivered and tokens > 1 and last is not None and last > first:
            tpot.observe((last - first) / (tokens - 1))

    def _bound(self, route: str, model: str) -> tuple[Histogram, Histogram]:
        children = self._children.get((route, model))
        if children is not None:
            return children
        if model != OTHER_MODEL:
            if self._models.get(route, 0) >= self.max_models:
                return self._bound(route, OTHER_MODEL)
            self._models[route] = self._models.get(route, 0) + 1
        children = (
            self.metrics.time_to_first_token_seconds.labels(route, model),
            self.metrics.time_per_output_token_seconds.labels(route, model),
        )
        self._children[(route, model)] = children
        return children
