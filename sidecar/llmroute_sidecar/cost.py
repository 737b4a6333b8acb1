"""What requests cost: their tokens at their model's price (``spec.pricing``), per route and model.

``llmroute_cost_total{route, model}`` grows by ``prompt x input + completion x output`` (per million
tokens) for each finished OpenAI request whose model has a price. Model labels are bounded as in
``token_timing``: at most ``MAX_MODELS_PER_ROUTE`` per route, later models under ``other``. The price
of a model name is looked up once per price table (the first matching entry; globs allowed).
Routes with different tables each keep their own meter (one per ``Finisher``).

Cost budgets (costPerDay/Month) count integer micro-units of the pricing currency: a price per
million tokens is exactly micro-units per token, so ``cost_micros`` is ``tokens x price`` summed and
rounded up. Cached prompt tokens are priced at ``cachedInputPerMillion`` (default: the input price).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llmroute_sidecar.api.spec import ModelPrice
from llmroute_sidecar.bounded_labels import BoundedLabel
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.requests import ParsedRequest
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens
from llmroute_sidecar.policy import model_matches
from llmroute_sidecar.token_timing import MAX_MODELS_PER_ROUTE


def price_of(model: str, pricing: Sequence[ModelPrice]) -> ModelPrice | None:
    """The first entry whose model (a name or a glob) matches ``model``; None when unpriced."""
    return next((p for p in pricing if model_matches(model, (p.model,))), None)


def cost(prompt_tokens: int, completion_tokens: int, price: ModelPrice, cached_tokens: int = 0) -> float:
    """The price of a request's usage, in the pricing currency (``cached_tokens`` are part of the prompt)."""
    return _micro_units(prompt_tokens, completion_tokens, price, cached_tokens) / 1e6


def _micro_units(prompt: int, completion: int, price: ModelPrice, cached: int) -> float:
    prompt = max(0, prompt)
    cached = min(prompt, max(0, cached))
    cached_price = (
        price.input_per_million if price.cached_input_per_million is None else price.cached_input_per_million
    )
    return (
        (prompt - cached) * price.input_per_million
        + cached * cached_price
        + max(0, completion) * price.output_per_million
    )


def cost_micros(prompt: int, completion: int, price: ModelPrice | None, cached: int = 0) -> int:
    """A request's usage in micro-units of the currency, rounded up; 0 for an unpriced model."""
    if price is None:
        return 0
    return math.ceil(_micro_units(prompt, completion, price, cached) - 1e-6)


def reservation_micros(prompt_estimate: int, reserved_tokens: int, price: ModelPrice | None) -> int:
    """The price of a reservation: prompt estimate x input + reserved completion x output (micro-units)."""
    completion = max(0, reserved_tokens - prompt_estimate)
    return cost_micros(min(prompt_estimate, reserved_tokens), completion, price)


def reserved_cost(parsed: ParsedRequest, reserved_tokens: int, pricing: Sequence[ModelPrice]) -> int:
    """The reserved cost of a request (micro-units) at its model's price; 0 for unpriced models."""
    price = price_of(parsed.model, pricing) if parsed.model is not None else None
    return reservation_micros(estimate_prompt_tokens(parsed), reserved_tokens, price)


class CostMeter:
    """Counts each finished request's cost under its route and (bounded) model label."""

    def __init__(self, metrics: SidecarMetrics, max_models: int = MAX_MODELS_PER_ROUTE) -> None:
        self.metrics = metrics
        self._model = BoundedLabel(max_models)
        self._table: Sequence[ModelPrice] = ()
        self._prices: dict[str, ModelPrice | None] = {}

    def price(self, model: str, pricing: Sequence[ModelPrice]) -> ModelPrice | None:
        """``price_of``, looked up once per model and price table."""
        if pricing is not self._table:  # a reloaded route: forget the old table's lookups
            self._table, self._prices = pricing, {}
        if model not in self._prices:
            if len(self._prices) >= 4096:
                self._prices.clear()
            self._prices[model] = price_of(model, pricing)
        return self._prices[model]

    def count(
        self,
        route: str,
        model: str | None,
        prompt: int,
        completion: int,
        pricing: Sequence[ModelPrice],
        cached: int = 0,
    ) -> None:
        if model is None or not pricing or prompt + completion <= 0:
            return
        price = self.price(model, pricing)
        if price is None:
            return
        label = self._model(route, model)
        self.metrics.cost_total.labels(route, label).inc(cost(prompt, completion, price, cached))
