"""Day and month budgets in both quota stores: window arithmetic, the shared contract, Cluster, memory.

The contract tests run the same sequence against the memory store (the reference model) and a real
redis-server; window rollover is tested on the memory store with an injected wall clock, and the Lua
window arithmetic is compared with ``windows.py`` through a probe script on the real server.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster as ClusterClient

from llmroute_sidecar.quota.base import AdmissionRequest, Dimension, LimitCheck, QuotaStore
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.quota.redis import RedisQuotaStore, key_prefix, top_key
from llmroute_sidecar.quota.scripts import ADMIT, SETTLE, WINDOWS_PROBE
from llmroute_sidecar.quota.windows import civil_from_days, day_window, days_from_civil, month_window
from tests.support.clock import FakeClock
from tests.support.redis_procs import RedisCluster, RedisServer

ROUTE = "ns/r"


def request(*checks: LimitCheck, tokens: int = 0, cost: int = 0) -> AdmissionRequest:
    return AdmissionRequest(route=ROUTE, checks=checks, tokens=tokens, lease_seconds=30.0, cost=cost)


def utc(*parts: int) -> float:
    return calendar.timegm(datetime(*parts, tzinfo=UTC).timetuple())  # type: ignore[misc]


# -- window arithmetic ----------------------------------------------------------------------------


SAMPLES = [
    utc(1970, 1, 1),
    utc(2000, 2, 29, 23, 59, 59),
    utc(2024, 2, 29, 12),
    utc(2023, 2, 28, 23, 59, 59),
    utc(2025, 12, 31, 23, 59, 59),
    utc(2026, 1, 1),
    utc(2026, 4, 30, 23, 59, 59),
    utc(2100, 2, 28, 23),
    *(1_600_000_000 + k * 7_777_777.5 for k in range(40)),
]


@pytest.mark.parametrize("now", SAMPLES)
def test_windows_match_the_calendar(now: float) -> None:
    moment = datetime.fromtimestamp(now, UTC)
    day, day_end = day_window(now)
    assert datetime.fromtimestamp(day * 86_400, UTC).date() == moment.date()
    assert datetime.fromtimestamp(day_end, UTC) == datetime(
        moment.year, moment.month, moment.day, tzinfo=UTC
    ) + timedelta(days=1)
    month, month_end = month_window(now)
    assert month == moment.year * 12 + moment.month - 1
    first_next = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(month_end, UTC) == first_next


def test_month_lengths_and_leap_years() -> None:
    lengths = {}
    for year, month in ((2023, 2), (2024, 2), (1900, 2), (2000, 2), (2026, 4), (2026, 12)):
        start = utc(year, month, 1)
        lengths[(year, month)] = round((month_window(start)[1] - start) / 86_400)
    assert lengths == {
        (2023, 2): 28,
        (2024, 2): 29,
        (1900, 2): 28,
        (2000, 2): 29,
        (2026, 4): 30,
        (2026, 12): 31,
    }
    for days in range(-1000, 200_000, 997):
        assert days_from_civil(*civil_from_days(days)) == days


def test_a_day_ends_exactly_at_midnight() -> None:
    midnight = utc(2026, 3, 1)
    assert day_window(midnight - 0.000001) == (int(midnight // 86_400) - 1, midnight)
    assert day_window(midnight)[0] == int(midnight // 86_400)
    assert month_window(midnight - 1)[1] == midnight
    assert month_window(midnight)[0] == 2026 * 12 + 2


def test_the_lua_windows_agree_with_python(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    try:
        for now in SAMPLES:
            micros = int(now) * 1_000_000 + 999_999
            got = [int(v) for v in client.eval(WINDOWS_PROBE, 0, micros)]  # type: ignore[union-attr]
            day, day_end = day_window(int(now))
            month, month_end = month_window(int(now))
            assert got == [day, int(day_end) * 1_000_000, month, int(month_end) * 1_000_000], now
    finally:
        client.close()


# -- the contract, both stores --------------------------------------------------------------------


class Probe:
    """What a budget holds, read from the store's own state (memory) or from Redis keys."""

    def __init__(self, store: QuotaStore, client: redis.Redis | None) -> None:
        self.store = store
        self.client = client

    def used(self, limit: str, subject: str, dimension: Dimension) -> int:
        if isinstance(self.store, MemoryQuotaStore):
            return self.store.budget_used(ROUTE, limit, subject, dimension)
        assert self.client is not None
        short = {"tokensPerDay": "tpd", "tokensPerMonth": "tpmo", "costPerDay": "cpd", "costPerMonth": "cpmo"}
        key = f"{key_prefix(ROUTE)}:{limit}:{subject or '_'}:{short[dimension.value]}"
        return int(self.client.hget(key, "u") or 0)  # type: ignore[arg-type]

    def top(self, limit: str, dimension: Dimension) -> list[tuple[str, int]]:
        if isinstance(self.store, MemoryQuotaStore):
            return self.store.top_consumers(ROUTE, limit, dimension)
        assert self.client is not None
        raw = self.client.zrevrangebyscore(top_key(ROUTE, limit, dimension), "+inf", 0, 0, 5, withscores=True)
        return [(member.decode(), int(score)) for member, score in raw]  # type: ignore[union-attr]


@pytest.fixture(params=["memory", "redis"])
async def probe(request: pytest.FixtureRequest) -> AsyncIterator[Probe]:
    if request.param == "memory":
        yield Probe(MemoryQuotaStore(), None)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisQuotaStore.from_url(server.url)
    client = redis.Redis(port=server.port)
    try:
        yield Probe(store, client)
    finally:
        client.close()
        await store.close()


async def test_a_cost_budget_admits_exactly_what_fits_then_settles_to_actual(probe: Probe) -> None:
    store = probe.store
    budget = LimitCheck("spend", "route", cost_per_day=1000)
    leases = []
    for _ in range(3):
        decision = await store.admit(request(budget, tokens=50, cost=300))
        assert decision.admitted and decision.lease is not None
        leases.append(decision.lease)
    rejected = await store.admit(request(budget, tokens=50, cost=300))
    assert not rejected.admitted and rejected.rejected is not None
    assert rejected.rejected.dimension is Dimension.COST_PER_DAY and rejected.rejected.remaining == 100
    assert 0 < rejected.retry_after <= 86_400
    assert probe.used("spend", "", Dimension.COST_PER_DAY) == 900
    await store.settle(leases[0], 20, 100)  # the actual cost was lower: 200 freed
    await store.settle(leases[0], 20, 100)  # settling twice changes nothing
    assert probe.used("spend", "", Dimension.COST_PER_DAY) == 700
    fourth = await store.admit(request(budget, tokens=50, cost=300))
    assert fourth.admitted and fourth.tightest is not None and fourth.tightest.remaining == 0
    assert not (await store.admit(request(budget, tokens=1, cost=1))).admitted
    assert fourth.lease is not None
    await store.settle(fourth.lease, 0)  # no response: no cost (actual_cost None, no tokens)
    assert probe.used("spend", "", Dimension.COST_PER_DAY) == 700
    await store.settle(leases[1], 80, 450)  # debt: more than reserved
    assert probe.used("spend", "", Dimension.COST_PER_DAY) == 850
    assert not (await store.admit(request(budget, tokens=1, cost=151))).admitted
    assert (await store.admit(request(budget, tokens=1, cost=150))).admitted


async def test_token_and_cost_budgets_charge_their_own_units_all_or_nothing(probe: Probe) -> None:
    store = probe.store
    budgets = LimitCheck("b", "route", tokens_per_day=100, cost_per_month=10_000)
    rpm = LimitCheck("rpm", "route", requests_per_minute=2)
    first = await store.admit(request(budgets, rpm, tokens=60, cost=4000))
    assert first.admitted and first.lease is not None
    states = {s.dimension: s.remaining for s in first.states}
    assert states[Dimension.TOKENS_PER_DAY] == 40 and states[Dimension.COST_PER_MONTH] == 6000
    assert not (await store.admit(request(budgets, rpm, tokens=60, cost=10))).admitted  # tokens short
    assert (await store.admit(request(budgets, rpm, tokens=40, cost=10))).admitted
    assert not (await store.admit(request(budgets, rpm, tokens=0, cost=0))).admitted  # rpm rejects it
    assert probe.used("b", "", Dimension.TOKENS_PER_DAY) == 100  # the rejection consumed nothing
    assert probe.used("b", "", Dimension.COST_PER_MONTH) == 4010
    await store.settle(first.lease, 30, 2000)
    assert probe.used("b", "", Dimension.TOKENS_PER_DAY) == 70
    assert probe.used("b", "", Dimension.COST_PER_MONTH) == 2010


async def test_a_reservation_above_the_whole_budget_never_fits(probe: Probe) -> None:
    budget = LimitCheck("b", "route", cost_per_day=500)
    decision = await probe.store.admit(request(budget, tokens=5, cost=501))
    assert not decision.admitted and decision.rejected is not None and decision.rejected.remaining == 0
    assert probe.used("b", "", Dimension.COST_PER_DAY) == 0


async def test_subjects_spend_separately_and_the_top_consumers_are_ranked(probe: Probe) -> None:
    store = probe.store
    spends = {"aaaa": 500, "bbbb": 900, "cccc": 100}
    for subject, cost in spends.items():
        check = LimitCheck("per-key", "apiKey", subject=subject, cost_per_day=1000)
        route_wide = LimitCheck("all", "route", cost_per_day=10_000)
        decision = await store.admit(request(check, route_wide, tokens=1, cost=cost))
        assert decision.admitted and decision.lease is not None
        if subject == "aaaa":
            await store.settle(decision.lease, 1, 50)
    assert probe.top("per-key", Dimension.COST_PER_DAY) == [("bbbb", 900), ("cccc", 100), ("aaaa", 50)]
    assert probe.top("all", Dimension.COST_PER_DAY) == []  # route-scoped: one subject, not tracked
    assert probe.used("per-key", "bbbb", Dimension.COST_PER_DAY) == 900
    assert probe.used("all", "", Dimension.COST_PER_DAY) == 1050
    blocked = LimitCheck("per-key", "apiKey", subject="bbbb", cost_per_day=1000)
    assert not (await store.admit(request(blocked, tokens=1, cost=101))).admitted


async def test_live_charges_raise_budgets_in_their_window_and_settlement_replaces_them(probe: Probe) -> None:
    store = probe.store
    check = LimitCheck("per-key", "apiKey", subject="abcd", tokens_per_day=1000, cost_per_day=1000)
    stream = await store.admit(request(check, tokens=100, cost=100))
    assert stream.lease is not None
    await store.charge(stream.lease, 300, 250)
    await store.charge(stream.lease, 200, 200)  # a stale charge never lowers it
    await store.charge(stream.lease, 400)  # no cost known: cost budgets left alone
    assert probe.used("per-key", "abcd", Dimension.TOKENS_PER_DAY) == 400
    assert probe.used("per-key", "abcd", Dimension.COST_PER_DAY) == 250
    assert probe.top("per-key", Dimension.COST_PER_DAY) == [("abcd", 250)]
    assert not (await store.admit(request(check, tokens=601, cost=1))).admitted
    await store.settle(stream.lease, 350, 300)  # the final usage replaces the live charge
    assert probe.used("per-key", "abcd", Dimension.TOKENS_PER_DAY) == 350
    assert probe.top("per-key", Dimension.COST_PER_DAY) == [("abcd", 300)]
    await store.charge(stream.lease, 900, 900)  # settled: nothing left to raise
    assert probe.used("per-key", "abcd", Dimension.COST_PER_DAY) == 300


BudgetOp = tuple[str, int, int, int]
budget_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(0, 1), st.integers(0, 60), st.integers(0, 400)),
        st.tuples(st.just("settle"), st.integers(0, 9), st.integers(0, 90), st.integers(0, 600)),
        st.tuples(st.just("charge"), st.integers(0, 9), st.integers(0, 120), st.integers(0, 700)),
    ),
    max_size=25,
)


async def _replay_budgets(store: QuotaStore, ops: list[BudgetOp]) -> list[object]:
    leases = []
    trace: list[object] = []
    for kind, a, b, c in ops:
        if kind == "admit":
            checks = (
                LimitCheck("per-key", "apiKey", subject="ab"[a], cost_per_day=1000, tokens_per_month=150),
                LimitCheck("all", "route", tokens_per_day=200, requests_per_minute=20),
            )
            decision = await store.admit(request(*checks, tokens=b, cost=c))
            if decision.rejected is not None:  # the failing state; passing ones differ by design
                trace.append((False, decision.rejected.dimension, decision.rejected.remaining))
            else:
                trace.append((True, [(s.dimension, s.remaining) for s in decision.states]))
            if decision.lease is not None:
                leases.append(decision.lease)
        elif leases and kind == "charge":
            await store.charge(leases[a % len(leases)], b, c if c % 3 else None)
        elif leases:
            await store.settle(leases.pop(a % len(leases)), b, c if c % 3 else None)
    return trace


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=budget_ops)
def test_redis_budgets_decide_like_the_reference_model(
    redis_server: RedisServer, ops: list[BudgetOp]
) -> None:
    """Admit, live-charge and settle sequences give identical decisions and totals in both stores."""

    async def compare() -> None:
        redis_store = RedisQuotaStore.from_url(redis_server.url)
        client = redis.Redis(port=redis_server.port)
        try:
            await redis_store.client.flushall()
            memory = MemoryQuotaStore()
            assert await _replay_budgets(redis_store, ops) == await _replay_budgets(memory, ops)
            for store in (memory, redis_store):
                probe = Probe(store, client)
                totals = (
                    probe.used("all", "", Dimension.TOKENS_PER_DAY),
                    [probe.used("per-key", s, Dimension.COST_PER_DAY) for s in "ab"],
                    probe.top("per-key", Dimension.TOKENS_PER_MONTH),
                )
                if store is memory:
                    expected = totals
            assert totals == expected
        finally:
            client.close()
            await redis_store.close()

    asyncio.run(compare())


# -- windows roll over (memory store, injected clocks) ------------------------------------------


async def test_a_new_day_starts_a_fresh_budget_and_old_leases_leave_it_alone() -> None:
    wall = FakeClock(utc(2026, 1, 31, 23, 59, 59))
    store = MemoryQuotaStore(clock=FakeClock(), wall_clock=wall)
    day = LimitCheck("d", "route", tokens_per_day=100)
    month = LimitCheck("m", "route", tokens_per_month=1000)
    old = await store.admit(request(day, month, tokens=100))
    assert old.admitted and old.lease is not None
    rejected = await store.admit(request(day, month, tokens=1))
    assert not rejected.admitted and rejected.retry_after == pytest.approx(1.0)  # until 00:00 UTC
    wall.advance(1.0)  # 2026-02-01 00:00:00: a new day and a new month
    fresh = await store.admit(request(day, month, tokens=100))
    assert fresh.admitted
    await store.settle(old.lease, 10)  # charged in January: nothing to refund in February
    assert store.budget_used(ROUTE, "d", "", Dimension.TOKENS_PER_DAY) == 100
    assert store.budget_used(ROUTE, "m", "", Dimension.TOKENS_PER_MONTH) == 100
    wall.advance(86_400 * 27)  # 2026-02-28: same month, later day
    assert (await store.admit(request(day, month, tokens=100))).admitted
    assert store.budget_used(ROUTE, "m", "", Dimension.TOKENS_PER_MONTH) == 200
    full = await store.admit(request(month, tokens=801))
    assert not full.admitted and full.retry_after == pytest.approx(86_400.0)  # March 1st, 00:00 UTC


# -- Redis specifics --------------------------------------------------------------------------------


async def test_budget_keys_expire_just_after_their_window(redis_server: RedisServer) -> None:
    store = RedisQuotaStore.from_url(redis_server.url)
    client = redis.Redis(port=redis_server.port)
    try:
        check = LimitCheck("k", "apiKey", subject="abcd", tokens_per_day=100, cost_per_month=100)
        before = time.time()
        decision = await store.admit(request(check, tokens=10, cost=10))
        assert decision.admitted and decision.lease is not None
        day_end, month_end = day_window(before)[1], month_window(before)[1]
        assert decision.lease.day == day_window(before)[0]
        for key, end in (
            (f"{key_prefix(ROUTE)}:k:abcd:tpd", day_end),
            (top_key(ROUTE, "k", Dimension.TOKENS_PER_DAY), day_end),
            (f"{key_prefix(ROUTE)}:k:abcd:cpmo", month_end),
        ):
            expires = int(client.pexpiretime(key)) / 1000  # type: ignore[arg-type]
            assert expires == pytest.approx(end + 60, abs=0.01), key
        await store.settle(decision.lease, 5, 5)
        fields = client.hgetall(f"{key_prefix(ROUTE)}:k:abcd:tpd")
        assert set(fields) == {b"w", b"u"}  # the lease's field is gone once settled
    finally:
        client.close()
        await store.close()


@pytest.mark.cluster
async def test_budgets_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    store = RedisQuotaStore.from_url(redis_cluster.url.replace("redis://", "redis+cluster://", 1))
    try:
        checks = (
            LimitCheck("k", "apiKey", subject="abcd", cost_per_day=1000, tokens_per_month=500),
            LimitCheck("all", "route", requests_per_minute=100, cost_per_month=5000),
        )
        leases = []
        for _ in range(2):
            decision = await store.admit(request(*checks, tokens=100, cost=400))
            assert decision.admitted and decision.lease is not None
            leases.append(decision.lease)
        assert not (await store.admit(request(*checks, tokens=100, cost=400))).admitted
        await store.settle(leases[0], 10, 100)
        assert (await store.admit(request(*checks, tokens=100, cost=400))).admitted
    finally:
        await store.close()
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        keys = [key async for key in client.scan_iter(match="llmr:*")]
        slots = {client.keyslot(key) for key in keys}
        assert len(keys) >= 5 and len(slots) == 1  # every key of the route in one slot
        top = await client.zrevrangebyscore(top_key(ROUTE, "k", Dimension.COST_PER_DAY), "+inf", 0)
        assert top == [b"abcd"]
        used = await client.hget(f"{key_prefix(ROUTE)}:k:abcd:cpd", "u")
        assert int(used) == 400 + 100 + 400
    finally:
        await client.aclose()


# -- memory: bounded however many requests ----------------------------------------------------------

SUBJECTS = 1_000


def _charge_batch(client: redis.Redis, admit_sha: str, settle_sha: str, start: int, count: int) -> None:
    """``count`` admissions and settlements of a monthly cost budget over ``SUBJECTS`` keys (pipelined)."""
    pipe = client.pipeline(transaction=False)
    for index in range(start, start + count):
        subject = f"{index % SUBJECTS:032x}"
        key = f"{key_prefix(ROUTE)}:spend:{subject}:cpmo"
        top = top_key(ROUTE, "spend", Dimension.COST_PER_MONTH)
        lease = f"{index:032x}"
        # ADMIT: lease, tokens, lease us, items, cost; item: code, limit, shadow, subject
        pipe.evalsha(admit_sha, 2, key, top, lease, 100, 30_000_000, 1, 1_000_000, 9, 10**15, 0, subject)
        # SETTLE: lease, tokens, items, codes, cost, day, month, subjects (month from the admission)
        pipe.evalsha(settle_sha, 2, key, top, lease, 100, 1, 9, 999_999, 0, _MONTH, subject)
    pipe.execute()


_MONTH = month_window(time.time())[0]


@pytest.mark.slow
def test_a_monthly_budget_uses_memory_per_subject_not_per_request(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    try:
        admit_sha, settle_sha = client.script_load(ADMIT), client.script_load(SETTLE)

        def footprint() -> tuple[int, int]:
            keys = list(client.scan_iter(match="llmr:*", count=1000))
            return len(keys), sum(int(client.memory_usage(key, samples=0) or 0) for key in keys)  # type: ignore[arg-type]

        measured: list[tuple[int, tuple[int, int]]] = []
        done = 0
        for target in (10_000, 100_000):
            while done < target:
                _charge_batch(client, admit_sha, settle_sha, done, 5_000)
                done += 5_000
            measured.append((done, footprint()))
        key = f"{key_prefix(ROUTE)}:spend:{0:032x}:cpmo"
        # 100 requests per subject, each charged 999,999 after reserving 1,000,000: exact totals
        assert int(client.hget(key, "u")) == 100 * 999_999  # type: ignore[arg-type]
        print(f"budget memory: {measured}")  # the numbers docs/quotas.md quotes (pytest -s)
    finally:
        client.close()
    (_, (keys_10k, bytes_10k)), (_, (keys_100k, bytes_100k)) = measured
    assert keys_10k == keys_100k == SUBJECTS + 1  # a hash per subject and one top-consumers set
    assert bytes_100k <= bytes_10k * 1.05  # 10x the requests, the same memory
    assert bytes_100k < 300 * SUBJECTS


async def test_a_lease_settled_after_it_expired_still_settles_its_budget_in_the_window() -> None:
    clock, wall = FakeClock(), FakeClock(utc(2026, 5, 10, 12))
    store = MemoryQuotaStore(clock=clock, wall_clock=wall)
    check = LimitCheck("d", "route", tokens_per_day=100, concurrent_requests=5)
    decision = await store.admit(request(check, tokens=80))
    assert decision.lease is not None
    clock.advance(3600.0)  # the lease (30 s) and its token minute are long over; the day is not
    wall.advance(3600.0)
    assert (await store.admit(request(check, tokens=0))).admitted  # expiry ran: the slot returned
    await store.settle(decision.lease, 20)
    assert store.budget_used(ROUTE, "d", "", Dimension.TOKENS_PER_DAY) == 20


async def test_settled_budget_leases_leave_nothing_queued_for_their_window() -> None:
    clock, wall = FakeClock(), FakeClock(utc(2026, 5, 10, 12))
    store = MemoryQuotaStore(clock=clock, wall_clock=wall)
    check = LimitCheck("m", "route", cost_per_month=10**9)
    for _ in range(200):
        decision = await store.admit(request(check, tokens=1, cost=10))
        assert decision.lease is not None
        await store.settle(decision.lease, 1, 5)
    leaked = await store.admit(request(check, tokens=1, cost=10))  # never settled
    clock.advance(120.0)
    wall.advance(120.0)
    await store.admit(request(check, tokens=1, cost=0))  # runs the expiry
    assert len(store._deadlines) <= 3 and len(store._holds) <= 2  # the leaked lease and the last one
    assert leaked.lease is not None and leaked.lease.lease_id in store._holds
    end = month_window(wall())[1]
    clock.advance(end - wall() + 1)
    wall.advance(end - wall() + 1)
    await store.admit(request(check, tokens=1, cost=0))
    assert leaked.lease.lease_id not in store._holds  # gone with its window
