"""What requests cost (``spec.pricing`` -> ``llmroute_cost_total``): pure pricing and a real sidecar."""

from __future__ import annotations

import math
from pathlib import Path

import aiohttp
import pytest

from llmroute_sidecar.api.spec import ModelPrice
from llmroute_sidecar.cost import CostMeter, cost, price_of
from llmroute_sidecar.metrics import SidecarMetrics
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, start, wait_for
from tests.test_sidecar_proxy import CHAT, write_route

PRICING = [
    {"model": "gpt-4o-mini", "inputPerMillion": 0.15, "outputPerMillion": 0.6},
    {"model": "gpt-4o*", "inputPerMillion": 2.5, "outputPerMillion": 10},
]


def prices() -> list[ModelPrice]:
    return [ModelPrice.model_validate(entry) for entry in PRICING]


def test_the_first_matching_entry_prices_a_model() -> None:
    table = prices()
    assert price_of("gpt-4o-mini", table) is table[0]  # exact name before the glob
    assert price_of("gpt-4o-2024-08-06", table) is table[1]
    assert price_of("claude-3", table) is None
    assert cost(1_000_000, 500_000, table[1]) == pytest.approx(2.5 + 5)


def test_unpriced_and_excess_models_are_bounded() -> None:
    metrics = SidecarMetrics()
    meter = CostMeter(metrics, max_models=1)
    table = prices()
    meter.count("ns/r", "gpt-4o-mini", 1000, 1000, table)
    meter.count("ns/r", "gpt-4o", 1000, 0, table)  # a second model on a one-model budget: "other"
    meter.count("ns/r", "claude-3", 1000, 1000, table)  # no price: not counted
    meter.count("ns/r", None, 1000, 1000, table)  # not an OpenAI request

    def value(model: str) -> float:
        return metrics.cost_total.labels("ns/r", model)._value.get()

    assert value("gpt-4o-mini") == pytest.approx((1000 * 0.15 + 1000 * 0.6) / 1e6)
    assert value("other") == pytest.approx(1000 * 2.5 / 1e6)
    reloaded = [ModelPrice(model="gpt-4o-mini", input_per_million=1, output_per_million=1)]
    meter.count("ns/r", "gpt-4o-mini", 1000, 1000, reloaded)  # a new table is looked up anew
    assert value("gpt-4o-mini") == pytest.approx((750 + 2000) / 1e6)


async def test_a_sidecar_counts_the_cost_of_what_the_upstream_reports(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, pricing=PRICING))
    async with aiohttp.ClientSession() as session:
        for model, stream in (("gpt-4o-mini", False), ("gpt-4o-mini", True), ("gpt-4o", False), ("x", False)):
            body = {"model": model, "messages": [{"role": "user", "content": "price me"}], "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            async with session.post(f"{sidecar.url}{CHAT}", json=body) as response:
                assert response.status == 200
                await response.read()
    records = wait_for(lambda: len(sidecar.access_records()) >= 4 and sidecar.access_records())
    assert len(records) == 4
    # The mock reports usage; the access log has each request's tokens (prompt + completion).
    mini = sidecar.metric("llmroute_cost_total", model="gpt-4o-mini")
    big = sidecar.metric("llmroute_cost_total", model="gpt-4o")
    assert sidecar.metric("llmroute_cost_total", model="x") == 0
    prompt = sidecar.metric("llmroute_tokens_total", kind="prompt")
    completion = sidecar.metric("llmroute_tokens_total", kind="completion")
    # Each request: the same prompt and 16 completion tokens (the mock's default) -> per-request cost.
    per_prompt, per_completion = prompt / 4, completion / 4
    assert math.isclose(mini, 2 * (per_prompt * 0.15 + per_completion * 0.6) / 1e6, rel_tol=1e-9)
    assert math.isclose(big, (per_prompt * 2.5 + per_completion * 10) / 1e6, rel_tol=1e-9)
