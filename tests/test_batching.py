"""The store's batcher: operations submitted with ``within`` wait for the next one sent at once, and
go on their own when none comes."""

from __future__ import annotations

import asyncio
import time

from llmroute_sidecar.quota.batching import Batcher, Operation


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
