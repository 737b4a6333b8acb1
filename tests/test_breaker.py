"""CircuitBreaker transitions, driven by a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from llmroute_sidecar.breaker import BreakerState, CircuitBreaker
from tests.support.clock import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(3, 10.0, clock=clock, on_change=changes.append)


def _trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        assert breaker.allow()
        breaker.record_failure()


def test_starts_closed_and_admits(breaker: CircuitBreaker, changes: list[BreakerState]) -> None:
    assert breaker.state is CLOSED
    assert all(breaker.allow() for _ in range(100))
    assert changes == []


def test_opens_after_consecutive_failures(breaker: CircuitBreaker, changes: list[BreakerState]) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert changes == [OPEN]


def test_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED


def test_open_rejects_until_timer_expires(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(9.999)
    assert breaker.state is OPEN
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.state is HALF_OPEN


def test_state_reports_expiry_and_notifies(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    _trip(breaker)
    clock.advance(10)
    assert breaker.state is HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]
    assert breaker.state is HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]  # reported once


def test_half_open_admits_exactly_one_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    assert breaker.probe_out
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    assert breaker.state is HALF_OPEN


def test_successful_probe_closes(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    _trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 0
    assert not breaker.probe_out
    assert changes == [OPEN, HALF_OPEN, CLOSED]
    # The count restarts from zero: it takes a full threshold to open again.
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED


def test_failed_probe_reopens_with_fresh_timer(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    _trip(breaker)
    clock.advance(15)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert changes == [OPEN, HALF_OPEN, OPEN]
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # a new probe after the fresh timer


def test_released_probe_frees_the_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(10)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release_probe()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_release_probe_when_closed_is_harmless(breaker: CircuitBreaker) -> None:
    breaker.release_probe()
    assert breaker.state is CLOSED
    assert breaker.allow()


def test_stale_verdicts_while_open_are_ignored(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[BreakerState]
) -> None:
    _trip(breaker)
    clock.advance(5)
    breaker.record_success()  # a request admitted before the breaker opened
    assert breaker.state is OPEN
    breaker.record_failure()  # does not extend the timer
    clock.advance(5)
    assert breaker.state is HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]


def test_failure_after_expiry_without_probe_reopens(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(10)
    breaker.record_failure()  # any verdict decides in half-open
    assert breaker.state is OPEN
    clock.advance(9)
    assert breaker.state is OPEN


async def test_concurrent_callers_share_one_probe_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(10)
    probe_may_finish, all_asked = asyncio.Event(), asyncio.Event()
    asked: list[int] = []
    admitted: list[int] = []

    async def caller(i: int) -> None:
        allowed = breaker.allow()
        asked.append(i)
        if len(asked) == 10:
            all_asked.set()
        if not allowed:
            return
        admitted.append(i)
        await probe_may_finish.wait()
        breaker.record_success()

    tasks = [asyncio.create_task(caller(i)) for i in range(10)]
    await all_asked.wait()  # every caller has asked while the probe is out
    assert len(admitted) == 1
    assert breaker.state is HALF_OPEN
    probe_may_finish.set()
    await asyncio.gather(*tasks)
    assert breaker.state is CLOSED
    assert all(breaker.allow() for _ in range(10))


async def test_cancelled_probe_releases_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(10)
    started = asyncio.Event()

    async def probe() -> None:
        assert breaker.allow()
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            breaker.release_probe()
            raise

    task = asyncio.create_task(probe())
    await started.wait()
    assert not breaker.allow()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.allow()


def test_reconfigure_threshold(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.reconfigure(failure_threshold=2, open_seconds=10.0)
    breaker.record_failure()
    assert breaker.state is OPEN


def test_reconfigure_open_seconds_applies_to_running_timer(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _trip(breaker)
    clock.advance(3)
    assert breaker.state is OPEN
    breaker.reconfigure(failure_threshold=3, open_seconds=2.0)
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize(("threshold", "seconds"), [(0, 1.0), (-1, 1.0), (1, -0.1)])
def test_rejects_invalid_settings(threshold: int, seconds: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold, seconds)


def test_threshold_one_and_zero_open_seconds(clock: FakeClock, changes: list[BreakerState]) -> None:
    breaker = CircuitBreaker(1, 0.0, clock=clock, on_change=changes.append)
    breaker.record_failure()
    assert breaker.state is HALF_OPEN  # zero open time: straight to probing
    assert breaker.allow()
    assert not breaker.allow()
    assert changes == [OPEN, HALF_OPEN]


def test_no_callback_is_fine(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert str(BreakerState.HALF_OPEN) == "half_open"
