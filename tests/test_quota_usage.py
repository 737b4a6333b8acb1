"""Reading a route's live usage from Redis: the sidecar's key layout, the pure arithmetic, and a real
redis-server filled by the real quota store, read by a Redis user that may not write anything."""

from __future__ import annotations

import pytest
import redis

from llmroute_operator import quota_usage
from llmroute_operator.quota_usage import (
    LimitQuery,
    SubjectUsage,
    burst_used,
    charges_key,
    dimension_key,
    parse_key,
    read_usage,
    top_subjects,
)
from llmroute_sidecar.quota.base import AdmissionRequest, Dimension, LimitCheck
from llmroute_sidecar.quota.redis import RedisQuotaStore, _keys
from tests.support.redis_procs import RedisCluster, RedisServer

ROUTE = "ns/chat"


def test_keys_are_named_as_the_sidecar_names_them() -> None:
    check = LimitCheck("per-key", "apiKey", subject="ab12", tokens_per_minute=10)
    assert (
        dimension_key(ROUTE, "per-key", "ab12", Dimension.TOKENS_PER_MINUTE),
        charges_key(ROUTE, "per-key", "ab12"),
    ) == _keys(ROUTE, check, Dimension.TOKENS_PER_MINUTE)
    route_check = LimitCheck("all", "route", requests_per_minute=1)
    assert (
        dimension_key(ROUTE, "all", "", Dimension.REQUESTS_PER_MINUTE)
        == _keys(ROUTE, route_check, Dimension.REQUESTS_PER_MINUTE)[0]
    )


def test_parse_key_keeps_to_its_limit_and_skips_charge_hashes() -> None:
    assert parse_key("llmr:{ns/chat}:a:ab12:rpm", ROUTE, "a") == ("ab12", Dimension.REQUESTS_PER_MINUTE)
    assert parse_key("llmr:{ns/chat}:a:_:conc", ROUTE, "a") == ("_", Dimension.CONCURRENT_REQUESTS)
    assert parse_key("llmr:{ns/chat}:a:ab12:tpm:c", ROUTE, "a") is None
    assert parse_key("llmr:{ns/chat}:a-b:ab12:rpm", ROUTE, "a") is None  # another limit
    assert parse_key("llmr:{ns/other}:a:ab12:rpm", ROUTE, "a") is None  # another route
    assert parse_key("llmr:{ns/chat}:members", ROUTE, "members") is None


def test_burst_used_refills_like_the_admission_script() -> None:
    assert burst_used(None, None, 0, 20, 60) == 0  # no bucket: full
    assert burst_used("5", "0", 0, 20, 60) == 15
    assert burst_used("5", "0", 10_000_000, 20, 60) == 5  # 10 s at 1/s refilled 10
    assert burst_used("5", "0", 30_000_000, 20, 60) == 0  # never past the capacity
    assert burst_used("0.5", "0", 0, 20, 0) == 19  # no refill rate: stays


def test_top_subjects_ranks_by_the_fullest_dimension_and_counts_only_active_ones() -> None:
    limits = {"requestsPerMinute": 10, "tokensPerMinute": 1000}
    subjects = [
        SubjectUsage("a", {"requestsPerMinute": 9, "tokensPerMinute": 10}),  # 90 %
        SubjectUsage("b", {"requestsPerMinute": 1, "tokensPerMinute": 950}),  # 95 %
        SubjectUsage("c", {"requestsPerMinute": 2, "tokensPerMinute": 0}),  # 20 %
        SubjectUsage("d", {"requestsPerMinute": 0, "tokensPerMinute": 0}),  # idle
    ]
    assert top_subjects(subjects, limits, 2) == (3, (subjects[1], subjects[0]))
    # Without known limits (tiers decide them per key): by absolute use.
    assert [s.subject for s in top_subjects(subjects, {}, 5)[1]] == ["b", "a", "c"]


async def test_read_usage_reports_what_the_store_counted_without_writing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_usage, "CHARGES_PER_READ", 3)  # the 4 token charges read in two parts
    store = RedisQuotaStore.from_url(redis_server.url)
    route_limit = LimitCheck(
        "all",
        "route",
        requests_per_minute=100,
        requests_per_hour=1000,
        tokens_per_minute=10_000,
        concurrent_requests=5,
        burst=4,
    )

    def key_limit(subject: str) -> LimitCheck:
        return LimitCheck("per-key", "apiKey", subject=subject, requests_per_minute=10)

    try:
        leases = []
        for subject, count in (("aaaa", 3), ("bbbb", 1)):
            for _ in range(count):
                request = AdmissionRequest(
                    ROUTE, (route_limit, key_limit(subject)), tokens=50, lease_seconds=30
                )
                decision = await store.admit(request)
                assert decision.admitted and decision.lease is not None
                leases.append(decision.lease)
        await store.settle(leases[0], 20)  # one finished: 20 tokens charged in place of 50, slot freed
    finally:
        await store.close()

    admin = redis.Redis.from_url(redis_server.url)
    before = {key: admin.dump(key) for key in admin.keys("*")}
    admin.acl_setuser(
        "reader",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        commands=["-@all", "+@read", "+@connection", "+time", "+scan"],
    )
    reader_url = redis_server.url.replace("redis://", "redis://reader:secret@")
    queries = [
        LimitQuery(
            "all",
            (
                Dimension.REQUESTS_PER_MINUTE,
                Dimension.REQUESTS_PER_HOUR,
                Dimension.TOKENS_PER_MINUTE,
                Dimension.CONCURRENT_REQUESTS,
                Dimension.BURST,
            ),
            burst_capacity=4,
            burst_refill_per_minute=100,
        ),
        LimitQuery("per-key", (Dimension.REQUESTS_PER_MINUTE,)),
    ]

    usage = await read_usage(reader_url, ROUTE, queries)

    (route_usage,) = usage["all"]
    assert route_usage.subject == "_"
    assert route_usage.used["requestsPerMinute"] == route_usage.used["requestsPerHour"] == 4
    assert route_usage.used["tokensPerMinute"] == 20 + 3 * 50
    assert route_usage.used["concurrentRequests"] == 3
    assert route_usage.used["burst"] in (3, 4)  # 4 taken, refilling at 100/min (~0.6 s per request)
    assert sorted((s.subject, s.used["requestsPerMinute"]) for s in usage["per-key"]) == [
        ("aaaa", 3),
        ("bbbb", 1),
    ]
    assert {key: admin.dump(key) for key in admin.keys("*")} == before
    reader = redis.Redis.from_url(reader_url)
    with pytest.raises(redis.exceptions.NoPermissionError):  # the reader really can write nothing
        reader.set("x", 1)
    reader.close()
    admin.close()


async def test_an_empty_route_reads_as_no_subjects(redis_server: RedisServer) -> None:
    usage = await read_usage(redis_server.url, ROUTE, [LimitQuery("all", (Dimension.REQUESTS_PER_MINUTE,))])
    assert usage == {"all": []}


async def test_read_usage_from_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    url = redis_cluster.url
    store = RedisQuotaStore.from_url(url)
    check = LimitCheck("per-key", "apiKey", subject="aaaa", requests_per_minute=10, tokens_per_minute=1000)
    try:
        for _ in range(3):
            assert (await store.admit(AdmissionRequest(ROUTE, (check,), tokens=7, lease_seconds=30))).admitted
    finally:
        await store.close()

    usage = await read_usage(
        url, ROUTE, [LimitQuery("per-key", (Dimension.REQUESTS_PER_MINUTE, Dimension.TOKENS_PER_MINUTE))]
    )

    assert usage == {"per-key": [SubjectUsage("aaaa", {"requestsPerMinute": 3, "tokensPerMinute": 21})]}
