"""Time to first token, time per output token and quota utilization: real sidecar processes in front
of the mock upstream, read back from ``/metrics``; the bounded model label in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota.base import Decision, Dimension, LimitState
from llmroute_sidecar.token_timing import OTHER_MODEL, TokenTiming
from llmroute_sidecar.utilization import QuotaUtilization
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, http_get, start, wait_for
from tests.test_sidecar_proxy import CHAT, write_route

ROUTE = "tests/t"
TTFT = "llmroute_time_to_first_token_seconds"
TPOT = "llmroute_time_per_output_token_seconds"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(sidecar: SidecarProcess) -> Samples:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    _, text = http_get(f"{sidecar.admin}/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def wait_samples(sidecar: SidecarProcess, series: list[dict[str, str]]) -> Samples:
    """The samples once every TTFT ``series`` has one observation (finish runs after the response)."""

    def observed() -> Samples | None:
        found = samples(sidecar)
        return found if all(value(found, f"{TTFT}_count", **labels) == 1 for labels in series) else None

    found: Samples = wait_for(observed, what=f"TTFT observations of {series}")
    return found


def chat(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": stream}


async def test_ttft_and_tpot_are_observed_per_route_and_model(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    slow_stream = {"X-Mock-Latency": "0.6", "X-Mock-Tokens": "6", "X-Mock-Token-Interval": "0.05"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat("alpha", True), headers=slow_stream) as r:
            assert r.status == 200
            await r.read()
        async with session.post(
            f"{sidecar.url}{CHAT}", json=chat("beta", False), headers={"X-Mock-Latency": "0.3"}
        ) as r:
            assert r.status == 200
            await r.read()
        async with session.post(  # an upstream error is no token timing
            f"{sidecar.url}{CHAT}", json=chat("gamma", False), headers={"X-Mock-Status": "500"}
        ) as r:
            assert r.status == 500
        async with session.post(f"{sidecar.url}/v1/models", json={}) as r:  # not an OpenAI request
            await r.read()

    alpha, beta = {"route": ROUTE, "model": "alpha"}, {"route": ROUTE, "model": "beta"}
    found = wait_samples(sidecar, [alpha, beta])
    # TTFT: at least the upstream's latency before the first token, well below the whole stream.
    assert 0.6 <= value(found, f"{TTFT}_sum", **alpha) < 3
    assert value(found, f"{TTFT}_bucket", **alpha, le="0.5") == 0
    assert 0.3 <= value(found, f"{TTFT}_sum", **beta) < 3
    # TPOT of the stream only: 5 gaps of 0.05 s over 6 tokens, latency before the first token excluded.
    assert value(found, f"{TPOT}_count", **alpha) == 1
    assert 0.03 <= value(found, f"{TPOT}_sum", **alpha) < 0.2
    assert value(found, f"{TPOT}_count", **beta) == 0
    models = {dict(labels)["model"] for (name, labels) in found if name == f"{TTFT}_count"}
    assert models == {"alpha", "beta"}


async def test_a_stream_of_one_token_has_a_ttft_but_no_tpot(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.url}{CHAT}", json=chat("one", True), headers={"X-Mock-Tokens": "1"}) as r,
    ):
        assert r.status == 200
        await r.read()
    labels = {"route": ROUTE, "model": "one"}
    found = wait_samples(sidecar, [labels])
    assert value(found, f"{TPOT}_count", **labels) == 0


async def test_route_scoped_limits_export_their_utilization(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    limits = [
        {"name": "budget", "key": "route", "requestsPerMinute": 10, "concurrentRequests": 4},
        {"name": "tenant", "key": "header:X-Tenant-ID", "requestsPerMinute": 5},
    ]
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, limits=limits))
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(
                f"{sidecar.url}{CHAT}", json=chat("m", False), headers={"X-Tenant-ID": "acme"}
            ) as r:
                assert r.status == 200
                await r.read()
    found = samples(sidecar)
    name = "llmroute_quota_utilization"
    assert value(found, name, route=ROUTE, limit="budget", dimension="requestsPerMinute") == 0.4
    # The fourth request held one of four concurrency slots when it was admitted.
    assert value(found, name, route=ROUTE, limit="budget", dimension="concurrentRequests") == 0.25
    assert {dict(labels)["limit"] for (n, labels) in found if n == name} == {"budget"}


# -- in process ----------------------------------------------------------------------------------


def _exchange(model: str, stream: bool = False) -> Exchange:
    ex = Exchange("id", "trace", ROUTE, "POST", CHAT, started=10.0, status=200, stream=stream, model=model)
    ex.first_byte = ex.first_token = 10.5
    ex.last_token, ex.completion_tokens, ex.delivered = 11.5, 11, True
    return ex


def test_models_beyond_the_cap_count_as_other() -> None:
    metrics = SidecarMetrics()
    timing = TokenTiming(metrics, max_models=2)
    for model in ("a", "b", "c", "d", "a", OTHER_MODEL):
        timing.observe(_exchange(model, stream=True))
    count = metrics.registry.get_sample_value
    assert count(f"{TTFT}_count", {"route": ROUTE, "model": "a"}) == 2
    assert count(f"{TTFT}_count", {"route": ROUTE, "model": "b"}) == 1
    assert count(f"{TTFT}_count", {"route": ROUTE, "model": OTHER_MODEL}) == 3  # c, d and "other" itself
    assert count(f"{TTFT}_count", {"route": ROUTE, "model": "c"}) is None
    assert count(f"{TPOT}_sum", {"route": ROUTE, "model": "a"}) == 2 * 0.1  # (11.5 - 10.5) / (11 - 1)
    # Each route has its own cap.
    other_route = _exchange("c", stream=True)
    other_route.route = "tests/u"
    timing.observe(other_route)
    assert count(f"{TTFT}_count", {"route": "tests/u", "model": "c"}) == 1


def test_what_is_not_timed() -> None:
    metrics = SidecarMetrics()
    timing = TokenTiming(metrics)
    undelivered = _exchange("cut", stream=True)
    undelivered.delivered = False  # a cut stream: TTFT yes, TPOT no
    failed = _exchange("failed")
    failed.status = 502
    passthrough = _exchange("x")
    passthrough.model = None
    silent = _exchange("silent", stream=True)
    silent.first_token = None  # a stream without text
    for ex in (undelivered, failed, passthrough, silent):
        timing.observe(ex)
    count = metrics.registry.get_sample_value
    assert count(f"{TTFT}_count", {"route": ROUTE, "model": "cut"}) == 1
    assert count(f"{TPOT}_count", {"route": ROUTE, "model": "cut"}) == 0
    assert {
        s.labels["model"] for f in metrics.registry.collect() for s in f.samples if "model" in s.labels
    } == {"cut"}


def test_utilization_skips_fallback_decisions_and_other_scopes() -> None:
    metrics = SidecarMetrics()
    utilization = QuotaUtilization(metrics)

    def state(limit: str, scope: str, remaining: int) -> LimitState:
        return LimitState(limit, scope, Dimension.TOKENS_PER_MINUTE, 1000, remaining, 10.0)

    states = (state("vendor", "route", 100), state("per-key", "apiKey", 0))
    utilization.record(ROUTE, Decision(admitted=True, states=states))
    utilization.record(
        ROUTE, Decision(admitted=True, states=(state("vendor", "route", 1000),), degraded=True)
    )
    labels = {"route": ROUTE, "limit": "vendor", "dimension": "tokensPerMinute"}
    assert metrics.registry.get_sample_value("llmroute_quota_utilization", labels) == 0.9
    assert (
        metrics.registry.get_sample_value("llmroute_quota_utilization", {**labels, "limit": "per-key"})
        is None
    )
