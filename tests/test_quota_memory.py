"""The in-memory quota store, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmroute_sidecar.quota.base import AdmissionRequest, Decision, Dimension, Lease, LimitCheck, LimitState
from llmroute_sidecar.quota.memory import CONCURRENCY_RETRY_SECONDS, MemoryQuotaStore
from tests.support.clock import FakeClock

RPM = Dimension.REQUESTS_PER_MINUTE
RPH = Dimension.REQUESTS_PER_HOUR
TPM = Dimension.TOKENS_PER_MINUTE
CONC = Dimension.CONCURRENT_REQUESTS
BURST = Dimension.BURST


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryQuotaStore:
    return MemoryQuotaStore(clock)


def req(*checks: LimitCheck, route: str = "ns/r", tokens: int = 0, lease: float = 120.0) -> AdmissionRequest:
    return AdmissionRequest(route=route, checks=checks, tokens=tokens, lease_seconds=lease)


def limit(name: str = "l", subject: str = "", **values: int | bool) -> LimitCheck:
    return LimitCheck(name, "route" if not subject else "apiKey", subject, **values)  # type: ignore[arg-type]


def state(decision: Decision, name: str, dimension: Dimension) -> LimitState:
    return next(s for s in decision.states if s.limit == name and s.dimension is dimension)


async def admitted(store: MemoryQuotaStore, request: AdmissionRequest) -> Lease:
    decision = await store.admit(request)
    assert decision.admitted, decision
    assert decision.lease is not None
    return decision.lease


# -- requests per minute / hour ------------------------------------------------------------------


async def test_exactly_n_per_minute_then_exact_retry_after(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(requests_per_minute=3))
    for _ in range(3):
        await admitted(store, request)
        clock.advance(10)
    decision = await store.admit(request)  # t=30; entries at 0, 10, 20
    assert not decision.admitted and decision.lease is None
    assert decision.retry_after == 30
    assert decision.rejected == LimitState("l", "route", RPM, 3, 0, 50.0)
    assert not decision.waits_for_concurrency
    clock.advance(29.5)
    assert not (await store.admit(request)).admitted
    clock.advance(0.5)
    decision = await store.admit(request)
    assert decision.admitted
    assert decision.tightest == LimitState("l", "route", RPM, 3, 0, 60.0)


async def test_sliding_window_has_no_boundary_doubling(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(requests_per_minute=5))
    for _ in range(2):
        await admitted(store, request)
    clock.advance(59)
    for _ in range(3):
        await admitted(store, request)
    assert not (await store.admit(request)).admitted
    clock.advance(2)  # t=61: only the two entries of t=0 expired
    for _ in range(2):
        await admitted(store, request)
    decision = await store.admit(request)
    assert not decision.admitted
    assert decision.retry_after == 58  # the t=59 entries expire at t=119
    clock.advance(58)
    for _ in range(3):
        await admitted(store, request)
    assert not (await store.admit(request)).admitted


async def test_requests_per_hour(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(requests_per_hour=2))
    await admitted(store, request)
    clock.advance(1800)
    await admitted(store, request)
    clock.advance(1200)
    decision = await store.admit(request)
    assert not decision.admitted
    assert decision.retry_after == 600
    assert decision.rejected is not None and decision.rejected.dimension is RPH
    assert decision.rejected.reset_seconds == 2400
    clock.advance(600)
    await admitted(store, request)


async def test_subjects_and_routes_are_independent(store: MemoryQuotaStore) -> None:
    for route in ("ns/a", "ns/b"):
        for subject in ("k1", "k2"):
            request = req(limit(subject=subject, requests_per_minute=1), route=route)
            await admitted(store, request)
            assert not (await store.admit(request)).admitted
    await admitted(store, req(limit("other", subject="k1", requests_per_minute=1), route="ns/a"))


async def test_zero_limit_never_admits(store: MemoryQuotaStore) -> None:
    decision = await store.admit(req(limit(requests_per_hour=0)))
    assert not decision.admitted
    assert decision.retry_after == 3600


# -- all or nothing, ranking ---------------------------------------------------------------------


async def test_rejected_request_consumes_nothing(store: MemoryQuotaStore, clock: FakeClock) -> None:
    wide = limit("wide", requests_per_minute=10, tokens_per_minute=1000, concurrent_requests=5)
    narrow = limit("narrow", requests_per_minute=1)
    shadow = limit("shadow", requests_per_minute=10, shadow=True)
    await admitted(store, req(wide, narrow, shadow, tokens=100))
    for _ in range(3):
        decision = await store.admit(req(wide, narrow, shadow, tokens=100))
        assert not decision.admitted
        assert decision.rejected == LimitState("narrow", "route", RPM, 1, 0, 60.0)
        assert decision.shadow_rejections == ()
    decision = await store.admit(req(wide, shadow, tokens=100))
    assert decision.admitted
    assert state(decision, "wide", RPM).remaining == 8
    assert state(decision, "wide", TPM).remaining == 800
    assert state(decision, "wide", CONC).remaining == 3
    assert state(decision, "shadow", RPM).remaining == 8


async def test_binding_limit_has_the_largest_retry_after(store: MemoryQuotaStore, clock: FakeClock) -> None:
    a, b = limit("a", requests_per_minute=1), limit("b", requests_per_minute=1)
    await admitted(store, req(a))
    clock.advance(10)
    await admitted(store, req(b))
    clock.advance(10)
    decision = await store.admit(req(a, b))
    assert decision.rejected is not None and decision.rejected.limit == "b"
    assert decision.retry_after == 50
    assert [s.limit for s in decision.states] == ["a", "b"]


async def test_tightest_is_least_remaining_then_shortest_window(store: MemoryQuotaStore) -> None:
    hourly = limit("h", requests_per_hour=5)
    check = limit(requests_per_minute=5, tokens_per_minute=1000)
    shadow = limit("s", requests_per_minute=1, shadow=True)
    decision = await store.admit(req(hourly, check, shadow, tokens=10))
    assert decision.tightest == LimitState("l", "route", RPM, 5, 4, 60.0)
    assert len(decision.states) == 4
    decision = await store.admit(req(hourly, check, tokens=988))
    assert decision.tightest == LimitState("l", "route", TPM, 1000, 2, 60.0)


# -- tokens --------------------------------------------------------------------------------------


async def test_reservation_blocks_a_concurrent_overshoot(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(tokens_per_minute=1000)
    first = await admitted(store, req(check, tokens=600))
    assert first.reserved_tokens == 600
    clock.advance(15)
    decision = await store.admit(req(check, tokens=600))
    assert not decision.admitted
    assert decision.retry_after == 45
    assert decision.rejected == LimitState("l", "route", TPM, 1000, 400, 45.0)
    await admitted(store, req(check, tokens=400))


async def test_settle_refunds_an_over_estimate(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(tokens_per_minute=1000)
    lease = await admitted(store, req(check, tokens=600))
    assert not (await store.admit(req(check, tokens=600))).admitted
    await store.settle(lease, 100)
    decision = await store.admit(req(check, tokens=600))
    assert decision.admitted
    assert state(decision, "l", TPM).remaining == 300


async def test_settle_charges_an_under_estimate(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(tokens_per_minute=1000)
    lease = await admitted(store, req(check, tokens=100))
    clock.advance(5)
    await store.settle(lease, 1500)  # debt: 500 over the limit
    clock.advance(5)
    for tokens in (1, 0):
        decision = await store.admit(req(check, tokens=tokens))
        assert not decision.admitted
        assert decision.retry_after == 50  # the debt ages out with its entry, admitted at t=0
        assert decision.rejected is not None and decision.rejected.remaining == 0
    clock.advance(50)
    await admitted(store, req(check, tokens=1000))


async def test_zero_reservation_is_charged_on_settle(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(tokens_per_minute=100)
    lease = await admitted(store, req(check, tokens=0))
    await store.settle(lease, 80)
    decision = await store.admit(req(check, tokens=30))
    assert not decision.admitted and decision.retry_after == 60


async def test_settle_after_the_window_changes_nothing(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(tokens_per_minute=100)
    lease = await admitted(store, req(check, tokens=50, lease=300))
    clock.advance(60)
    await admitted(store, req(check, tokens=100))
    await store.settle(lease, 100)
    decision = await store.admit(req(check, tokens=1))
    assert not decision.admitted and decision.retry_after == 60


async def test_live_charge_raises_a_stream_above_its_reservation(
    store: MemoryQuotaStore, clock: FakeClock
) -> None:
    check = limit(tokens_per_minute=1000)
    stream = await admitted(store, req(check, tokens=100))
    await store.charge(stream, 50)  # below the reservation: nothing changes
    assert state(await store.admit(req(check, tokens=0)), "l", TPM).remaining == 900
    await store.charge(stream, 700)  # live usage: other admissions see it at once
    assert not (await store.admit(req(check, tokens=301))).admitted
    await store.charge(stream, 600)  # never lowered by a stale charge
    decision = await store.admit(req(check, tokens=300))
    assert decision.admitted and state(decision, "l", TPM).remaining == 0
    await store.settle(stream, 650)  # the final actual replaces the live charge
    assert state(await store.admit(req(check, tokens=0)), "l", TPM).remaining == 50


async def test_live_charge_after_settle_or_window_changes_nothing(
    store: MemoryQuotaStore, clock: FakeClock
) -> None:
    check = limit(tokens_per_minute=1000)
    settled = await admitted(store, req(check, tokens=100))
    await store.settle(settled, 100)
    await store.charge(settled, 900)
    old = await admitted(store, req(check, tokens=100, lease=300))
    clock.advance(60)
    await store.charge(old, 900)  # its entry left the window
    await store.charge(Lease("unknown", req(check), 0), 900)
    assert state(await store.admit(req(check, tokens=0)), "l", TPM).remaining == 1000


async def test_oversize_reservation_is_rejected(store: MemoryQuotaStore) -> None:
    decision = await store.admit(req(limit(tokens_per_minute=1000), tokens=1001))
    assert not decision.admitted
    assert decision.retry_after == 60
    assert decision.rejected == LimitState("l", "route", TPM, 1000, 0, 0.0)


# -- burst ---------------------------------------------------------------------------------------


async def test_burst_bucket_paces_requests(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(requests_per_minute=30, burst=3))  # refill: one every 2 s
    for remaining in (2, 1, 0):
        decision = await store.admit(request)
        assert decision.admitted
        assert state(decision, "l", BURST) == LimitState(
            "l", "route", BURST, 3, remaining, (3 - remaining) * 2.0
        )
    decision = await store.admit(request)
    assert not decision.admitted
    assert decision.rejected == LimitState("l", "route", BURST, 3, 0, 6.0)
    assert decision.retry_after == 2.0
    clock.advance(1.5)
    decision = await store.admit(request)
    assert not decision.admitted and decision.retry_after == 0.5
    clock.advance(0.5)
    await admitted(store, request)
    clock.advance(10)  # refills to capacity, not beyond
    for _ in range(3):
        await admitted(store, request)
    assert not (await store.admit(request)).admitted


async def test_sliding_minute_still_caps_a_burst(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(requests_per_minute=2, burst=5))
    for _ in range(2):
        await admitted(store, request)
    decision = await store.admit(request)
    assert decision.rejected is not None and decision.rejected.dimension is RPM
    assert decision.retry_after == 60


# -- concurrency ---------------------------------------------------------------------------------


async def test_concurrency_slots_are_held_and_released_by_settle(store: MemoryQuotaStore) -> None:
    request = req(limit(concurrent_requests=2))
    first = await admitted(store, request)
    second = await admitted(store, request)
    decision = await store.admit(request)
    assert not decision.admitted
    assert decision.waits_for_concurrency
    assert decision.retry_after == CONCURRENCY_RETRY_SECONDS
    assert decision.rejected == LimitState("l", "route", CONC, 2, 0, 0.0)
    await store.settle(first, 0)
    await store.settle(first, 0)  # idempotent: frees nothing more
    await admitted(store, request)
    assert not (await store.admit(request)).admitted
    await store.settle(second, 0)
    await admitted(store, request)


async def test_expired_leases_release_their_slots(store: MemoryQuotaStore, clock: FakeClock) -> None:
    request = req(limit(concurrent_requests=1), lease=30)
    lease = await admitted(store, request)
    clock.advance(29.9)
    assert not (await store.admit(request)).admitted
    clock.advance(0.1)
    await admitted(store, request)
    await store.settle(lease, 0)  # expired: must not free the new holder's slot
    assert not (await store.admit(request)).admitted


async def test_settle_of_unknown_lease_is_a_no_op(store: MemoryQuotaStore) -> None:
    request = req(limit(concurrent_requests=1))
    await store.settle(Lease("nope", request, 0), 10)


# -- shadow, reload ------------------------------------------------------------------------------


async def test_shadow_limits_report_without_rejecting(store: MemoryQuotaStore) -> None:
    shadow = limit("s", requests_per_minute=1, concurrent_requests=1, shadow=True)
    first = await store.admit(req(shadow))
    assert first.admitted and first.shadow_rejections == ()
    assert first.tightest is None
    second = await store.admit(req(shadow))
    assert second.admitted
    assert {s.dimension for s in second.shadow_rejections} == {RPM, CONC}
    assert state(second, "s", CONC).remaining == 0


async def test_live_value_change_applies_to_existing_log(store: MemoryQuotaStore, clock: FakeClock) -> None:
    for _ in range(3):
        await admitted(store, req(limit(requests_per_minute=5)))
        clock.advance(10)
    decision = await store.admit(req(limit(requests_per_minute=2)))
    assert not decision.admitted
    assert decision.retry_after == 40  # two of the three entries must expire: the t=10 one at t=70
    decision = await store.admit(req(limit(requests_per_minute=10)))
    assert decision.admitted
    assert state(decision, "l", RPM).remaining == 6


# -- waiting, memory -----------------------------------------------------------------------------


async def test_wait_for_capacity_wakes_on_settle(store: MemoryQuotaStore) -> None:
    lease = await admitted(store, req(limit(concurrent_requests=1), lease=1000))
    waiter = asyncio.create_task(store.wait_for_capacity(60))
    await asyncio.sleep(0)  # a scheduler yield: the waiter takes its event
    assert not waiter.done()
    await store.settle(lease, 0)
    await asyncio.wait_for(waiter, 5)


async def test_wait_for_capacity_is_bounded_by_lease_expiry(store: MemoryQuotaStore) -> None:
    await admitted(store, req(limit(concurrent_requests=1), lease=0.01))
    await asyncio.wait_for(store.wait_for_capacity(60), 5)


async def test_wait_for_capacity_times_out(store: MemoryQuotaStore) -> None:
    await asyncio.wait_for(store.wait_for_capacity(0.01), 5)
    await asyncio.wait_for(store.wait_for_capacity(-1), 5)


async def test_idle_state_is_dropped(store: MemoryQuotaStore, clock: FakeClock) -> None:
    check = limit(requests_per_minute=30, tokens_per_minute=100, concurrent_requests=3, burst=2)
    for subject in ("a", "b", "c"):
        await admitted(store, req(replace(check, subject=subject), tokens=5, lease=10))
    clock.advance(61)
    await store.admit(req(limit("other", requests_per_minute=1)))
    clock.advance(60)
    await store.admit(req(limit("other", requests_per_minute=1)))
    internals = vars(store)
    assert list(internals["_logs"]) == [("ns/r", "other", "", RPM)]
    assert internals["_buckets"] == internals["_slots"] == internals["_holds"] == {}


# -- reference model -----------------------------------------------------------------------------


def brute_force(times: list[float], n: int) -> list[tuple[bool, float, int]]:
    """(admitted, retry_after, remaining) for each arrival against a list of admission times."""
    log: list[float] = []
    out = []
    for now in times:
        live = [t for t in log if now - t < 60]
        if len(live) < n:
            log.append(now)
            out.append((True, 0.0, n - len(live) - 1))
        elif n == 0:
            out.append((False, 60.0, 0))
        else:
            out.append((False, live[len(live) - n] + 60 - now, 0))
    return out


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 6),
    gaps=st.lists(st.integers(0, 160).map(lambda quarter: quarter / 4), min_size=1, max_size=60),
)
def test_requests_per_minute_matches_brute_force(n: int, gaps: list[float]) -> None:
    clock = FakeClock(0.0)
    store = MemoryQuotaStore(clock)
    request = req(limit(requests_per_minute=n))
    times, observed = [], []
    for gap in gaps:
        clock.advance(gap)
        times.append(clock.now)
        decision = asyncio.run(store.admit(request))
        assert decision.states[0].dimension is RPM
        observed.append((decision.admitted, decision.retry_after, decision.states[0].remaining))
    assert observed == brute_force(times, n)
