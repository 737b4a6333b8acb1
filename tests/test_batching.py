"""The store's batcher: operations submitted with ``within`` wait for the next one sent at once, and
go on their own when none comes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from llmroute_sidecar.quota.batching import AnswerWatch, Batcher, LoopLag, Operation, WatchTimer


def operation(name: str) -> Operation:
    return Operation(name, "", [], [], time.monotonic() + 5)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def send(self, batch: list[Operation]) -> None:
        self.batches.append([op.sha for op in batch])
        for op in batch:
            op.resolve(op.sha)


async def test_a_waiting_operation_rides_with_the_next_one_sent() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.send, workers=2, max_batch=10)
    try:
        settle, admit = operation("settle"), operation("admit")
        batcher.submit(settle, within=5.0)  # would wait long: the admission takes it along
        batcher.submit(admit)
        assert await asyncio.wait_for(admit.future, 2) == "admit"
        assert await asyncio.wait_for(settle.future, 2) == "settle"
        assert recorder.batches == [["settle", "admit"]]
    finally:
        await batcher.close()


async def test_a_waiting_operation_goes_alone_when_nothing_follows() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.send, workers=2, max_batch=10)
    try:
        first, second = operation("first"), operation("second")
        batcher.submit(first, within=0.01)
        batcher.submit(second, within=0.01)
        assert await asyncio.wait_for(asyncio.gather(first.future, second.future), 2) == ["first", "second"]
        assert recorder.batches == [["first", "second"]]
    finally:
        await batcher.close()


async def test_closing_fails_what_still_waits() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.send, workers=1, max_batch=10)
    waiting = operation("waiting")
    batcher.submit(waiting, within=60.0)
    await batcher.close()
    assert waiting.future.done() and isinstance(waiting.future.exception(), Exception)
    assert recorder.batches == []


class Timers:
    """Counts the timers the running loop arms (``call_later``) for callbacks of one name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, callback_name: str) -> None:
        self.armed = 0
        loop = asyncio.get_running_loop()
        original = loop.call_later

        def counted(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
            self.armed += getattr(callback, "__name__", "") == callback_name
            return original(delay, callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_later", counted)


async def test_one_lazy_timer_serves_a_stream_of_waiting_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.send, workers=2, max_batch=10)
    timers = Timers(monkeypatch, "_lazy_due")
    try:
        for n in range(50):  # a settlement, then the next request's admission takes it along
            settle, admit = operation(f"settle{n}"), operation(f"admit{n}")
            batcher.submit(settle, within=5.0)
            batcher.submit(admit)
            await asyncio.wait_for(asyncio.gather(settle.future, admit.future), 2)
        assert len(recorder.batches) == 50 and all(len(batch) == 2 for batch in recorder.batches)
        assert timers.armed == 1  # armed once, not once per settlement (nor cancelled each time)
    finally:
        await batcher.close()


async def test_a_lazy_operation_queued_late_waits_its_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept timer fires for an operation already sent: one queued since is not sent early with
    it (it waits for company for its own ``within``) but re-arms the timer and still goes alone."""
    recorder = Recorder()
    batcher = Batcher(recorder.send, workers=2, max_batch=10)
    try:
        first, admit = operation("first"), operation("admit")
        batcher.submit(first, within=0.2)
        batcher.submit(admit)  # takes "first" along; the timer stays armed
        await asyncio.wait_for(asyncio.gather(first.future, admit.future), 2)
        late = operation("late")
        batcher.submit(late, within=0.2)
        assert batcher._lazy_since is not None
        batcher._lazy_since = time.monotonic()  # as if queued just now, whenever the timer fires
        batcher._lazy_due(0.2)  # the timer armed for "first"
        assert not late.future.done() and batcher._lazy_timer is not None
        assert await asyncio.wait_for(late.future, 2) == "late"
        assert recorder.batches == [["first", "admit"], ["late"]]
    finally:
        await batcher.close()


def _watch(
    timer: WatchTimer, lag: LoopLag, expired: asyncio.Queue[str], name: str, timeout: float
) -> AnswerWatch:
    return AnswerWatch(timeout, lag, lambda busy: expired.put_nowait(name), timer=timer)


async def test_a_watch_timer_arms_one_timer_for_many_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round trips answered in time cost no timer of their own; one that is not still expires."""
    lag, timer = LoopLag(), WatchTimer()
    lag.now()  # its ticking task runs from here on, without our counting
    timers = Timers(monkeypatch, "_fire")
    expired: asyncio.Queue[str] = asyncio.Queue()
    try:
        for n in range(100):  # answered: stopped before their time
            _watch(timer, lag, expired, f"ok{n}", 5.0).stop()
        assert timers.armed == 1
        silent = _watch(timer, lag, expired, "silent", 0.05)  # earlier than the armed timer: re-armed
        assert timers.armed == 2
        assert await asyncio.wait_for(expired.get(), 5) == "silent"
        assert silent.verdict is False and expired.empty()  # Redis, not the loop, was late
    finally:
        timer.close()
        await lag.close()
