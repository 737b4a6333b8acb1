"""The Redis store's fast path: a batch written from the submitting task, its replies acted on where
they are read (no worker task, no loop turn in between), with every guarantee of the worker path:
an admission whose caller went away is released, lost scripts are reloaded, batches in flight stay
bounded, a paused or restarted Redis is handled as before (``test_store_faults.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis import Redis

from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota import redis as redis_store
from llmroute_sidecar.quota.base import Lease, LimitCheck, StoreUnavailableError
from llmroute_sidecar.quota.redis import RedisQuotaStore
from llmroute_sidecar.settlement import Settler
from tests.support.redis_procs import RedisServer
from tests.support.redis_store import record_batches, redis_quota_store  # noqa: F401 (fixture)
from tests.test_quota_redis import request


async def test_sequential_admissions_need_no_worker_task(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    assert (await store.admit(request(check))).admitted  # opens the connection, loads the script
    sizes = record_batches(store, monkeypatch)
    by_worker: list[int] = []
    pipeline = store._pipeline

    async def worker_sent(batch: list[Any]) -> list[Any]:
        by_worker.append(len(batch))
        return await pipeline(batch)

    monkeypatch.setattr(store, "_pipeline", worker_sent)
    for _ in range(5):
        assert (await store.admit(request(check))).admitted
    assert sizes == [1] * 5  # one round trip each
    assert by_worker == []  # each written from its caller's task


async def test_an_admission_whose_caller_went_away_is_released(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    check = LimitCheck("conc", "route", concurrent_requests=1)
    first = await store.admit(request(check))
    assert first.admitted and first.lease is not None
    await store.settle(first.lease, 0)
    caller = asyncio.create_task(store.admit(request(check)))
    await asyncio.sleep(0)  # the caller wrote its admission and waits for the reply
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    client = Redis.from_url(redis_server.url)
    try:  # admitted in Redis for nobody: released as soon as the reply is read
        deadline = time.monotonic() + 5
        while client.keys("*:conc"):
            assert time.monotonic() < deadline, "the orphaned slot was never released"
            await asyncio.sleep(0.01)
    finally:
        client.close()
    assert (await store.admit(request(check))).admitted


async def test_scripts_redis_lost_are_reloaded_once(
    store: RedisQuotaStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    assert (await store.admit(request(check))).admitted
    client = Redis.from_url(redis_server.url)
    try:
        client.script_flush()
    finally:
        client.close()
    sizes = record_batches(store, monkeypatch)
    assert (await store.admit(request(check))).admitted
    assert sizes == [1, 1]  # NOSCRIPT, then the script loaded and the admission sent again


async def test_a_burst_keeps_at_most_workers_batches_in_flight(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=10_000)
    assert (await store.admit(request(check))).admitted
    peak = 0
    batcher = store._batcher
    original = batcher._landed

    def landed() -> None:
        nonlocal peak
        peak = max(peak, batcher.in_flight)
        original()

    monkeypatch.setattr(batcher, "_landed", landed)
    sizes = record_batches(store, monkeypatch)
    decisions = await asyncio.gather(*(store.admit(request(check)) for _ in range(300)))
    assert all(decision.admitted for decision in decisions)
    assert 1 <= peak <= redis_store.WORKERS
    assert sum(sizes) == 300 and len(sizes) < 300  # shared round trips, not one each


# -- settlements handed straight to the store -----------------------------------------------------


@contextlib.contextmanager
def paused(redis_server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP): connections stay open, nothing is answered; resumed on exit."""
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)


async def held_slot(store: RedisQuotaStore) -> Lease:
    """The lease of an admission holding the one slot of a concurrency limit."""
    decision = await store.admit(request(LimitCheck("conc", "route", concurrent_requests=1)))
    assert decision.lease is not None
    return decision.lease


@contextlib.asynccontextmanager
async def settling_while_paused(
    store: RedisQuotaStore, redis_server: RedisServer
) -> AsyncIterator[tuple[Settler, SidecarMetrics]]:
    """A held slot's settlement handed to a settler while Redis is paused (resumed on exit)."""
    metrics = SidecarMetrics()
    settler = Settler(metrics)
    lease = await held_slot(store)
    with paused(redis_server):
        settler.submit(store, lease, 0)
        yield settler, metrics


async def test_a_settlement_goes_to_the_store_without_a_turn_of_the_settlers_task(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    settler = Settler(SidecarMetrics())
    settler.submit(store, await held_slot(store), 0)
    assert settler.pending == 1
    assert await settler.drain(5)
    assert settler.pending == 0 and settler._task is None  # the store took it; no task was needed
    client = Redis.from_url(redis_server.url)
    try:
        assert client.keys("*:conc") == []  # the slot is free again
    finally:
        client.close()
    await settler.close()


async def test_a_handed_settlement_redis_did_not_answer_is_retried_until_it_lands(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    async with settling_while_paused(store, redis_server) as (settler, metrics):
        deadline = time.monotonic() + 10
        while metrics.store_errors_total.labels("ns/r", "settle")._value.get() < 1:  # timed out once
            assert time.monotonic() < deadline, "the settlement never failed against a paused Redis"
            await asyncio.sleep(0.02)
    assert await settler.drain(10)  # retried by the settler's task once Redis answers again
    assert metrics.settlements_lost_total.labels("ns/r")._value.get() == 0
    assert (await store.admit(request(LimitCheck("conc", "route", concurrent_requests=1)))).admitted
    await settler.close()


async def test_a_handed_settlement_pending_at_shutdown_is_counted_lost_once(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    async with settling_while_paused(store, redis_server) as (settler, metrics):
        await settler.close()  # still waiting for Redis
        assert metrics.settlements_lost_total.labels("ns/r")._value.get() == 1
    deadline = time.monotonic() + 10
    while store._batcher._queue or store._batcher.in_flight:  # sent, then its outcome arrives
        assert time.monotonic() < deadline, "the settlement's batch never landed"
        await asyncio.sleep(0.02)
    assert metrics.settlements_lost_total.labels("ns/r")._value.get() == 1 and settler.pending == 0


async def test_a_failure_handling_replies_fails_the_callers_instead_of_stranding_them(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    assert (await store.admit(request(check))).admitted

    def broken(batch: list[Any], results: list[Any]) -> None:
        raise RuntimeError("a bug in reply handling")

    monkeypatch.setattr(store, "_sent", broken)
    with pytest.raises(StoreUnavailableError):
        await asyncio.wait_for(store.admit(request(check)), 5)
    monkeypatch.undo()
    assert (await store.admit(request(check))).admitted  # the store goes on
