"""Settlement off the response path: leases are settled in the background, retried, drained on stop.

``Finisher`` hands each lease of a store that ``settles_in_background`` to the ``Settler``; the
next request on the same keep-alive connection never waits for Redis. A round settles everything
queued when it starts together (``settle_many``); the store shares round trips itself: Redis holds
a round's settlements up to 5 ms to send them with the next admission (one pipelined round trip
for both; a lease's slot and charge are corrected at most that much later, which only errs on the
side of admitting less). A failed settlement is retried with backoff until ``GIVE_UP_SECONDS`` (its
lease expires by then anyway), counted once in ``llmroute_store_errors_total{operation="settle"}``,
and a settlement given up on (or still pending at shutdown) in ``llmroute_settlements_lost_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota.base import Lease, QuotaStore

log = logging.getLogger("llmroute.settlement")

GIVE_UP_SECONDS = 60.0
MIN_RETRY, MAX_RETRY = 0.05, 1.0
MAX_ROUND = 2000


@dataclass
class Pending:
    """One settlement waiting to reach its store."""

    store: QuotaStore
    lease: Lease
    actual_tokens: int
    since: float
    actual_cost: int | None = None
    attempts: int = 0
    due: float = 0.0


@runtime_checkable
class SettlesMany(Protocol):
    """A store that settles a round's leases together (``RedisQuotaStore``)."""

    async def settle_many(
        self, settlements: Sequence[tuple[Lease, int, int | None]]
    ) -> list[Exception | None]: ...


class Settler:
    """A queue and one task that settles leases in concurrent rounds."""

    def __init__(
        self,
        metrics: SidecarMetrics,
        give_up_seconds: float = GIVE_UP_SECONDS,
    ) -> None:
        self.metrics = metrics
        self.give_up_seconds = give_up_seconds
        self._fresh: deque[Pending] = deque()
        self._retry: list[Pending] = []
        self._inflight: list[Pending] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Settlements not yet known to have reached their store."""
        return len(self._fresh) + len(self._retry) + len(self._inflight)

    def submit(
        self, store: QuotaStore, lease: Lease, actual_tokens: int, actual_cost: int | None = None
    ) -> None:
        """Queue a settlement; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="settler")
        self._fresh.append(Pending(store, lease, actual_tokens, time.monotonic(), actual_cost))
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self._fresh:
                if not self._retry:
                    self._idle.set()
                due = min((item.due for item in self._retry), default=None)
                timeout = None if due is None else max(0.0, due - time.monotonic())
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            now = time.monotonic()
            batch = [self._fresh.popleft() for _ in range(min(MAX_ROUND, len(self._fresh)))]
            ready = [item for item in self._retry if item.due <= now][: MAX_ROUND - len(batch)]
            if ready:
                chosen = {id(item) for item in ready}
                self._retry = [item for item in self._retry if id(item) not in chosen]
                batch.extend(ready)
            if batch:
                self._inflight = batch
                outcomes = await self._round(batch)
                self._inflight = []
                for item, ok in zip(batch, outcomes, strict=True):
                    if not ok:
                        self._failed(item)

    async def _round(self, batch: list[Pending]) -> list[bool]:
        """One attempt for each item: stores that settle many at once get their items together."""
        by_store: dict[int, list[int]] = {}
        for index, item in enumerate(batch):
            by_store.setdefault(id(item.store), []).append(index)
        outcomes = [False] * len(batch)
        jobs = []
        for indexes in by_store.values():
            store = batch[indexes[0]].store
            if isinstance(store, SettlesMany):
                jobs.append(self._many(store, [batch[i] for i in indexes], indexes, outcomes))
            else:
                jobs.extend(self._one(batch[i], i, outcomes) for i in indexes)
        if len(jobs) == 1:  # the usual round (one store): no task and no gather around it
            await jobs[0]
        else:
            await asyncio.gather(*jobs)
        return outcomes

    async def _many(
        self, store: SettlesMany, items: list[Pending], indexes: list[int], outcomes: list[bool]
    ) -> None:
        errors: list[Exception | None]
        try:
            errors = await store.settle_many(
                [(item.lease, item.actual_tokens, item.actual_cost) for item in items]
            )
        except Exception as escaped:  # a store that let something escape: every item failed
            errors = [escaped] * len(items)
        for index, item, failure in zip(indexes, items, errors, strict=True):
            outcomes[index] = failure is None
            if failure is not None:
                _first_failure(item, failure)

    async def _one(self, item: Pending, index: int, outcomes: list[bool]) -> None:
        outcomes[index] = await self._attempt(item)

    async def _attempt(self, item: Pending) -> bool:
        try:
            await item.store.settle(item.lease, item.actual_tokens, item.actual_cost)
        except Exception as error:  # StoreUnavailableError, or anything a store let escape
            _first_failure(item, error)
            return False
        return True

    def _failed(self, item: Pending) -> None:
        route = item.lease.request.route
        if item.attempts == 0:
            self.metrics.store_errors_total.labels(route, "settle").inc()
        item.attempts += 1
        now = time.monotonic()
        if now - item.since >= self.give_up_seconds:
            self._lost([item], "gave up retrying")
            return
        item.due = now + min(MAX_RETRY, MIN_RETRY * 2 ** (item.attempts - 1))
        self._retry.append(item)

    def _lost(self, items: list[Pending], why: str) -> None:
        for item in items:
            self.metrics.settlements_lost_total.labels(item.lease.request.route).inc()
        if items:
            log.warning(
                "settlements lost: their leases expire on their own",
                extra={"fields": {"count": len(items), "reason": why}},
            )

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued settlement reached its store (or ``timeout``); True when all did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the task; settlements still pending are counted lost."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._lost([*self._inflight, *self._fresh, *self._retry], "shutting down")
        self._inflight = []
        self._fresh.clear()
        self._retry = []
        self._idle.set()


def _first_failure(item: Pending, error: BaseException) -> None:
    """Say (at debug) that a settlement failed the first time; retries are counted, not logged."""
    if item.attempts == 0:
        log.debug("settlement failed; retrying in the background", extra={"fields": {"error": repr(error)}})
