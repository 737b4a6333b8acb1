"""``status.budgets``: what the operator reads of day/month budgets and how the status shows them.

The pure parts (queries, entries, the status merge) are tested directly; the reading against a real
redis-server filled by the sidecar's own store, so the key layout cannot drift apart.
"""

from __future__ import annotations

import redis

from llmroute_operator import status
from llmroute_operator.budgets import (
    BudgetQuery,
    BudgetRead,
    budget_queries,
    budget_status,
    read_budgets,
    window_label,
)
from llmroute_operator.quota_usage import LimitQuery, read_usage
from llmroute_sidecar.api import LLMRouteStatus
from llmroute_sidecar.quota.base import AdmissionRequest, Dimension, LimitCheck
from llmroute_sidecar.quota.redis import RedisQuotaStore
from tests.support.redis_procs import RedisServer
from tests.test_operator_render import route

ROUTE = "default/chat"
LIMITS = [
    {"name": "rpm", "requestsPerMinute": 10},
    {"name": "spend", "costPerMonth": 50.5, "tokensPerDay": 1000},
    {"name": "per-key", "key": "apiKey", "costPerDay": 2},
]


def test_queries_cover_every_budget_of_limits_and_tiers() -> None:
    tiered = route(tiers={"pro": {"tokensPerMonth": 900}}, limits=LIMITS)
    assert budget_queries(tiered) == [
        BudgetQuery("spend", Dimension.TOKENS_PER_DAY, False, 1000),
        BudgetQuery("spend", Dimension.COST_PER_MONTH, False, 50_500_000),
        BudgetQuery("per-key", Dimension.TOKENS_PER_MONTH, True, None),  # only a tier sets it
        BudgetQuery("per-key", Dimension.COST_PER_DAY, True, 2_000_000),
    ]
    assert budget_queries(route(limits=LIMITS[:1])) == []


def test_entries_show_money_windows_and_hashed_id_prefixes() -> None:
    now_us = 1_796_256_000_000_000 + 5  # 2026-12-03 00:00:00 UTC
    assert window_label(Dimension.COST_PER_DAY, now_us) == "2026-12-03"
    assert window_label(Dimension.TOKENS_PER_MONTH, now_us) == "2026-12"
    reads = [
        BudgetRead(BudgetQuery("spend", Dimension.COST_PER_MONTH, False, 50_500_000), now_us, 1_250_000),
        BudgetRead(
            BudgetQuery("per-key", Dimension.COST_PER_DAY, True, 2_000_000),
            now_us,
            None,
            (("ab" * 16, 1_900_000), ("cd" * 16, 7)),
        ),
    ]
    entries = budget_status(reads)
    assert entries == [
        {"limit": "spend", "dimension": "costPerMonth", "window": "2026-12", "budget": 50.5, "used": 1.25},
        {
            "limit": "per-key",
            "dimension": "costPerDay",
            "window": "2026-12-03",
            "budget": 2.0,
            "topConsumers": [{"id": "abababababab", "spend": 1.9}, {"id": "cdcdcdcdcdcd", "spend": 0.000007}],
        },
    ]
    LLMRouteStatus.model_validate({"budgets": entries})  # what the CRD's status schema accepts


def test_the_status_carries_budgets_and_keeps_them_when_not_read() -> None:
    chat = route(limits=LIMITS)
    entries = [{"limit": "spend", "dimension": "costPerMonth", "window": "2026-12", "used": 1.0}]
    fresh = status.route_status(chat, status.Observation(budgets=entries), {}, "2026-12-03T00:00:00Z")
    assert fresh["budgets"] == entries
    kept = status.route_status(chat, status.Observation(), fresh, "2026-12-03T00:00:01Z")
    assert kept["budgets"] == entries
    assert "budgets" not in status.route_status(chat, status.Observation(), {}, "2026-12-03T00:00:01Z")


async def test_read_budgets_reports_the_top_consumers_the_store_counted(redis_server: RedisServer) -> None:
    store = RedisQuotaStore.from_url(redis_server.url)
    try:
        spends = {"a" * 32: 300_000, "b" * 32: 1_500_000, "c" * 32: 10}
        for subject, cost in spends.items():
            checks = (
                LimitCheck("per-key", "apiKey", subject=subject, cost_per_day=2_000_000),
                LimitCheck("spend", "route", tokens_per_day=1000),
            )
            admitted = await store.admit(
                AdmissionRequest(ROUTE, checks, tokens=100, lease_seconds=30, cost=cost)
            )
            assert admitted.lease is not None
            await store.settle(admitted.lease, 40, cost // 2 if subject.startswith("b") else cost)
    finally:
        await store.close()
    client = redis.Redis(port=redis_server.port)
    before = {key: client.dump(key) for key in client.keys("*")}  # type: ignore[union-attr]
    queries = [
        BudgetQuery("per-key", Dimension.COST_PER_DAY, True, 2_000_000),
        BudgetQuery("spend", Dimension.TOKENS_PER_DAY, False, 1000),
    ]
    entries = budget_status(await read_budgets(redis_server.url, ROUTE, queries))
    after = {key: client.dump(key) for key in client.keys("*")}  # type: ignore[union-attr]
    client.close()
    assert after == before  # the read wrote nothing
    assert [c["id"] for c in entries[0]["topConsumers"]] == ["bbbbbbbbbbbb", "aaaaaaaaaaaa", "cccccccccccc"]
    assert [c["spend"] for c in entries[0]["topConsumers"]] == [0.75, 0.3, 0.00001]
    assert entries[1]["used"] == 3 * 40 and entries[1]["budget"] == 1000
    usage = await read_usage(redis_server.url, ROUTE, [LimitQuery("per-key", (Dimension.COST_PER_DAY,))])
    assert {u.subject: u.used["costPerDay"] for u in usage["per-key"]} == {
        "a" * 32: 300_000,
        "b" * 32: 750_000,
        "c" * 32: 10,
    }


def test_the_observer_reads_budgets_only_with_a_redis_url_and_survives_redis_down(
    redis_server: RedisServer,
) -> None:
    from llmroute_operator import handlers  # kopf handlers register on import: only here
    from tests.support.redis_procs import free_port

    chat = route(limits=LIMITS)
    assert handlers._read_budgets(None, chat) is None
    assert handlers._read_budgets(redis_server.url, route(limits=LIMITS[:1])) is None  # no budgets
    entries = handlers._read_budgets(redis_server.url, chat)
    assert entries is not None
    assert [(e["limit"], e["dimension"], e.get("used")) for e in entries] == [
        ("spend", "tokensPerDay", 0),
        ("spend", "costPerMonth", 0.0),
        ("per-key", "costPerDay", None),
    ]
    assert entries[2]["topConsumers"] == []
    assert handlers._read_budgets(f"redis://127.0.0.1:{free_port()}/0", chat) is None  # kept as it was
