"""Day budgets with real processes: 3 sidecars, one redis-server, the mock upstream's known usage.

Prices are chosen so costs are whole micro-units: a chat request "hello there" estimates (and the
mock reports) 10 prompt tokens; at input 1 and output 2 per million tokens, a request reserving
``max_tokens`` 5 costs 10 + 2 x 5 = 20 micro-units, one reserving 20 costs 50. Bounded: at most 40
requests per test, loopback only.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import Redis

from llmroute_sidecar.quota.redis import key_prefix
from llmroute_sidecar.quota.windows import day_window
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, wait_for
from tests.test_sidecar_proxy import CHAT, write_route

pytestmark = pytest.mark.slow
ROUTE = "tests/t"
PRICING = [
    {"model": "gpt-4o*", "inputPerMillion": 1, "outputPerMillion": 2, "cachedInputPerMillion": 0.5},
]


def body(model: str = "gpt-4o-mini", max_tokens: int = 5) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
    }


def used(client: Redis, limit: str, subject: str = "_", short: str = "cpd") -> int:
    return int(client.hget(f"{key_prefix(ROUTE)}:{limit}:{subject}:{short}", "u") or 0)  # type: ignore[arg-type]


async def test_a_cost_budget_holds_exactly_across_three_sidecars(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    budget = {"name": "spend", "costPerDay": 0.00024, "models": ["gpt-4o*"]}  # 240 = 12 x 20
    route = write_route(tmp_path / "r.yaml", mock.url, pricing=PRICING, limits=[budget])
    fleet = [SidecarProcess(route, "--redis", redis_server.url) for _ in range(3)]
    sidecars.extend(fleet)
    client = Redis(port=redis_server.port)
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> tuple[int, dict[str, Any]]:
            target = fleet[index % len(fleet)]
            headers = {"X-Mock-Tokens": "5"}  # the actual usage is the reservation: 20 each
            async with session.post(f"{target.url}{CHAT}", json=body(), headers=headers) as response:
                return response.status, await response.json()

        outcomes = await asyncio.gather(*(one(i) for i in range(30)))
        statuses = Counter(status for status, _ in outcomes)
        assert statuses == Counter({200: 12, 429: 18})
        codes = {document["error"]["code"] for status, document in outcomes if status == 429}
        assert codes == {"cost_per_day_exceeded"}
        wait_for(lambda: used(client, "spend") == 12 * 20, timeout=10, what="every settlement")
        # A model the limit is not scoped to is not counted by it.
        async with session.post(f"{fleet[0].url}{CHAT}", json=body(model="other")) as response:
            assert response.status == 200
    assert used(client, "spend") == 240
    client.close()


async def test_settlement_frees_what_the_reservation_overestimated(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    budget = {"name": "spend", "costPerDay": 0.0001, "warnAtPercent": 50}  # 100 micro-units
    route = write_route(tmp_path / "r.yaml", mock.url, pricing=PRICING, limits=[budget])
    fleet = [SidecarProcess(route, "--redis", redis_server.url) for _ in range(3)]
    sidecars.extend(fleet)
    client = Redis(port=redis_server.port)
    # Each reserves 50 (max_tokens 20) and costs 6 x 1 + 4 x 0.5 + 5 x 2 = 18 (4 cached prompt tokens).
    headers = {"X-Mock-Tokens": "5", "X-Mock-Cached-Tokens": "4"}
    warnings = []
    async with aiohttp.ClientSession() as session:
        for index in range(3):  # without settlement only 2 would fit (2 x 50)
            target = fleet[index]
            async with session.post(f"{target.url}{CHAT}", json=body(max_tokens=20), headers=headers) as r:
                assert r.status == 200, await r.text()
                warnings.append(r.headers.get("x-llmroute-budget-warning"))
            wait_for(lambda n=index: used(client, "spend") == 18 * (n + 1), timeout=10, what="settled")
        before = time.time()
        async with session.post(f"{fleet[0].url}{CHAT}", json=body(max_tokens=20), headers=headers) as r:
            assert r.status == 429  # 54 + 50 > 100: not "never fitting", it waits for the new day
            retry_after = int(r.headers["Retry-After"])
            assert (await r.json())["error"]["code"] == "cost_per_day_exceeded"
        async with session.post(f"{fleet[1].url}{CHAT}", json=body(max_tokens=100), headers=headers) as r:
            assert r.status == 400  # 10 + 200 = 210 > 100: can never fit the budget
            assert (await r.json())["error"]["code"] == "request_too_large_for_limit"
    client.close()
    assert warnings == ["spend; used=0.50", "spend; used=0.68", "spend; used=0.86"]
    day_end = day_window(before)[1]
    assert day_end - before - 2 <= retry_after <= day_end - before + 2
    assert sum(sidecar.metric("llmroute_budget_near_limit_total", limit="spend") for sidecar in fleet) == 3


async def test_key_model_gives_each_model_its_own_budget(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    per_model = {"name": "per-model", "key": "model", "tokensPerDay": 30}  # 2 x (10 + 5) per model
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[per_model])
    sidecar = SidecarProcess(route, "--store", "memory")
    sidecars.append(sidecar)
    statuses: dict[str, list[int]] = {}
    async with aiohttp.ClientSession() as session:
        for model in ("a", "b"):
            for _ in range(3):
                async with session.post(f"{sidecar.url}{CHAT}", json=body(model=model)) as response:
                    statuses.setdefault(model, []).append(response.status)
        async with session.get(f"{sidecar.url}/v1/models") as response:  # no model: not counted
            assert response.status == 200
    assert statuses == {"a": [200, 200, 429], "b": [200, 200, 429]}
