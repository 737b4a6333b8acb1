"""What requests cost: their tokens at their model's price (``spec.pricing``), per route and model.

``llmroute_cost_total{route, model}`` grows by ``prompt x input + completion x output`` (per million
tokens) for each finished OpenAI request whose model has a price. Model labels are bounded as in
``token_timing``: at most ``MAX_MODELS_PER_ROUTE`` per route, later models under ``other``. The price
of a model name is looked up once per price table (the first matching entry; globs allowed).
Routes with different tables each keep their own meter (one per ``Finisher``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from llmroute_sidecar.api.spec import ModelPrice
from llmroute_sidecar.bounded_labels import BoundedLabel
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.token_timing import MAX_MODELS_PER_ROUTE


def price_of(model: str, pricing: Sequence[ModelPrice]) -> ModelPrice | None:
    """The first entry whose model (a name or a glob) matches ``model``; None when unpriced."""
    return next((p for p in pricing if p.model == model or fnmatch.fnmatchcase(model, p.model)), None)


def cost(prompt_tokens: int, completion_tokens: int, price: ModelPrice) -> float:
    return (
        max(0, prompt_tokens) * price.input_per_million + max(0, completion_tokens) * price.output_per_million
    ) / 1e6


class CostMeter:
    """Counts each finished request's cost under its route and (bounded) model label."""

    def __init__(self, metrics: SidecarMetrics, max_models: int = MAX_MODELS_PER_ROUTE) -> None:
        self.metrics = metrics
        self._model = BoundedLabel(max_models)
        self._table: Sequence[ModelPrice] = ()
        self._prices: dict[str, ModelPrice | None] = {}

    def count(
        self, route: str, model: str | None, prompt: int, completion: int, pricing: Sequence[ModelPrice]
    ) -> None:
        if model is None or not pricing or prompt + completion <= 0:
            return
        if pricing is not self._table:  # a reloaded route: forget the old table's lookups
            self._table, self._prices = pricing, {}
        if model not in self._prices:
            if len(self._prices) >= 4096:
                self._prices.clear()
            self._prices[model] = price_of(model, pricing)
        price = self._prices[model]
        if price is None:
            return
        label = self._model(route, model)
        self.metrics.cost_total.labels(route, label).inc(cost(prompt, completion, price))
