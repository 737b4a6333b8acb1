"""The Redis quota store against real redis-server processes: exact, atomic, leak-free.

Store-level tests drive ``RedisQuotaStore`` directly; the memory store (the reference model) must
take the same decisions for the same sequence. Process-level tests are in test_fleet_quota.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmroute_sidecar.quota.base import (
    AdmissionRequest,
    Dimension,
    LimitCheck,
    QuotaStore,
    StoreUnavailableError,
)
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.quota.redis import RedisQuotaStore, key_prefix
from tests.support.redis_procs import RedisServer, SentinelProcess
from tests.support.redis_store import record_batches, redis_quota_store  # noqa: F401 (fixture)


def request(
    *checks: LimitCheck, tokens: int = 0, lease: float = 30.0, route: str = "ns/r"
) -> AdmissionRequest:
    return AdmissionRequest(route=route, checks=checks, tokens=tokens, lease_seconds=lease)


async def test_exactly_n_requests_per_minute_then_exact_retry_after(store: RedisQuotaStore) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=5)
    decisions = [await store.admit(request(check)) for _ in range(8)]
    assert [d.admitted for d in decisions] == [True] * 5 + [False] * 3
    rejected = decisions[-1]
    assert rejected.rejected is not None and rejected.rejected.dimension is Dimension.REQUESTS_PER_MINUTE
    assert 59.0 < rejected.retry_after <= 60.0  # the oldest admission leaves the window in just under 60 s
    assert decisions[4].tightest is not None and decisions[4].tightest.remaining == 0


async def test_a_rejected_request_consumes_nothing(store: RedisQuotaStore) -> None:
    wide = LimitCheck("wide", "route", requests_per_minute=100, tokens_per_minute=1000)
    narrow = LimitCheck("narrow", "apiKey", subject="k1", requests_per_minute=1)
    assert (await store.admit(request(wide, narrow, tokens=10))).admitted
    for _ in range(5):
        assert not (await store.admit(request(wide, narrow, tokens=10))).admitted
    decision = await store.admit(request(wide, tokens=10))
    states = {s.dimension: s.remaining for s in decision.states}
    assert states == {Dimension.REQUESTS_PER_MINUTE: 98, Dimension.TOKENS_PER_MINUTE: 980}


async def test_subjects_and_routes_are_independent(store: RedisQuotaStore) -> None:
    for subject in ("a", "b"):
        check = LimitCheck("per-key", "apiKey", subject=subject, requests_per_minute=1)
        assert (await store.admit(request(check))).admitted
        assert not (await store.admit(request(check))).admitted
    other_route = LimitCheck("per-key", "apiKey", subject="a", requests_per_minute=1)
    assert (await store.admit(request(other_route, route="ns/other"))).admitted


async def test_tokens_reserve_then_settle_refunds_and_charges(store: RedisQuotaStore) -> None:
    tpm = LimitCheck("tpm", "route", tokens_per_minute=100)
    first = await store.admit(request(tpm, tokens=60))
    assert first.admitted and first.lease is not None
    assert not (await store.admit(request(tpm, tokens=60))).admitted  # the reservation blocks overshoot
    await store.settle(first.lease, 10)  # over-estimate refunded
    second = await store.admit(request(tpm, tokens=60))
    assert second.admitted and second.lease is not None
    await store.settle(second.lease, 85)  # under-estimate charged: 10 + 85 = 95 used
    decision = await store.admit(request(tpm, tokens=6))
    assert not decision.admitted and decision.rejected is not None and decision.rejected.remaining == 5
    assert (await store.admit(request(tpm, tokens=5))).admitted


async def test_live_charge_is_one_script_call_raising_only(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    tpm = LimitCheck("tpm", "route", tokens_per_minute=1000)
    rpm = LimitCheck("rpm", "route", requests_per_minute=100)
    stream = await store.admit(request(tpm, rpm, tokens=100))
    assert stream.lease is not None
    client = redis.Redis(port=redis_server.port)
    try:
        await store.charge(stream.lease, 150)  # loads the script (NOSCRIPT, SCRIPT LOAD)
        before = int(client.info("commandstats")["cmdstat_evalsha"]["calls"])
        await store.charge(stream.lease, 700)
        calls = int(client.info("commandstats")["cmdstat_evalsha"]["calls"]) - before
    finally:
        client.close()
    assert calls == 1
    assert not (await store.admit(request(tpm, tokens=301))).admitted  # live usage seen
    await store.charge(stream.lease, 600)  # a stale charge never lowers it
    assert not (await store.admit(request(tpm, tokens=301))).admitted
    assert (await store.admit(request(tpm, tokens=200))).admitted  # 700 + 200
    await store.settle(stream.lease, 650)  # the final actual replaces the live charge
    decision = await store.admit(request(tpm, tokens=150))
    assert decision.admitted and decision.tightest is not None and decision.tightest.remaining == 0


async def test_live_charge_of_a_lease_without_token_limits_sends_nothing(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    decision = await store.admit(request(LimitCheck("rpm", "route", requests_per_minute=5)))
    assert decision.lease is not None
    client = redis.Redis(port=redis_server.port)
    try:
        client.config_resetstat()
        await store.charge(decision.lease, 500)
        assert "cmdstat_evalsha" not in client.info("commandstats")
    finally:
        client.close()


async def test_oversize_reservation_is_rejected_for_a_whole_window(store: RedisQuotaStore) -> None:
    decision = await store.admit(request(LimitCheck("tpm", "route", tokens_per_minute=10), tokens=11))
    assert not decision.admitted and decision.retry_after == 60.0


async def test_concurrency_leases_release_on_settle_and_on_expiry(store: RedisQuotaStore) -> None:
    conc = LimitCheck("conc", "route", concurrent_requests=2)
    held = [await store.admit(request(conc, lease=0.3)) for _ in range(2)]
    assert all(d.admitted for d in held)
    blocked = await store.admit(request(conc))
    assert not blocked.admitted and blocked.waits_for_concurrency
    assert held[0].lease is not None
    await store.settle(held[0].lease, 0)
    await store.settle(held[0].lease, 0)  # idempotent
    assert (await store.admit(request(conc, lease=30))).admitted
    # held[1] is never settled (its pod "died"): its slot returns when the lease expires.
    deadline = asyncio.get_running_loop().time() + 5
    while not (await store.admit(request(conc, lease=30))).admitted:
        assert asyncio.get_running_loop().time() < deadline, "an expired lease kept its slot"
        await asyncio.sleep(0.05)


async def test_shadow_limits_report_without_rejecting(store: RedisQuotaStore) -> None:
    shadow = LimitCheck("strict", "route", requests_per_minute=1, shadow=True)
    first, second = await store.admit(request(shadow)), await store.admit(request(shadow))
    assert first.admitted and first.shadow_rejections == ()
    assert second.admitted and [s.limit for s in second.shadow_rejections] == ["strict"]


async def test_burst_bucket_paces_back_to_back_requests(store: RedisQuotaStore) -> None:
    paced = LimitCheck("paced", "route", requests_per_minute=60, burst=3)
    decisions = [await store.admit(request(paced)) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert decisions[3].rejected is not None and decisions[3].rejected.dimension is Dimension.BURST
    assert 0 < decisions[3].retry_after <= 1.0  # one token refills every second at 60/min


async def test_keys_share_the_route_hash_tag_and_expire(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    check = LimitCheck(
        "l", "apiKey", subject="abc", requests_per_minute=5, tokens_per_minute=50, concurrent_requests=2
    )
    decision = await store.admit(request(check, tokens=5))
    assert decision.lease is not None
    keys = [k.decode() for k in await store.client.keys("*")]
    assert keys and all(k.startswith(key_prefix("ns/r")) for k in keys)
    for key in keys:
        assert await store.client.pttl(key) > 0, f"{key} never expires"
    assert "abc" in keys[0] and not any("sk-" in k for k in keys)


async def test_redis_down_raises_store_unavailable_then_recovers(redis_server: RedisServer) -> None:
    quota = RedisQuotaStore.from_url(redis_server.url)
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    try:
        assert (await quota.admit(request(check))).admitted
        redis_server.kill()
        with pytest.raises(StoreUnavailableError):
            await quota.admit(request(check))
        with pytest.raises(StoreUnavailableError):
            await quota.admit(request(check))  # paused: fails at once, without waiting on a timeout
        redis_server.restart()
        deadline = asyncio.get_running_loop().time() + 5
        while not await quota.ping():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert (await quota.admit(request(check))).admitted  # NOSCRIPT after restart is handled
    finally:
        await quota.close()


Operation = tuple[str, int, int]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 40), st.just(0)),
        st.tuples(st.just("settle"), st.integers(0, 10), st.integers(0, 60)),
        st.tuples(st.just("charge"), st.integers(0, 10), st.integers(0, 80)),
    ),
    max_size=25,
)


async def _replay(quota: QuotaStore, ops: list[Operation], route: str) -> list[object]:
    checks = (
        LimitCheck("rpm", "route", requests_per_minute=6),
        LimitCheck("tpm", "route", tokens_per_minute=100),
        LimitCheck("conc", "route", concurrent_requests=3),
    )
    leases = []
    trace: list[object] = []
    for kind, a, b in ops:
        if kind == "admit":
            decision = await quota.admit(request(*checks, tokens=a, route=route))
            trace.append((decision.admitted, decision.rejected.dimension if decision.rejected else None))
            if decision.lease is not None:
                leases.append(decision.lease)
        elif leases and kind == "charge":
            await quota.charge(leases[a % len(leases)], b)  # live usage of a lease not yet settled
        elif leases:
            lease = leases.pop(a % len(leases))
            await quota.settle(lease, b)
            trace.append(("settled", b))
    return trace


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_redis_decides_like_the_reference_model(redis_server: RedisServer, ops: list[Operation]) -> None:
    """Within one window, the Redis store and the in-memory reference take identical decisions."""

    async def compare() -> None:
        quota = RedisQuotaStore.from_url(redis_server.url)
        try:
            await quota.client.flushall()
            expected = await _replay(MemoryQuotaStore(), ops, "ns/model")
            assert await _replay(quota, ops, "ns/model") == expected
        finally:
            await quota.close()

    asyncio.run(compare())


async def test_requests_per_hour_window(store: RedisQuotaStore) -> None:
    hourly = LimitCheck("hourly", "route", requests_per_minute=100, requests_per_hour=3)
    decisions = [await store.admit(request(hourly)) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    rejected = decisions[-1]
    assert rejected.rejected is not None and rejected.rejected.dimension is Dimension.REQUESTS_PER_HOUR
    assert 3590 < rejected.retry_after <= 3600


async def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(extra_args=("--requirepass", "s3cret")).start()
    try:
        check = LimitCheck("rpm", "route", requests_per_minute=1)
        monkeypatch.setenv("LLMROUTE_REDIS_PASSWORD", "s3cret")
        quota = RedisQuotaStore.from_url(server.url)
        monkeypatch.delenv("LLMROUTE_REDIS_PASSWORD")
        try:
            assert (await quota.admit(request(check))).admitted
        finally:
            await quota.close()
        anonymous = RedisQuotaStore.from_url(server.url)
        try:
            with pytest.raises(StoreUnavailableError):
                await anonymous.admit(request(check))
        finally:
            await anonymous.close()
    finally:
        server.cleanup()


async def test_sentinel_url_finds_the_master(redis_server: RedisServer, tmp_path: Path) -> None:
    sentinel = SentinelProcess(tmp_path, redis_server.port)
    try:
        quota = RedisQuotaStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0")
        try:
            check = LimitCheck("rpm", "route", requests_per_minute=2)
            results = [(await quota.admit(request(check))).admitted for _ in range(3)]
        finally:
            await quota.close()
        assert results == [True, True, False]
        direct = redis.Redis(port=redis_server.port)
        assert direct.keys(f"{key_prefix('ns/r')}*")  # the counters live on the master
        direct.close()
    finally:
        sentinel.stop()


async def test_a_quiet_minute_after_a_busy_one_prunes_every_expired_charge(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    """20,000 charges leaving the window at once (past Lua's unpack limit) are freed, exactly."""
    check = LimitCheck("tpm", "route", tokens_per_minute=1_000_000)
    assert (await store.admit(request(check, tokens=5))).admitted
    client = redis.Redis.from_url(redis_server.url)
    try:
        (log,) = client.keys("*:tpm")
        charges = log + b":c"
        seconds, micros = client.time()
        old = (seconds - 120) * 1_000_000 + micros  # two minutes ago: outside the window
        pipe = client.pipeline(transaction=False)
        for start in range(0, 20_000, 2_000):
            ids = [f"old-{n}" for n in range(start, start + 2_000)]
            pipe.zadd(log, {member: old + n for n, member in enumerate(ids)})
            pipe.hset(charges, mapping=dict.fromkeys(ids, 3))
        pipe.hincrby(charges, "_total", 60_000)
        pipe.execute()
        decision = await store.admit(request(check, tokens=7))
        assert decision.admitted
        assert decision.tightest is not None and decision.tightest.remaining == 1_000_000 - 12
        assert client.zcard(log) == 2 and int(client.hget(charges, "_total") or 0) == 12
        assert client.hlen(charges) == 3  # _total and the two live charges
    finally:
        client.close()


async def test_retry_after_of_a_full_token_log_reads_it_in_chunks(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    """A tokensPerMinute rejection waits for the oldest charges that make room, even past the first chunk."""
    check = LimitCheck("tpm", "route", tokens_per_minute=5_000)
    for _ in range(5_000 // 20):
        assert (await store.admit(request(check, tokens=20))).admitted
    rejected = await store.admit(request(check, tokens=3_000))  # needs the 150 oldest charges gone
    assert not rejected.admitted and 55.0 < rejected.retry_after <= 60.0


async def test_a_script_error_is_logged_not_silent(
    store: RedisQuotaStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A script that Redis refuses fails the admission as a store error and says why in the log."""
    check = LimitCheck("rpm", "route", requests_per_minute=10)
    assert (await store.admit(request(check))).admitted
    client = redis.Redis.from_url(redis_server.url)
    try:
        (log,) = client.keys("*:rpm")
        client.delete(log)
        client.set(log, "not a sorted set")  # WRONGTYPE inside the admission script
    finally:
        client.close()
    with caplog.at_level("ERROR", logger="llmroute.quota.redis"), pytest.raises(StoreUnavailableError):
        await store.admit(request(check))
    assert [r.getMessage() for r in caplog.records] == ["redis script error"]
    assert "WRONGTYPE" in str(caplog.records[0].__dict__["fields"]["error"])


async def test_many_settlements_share_one_round_trip(
    store: RedisQuotaStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("conc", "route", concurrent_requests=100, tokens_per_minute=100_000)
    leases = []
    for _ in range(40):
        decision = await store.admit(request(check, tokens=50))
        assert decision.lease is not None
        leases.append(decision.lease)
    first = await store.admit(request(check, tokens=50))  # its settlement loads the script
    assert first.lease is not None
    await store.settle(first.lease, 50)
    trips = record_batches(store, monkeypatch)
    outcomes = await store.settle_many([(lease, 10) for lease in leases])
    assert outcomes == [None] * 40 and trips == [40]
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.keys("*:conc") == []  # every slot released (an empty set is no key)
        (charges,) = client.keys("*:tpm:c")
        assert int(client.hget(charges, "_total") or 0) == 450
    finally:
        client.close()
