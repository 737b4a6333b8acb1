"""Settlement off the response path: leases are settled in the background, retried, drained on stop.

``Finisher`` hands each lease of a store that ``settles_in_background`` to the ``Settler``; the
next request on the same keep-alive connection never waits for Redis. A store that queues
settlements itself (``settle_soon``: Redis) gets each one directly, with a callback for its
outcome, and holds it up to 5 ms to send it with the next admission (one pipelined round trip for
both; a lease's slot and charge are corrected at most that much later, which only errs on the side
of admitting less). Everything else, retries included, goes through the settler's task: a round
settles everything due together (``settle_many``). A failed settlement is retried with backoff
until ``GIVE_UP_SECONDS`` (its lease expires by then anyway), counted once in
``llmroute_store_errors_total{operation="settle"}``, and a settlement given up on (or still
pending at shutdown) in ``llmroute_settlements_lost_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

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


class SettleMany(Protocol):
    """A store's ``settle_many``: a round's leases together (``RedisQuotaStore``)."""

    async def __call__(
        self, settlements: Sequence[tuple[Lease, int, int | None]]
    ) -> list[Exception | None]: ...


class SettleSoon(Protocol):
    """A store's ``settle_soon``: queue one settlement, ``done`` gets None or its error later; False
    when it cannot right now (then the settler's task settles it)."""

    def __call__(
        self,
        lease: Lease,
        actual_tokens: int,
        actual_cost: int | None,
        done: Callable[[Exception | None], None],
    ) -> bool: ...


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
        self._handed: dict[int, Pending] = {}
        """Settlements a store took directly (``settle_soon``), by id, until their outcome arrives."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Settlements not yet known to have reached their store."""
        return len(self._fresh) + len(self._retry) + len(self._inflight) + len(self._handed)

    def submit(
        self, store: QuotaStore, lease: Lease, actual_tokens: int, actual_cost: int | None = None
    ) -> None:
        """Queue a settlement; returns at once. A store that takes settlements itself (``settle_soon``:
        Redis queues it to ride with the next admission) gets it directly, without a turn of this
        settler's task; its failures come back here to be retried like any other."""
        item = Pending(store, lease, actual_tokens, time.monotonic(), actual_cost)
        self._idle.clear()
        settle_soon: SettleSoon | None = getattr(store, "settle_soon", None)
        if settle_soon is not None:
            self._handed[id(item)] = item
            taken = False
            try:
                taken = settle_soon(lease, actual_tokens, actual_cost, partial(self._outcome, item))
            finally:
                if not taken:
                    self._handed.pop(id(item), None)
            if taken:
                return
        self._fresh.append(item)
        self._wake_task()

    def _wake_task(self) -> None:
        """Start the settler's task if needed and have it look at its queues."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="settler")
        self._wake.set()

    def _outcome(self, item: Pending, error: Exception | None) -> None:
        """What became of a settlement handed to its store: done, or retried by the task."""
        if self._handed.pop(id(item), None) is None:
            return  # closed meanwhile: already counted lost
        if error is not None:
            _first_failure(item, error)
            self._failed(item)
            self._wake_task()  # the task waits for the retry's due time
        elif self.pending == 0:
            self._idle.set()

    async def _run(self) -> None:
        while True:
            if not self._fresh:
                if self.pending == 0:
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
            settle_many: SettleMany | None = getattr(batch[indexes[0]].store, "settle_many", None)
            if settle_many is not None:
                jobs.append(self._many(settle_many, [batch[i] for i in indexes], indexes, outcomes))
            else:
                jobs.extend(self._one(batch[i], i, outcomes) for i in indexes)
        if len(jobs) == 1:  # the usual round (one store): no task and no gather around it
            await jobs[0]
        else:
            await asyncio.gather(*jobs)
        return outcomes

    async def _many(
        self, settle_many: SettleMany, items: list[Pending], indexes: list[int], outcomes: list[bool]
    ) -> None:
        errors: list[Exception | None]
        try:
            errors = await settle_many([(item.lease, item.actual_tokens, item.actual_cost) for item in items])
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
        self._lost([*self._inflight, *self._fresh, *self._retry, *self._handed.values()], "shutting down")
        self._inflight = []
        self._handed.clear()
        self._fresh.clear()
        self._retry = []
        self._idle.set()


def _first_failure(item: Pending, error: BaseException) -> None:
    """Say (at debug) that a settlement failed the first time; retries are counted, not logged."""
    if item.attempts == 0:
        log.debug("settlement failed; retrying in the background", extra={"fields": {"error": repr(error)}})
