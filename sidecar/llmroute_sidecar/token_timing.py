"""Time to first token and time per output token, per route and model, with a bounded model label.

A route gets at most ``MAX_MODELS_PER_ROUTE`` distinct model labels, in the order models are first
seen; requests for any further model count under ``other`` (``bounded_labels``).
"""

from __future__ import annotations

from llmroute_sidecar.bounded_labels import OTHER, BoundedLabel
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.metrics import SidecarMetrics

MAX_MODELS_PER_ROUTE = 50
OTHER_MODEL = OTHER


class TokenTiming:
    """Observes ``llmroute_time_to_first_token_seconds`` and ``llmroute_time_per_output_token_seconds``."""

    def __init__(self, metrics: SidecarMetrics, max_models: int = MAX_MODELS_PER_ROUTE) -> None:
        self.metrics = metrics
        self._model = BoundedLabel(max_models)

    def observe(self, ex: Exchange) -> None:
        """Record one finished request: OpenAI requests the upstream answered below 400 only."""
        if ex.model is None or not 0 < ex.status < 400:
            return
        first = ex.first_token if ex.stream else ex.first_byte
        if first is None:
            return
        model = self._model(ex.route, ex.model)
        # Both series exist for a timed model (a TPOT count of 0 says "timed, no multi-token stream").
        ttft = self.metrics.time_to_first_token_seconds.labels(ex.route, model)
        tpot = self.metrics.time_per_output_token_seconds.labels(ex.route, model)
        ttft.observe(first - ex.started)
        tokens = ex.completion_tokens
        last = ex.last_token
        if ex.stream and ex.delivered and tokens > 1 and last is not None and last > first:
            tpot.observe((last - first) / (tokens - 1))
