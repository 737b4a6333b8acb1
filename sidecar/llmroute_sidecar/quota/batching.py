"""Natural batching of store operations: concurrent calls share pipelined round trips.

A few workers (one connection each, at most) take every operation queued while they were busy and
send them as one batch, so a burst of a thousand admissions costs a handful of round trips and never
waits for a connection. An operation not sent within its queue budget fails as *busy* (Redis
answers, this sidecar cannot keep up), which is back-pressure and not an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmroute_sidecar.quota.base import StoreUnavailableError

T = TypeVar("T")

#: Shortest wait between two looks at an operation that is still running.
LAG_TOLERANCE = 0.05
#: A lazy operation this close to its wait is sent rather than waited for again.
LAZY_SLACK = 0.0002


class StoreBusyError(StoreUnavailableError):
    """Redis answers, but an operation could not be sent within its budget (back-pressure)."""


@dataclass
class Operation:
    """One script call waiting for its batch."""

    sha: str
    source: str
    keys: list[str]
    args: list[Any]
    deadline: float
    """Monotonic time after which it is no longer sent (fails as busy)."""
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    orphaned: Callable[[Any], None] | None = None
    """Called with the result when the caller went away before it arrived (to release a lease)."""

    def resolve(self, result: Any) -> None:
        if isinstance(result, BaseException):
            if not self.future.done():
                self.future.set_exception(result)
            return
        if not self.future.done():
            self.future.set_result(result)
        elif self.future.cancelled() and self.orphaned is not None:
            self.orphaned(result)


class Batcher:
    """Queue of operations drained by ``workers`` concurrent batches of at most ``max_batch``."""

    def __init__(
        self,
        send: Callable[[list[Operation]], Awaitable[None]],
        workers: int,
        max_batch: int,
        on_expired: Callable[[], None] | None = None,
        start: Callable[[list[Operation], Callable[[], None]], bool] | None = None,
    ) -> None:
        self._send = send
        self._start = start
        """Starts a batch's round trip from the submitting task (no worker, no loop turn) and calls its
        second argument once every operation is resolved; False when it cannot (then a worker sends)."""
        self._on_expired = on_expired
        self._workers = workers
        self._max_batch = max_batch
        self._queue: deque[Operation] = deque()
        self._idle: list[asyncio.Future[None]] = []
        """One waiter per idle worker: a submission wakes one of them, not all."""
        self._tasks: list[asyncio.Task[None]] = []
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._lazy_since: float | None = None
        """When the oldest operation queued with ``within`` was queued, while any waits."""
        self._dispatch_due = False
        self.in_flight = 0

    def submit(self, operation: Operation, within: float | None = None) -> None:
        """Queue ``operation`` for the next batch, sent as soon as the callbacks of this loop turn ran
        (everything they submit shares it), or, with ``within``, after waiting up to that many seconds
        to ride along with the next operation sent (a settlement goes out with the next admission:
        one round trip for both)."""
        self._queue.append(operation)
        if within is not None:
            # One timer for a stream of lazy operations, not one per operation: it stays armed when a
            # batch takes them along and, when it fires, waits on for whatever was queued since.
            if self._lazy_since is None:
                self._lazy_since = time.monotonic()
            if self._lazy_timer is None:
                self._lazy_timer = asyncio.get_running_loop().call_later(within, self._lazy_due, within)
            return
        if self.in_flight == 0:  # nothing out: no reason to wait, nothing to share the round trip with
            self._dispatch()
        elif not self._dispatch_due:  # busy: sent once this loop turn's callbacks ran, together
            self._dispatch_due = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Send what is queued: straight from here when the store can start a batch itself, else by a
        worker. With ``workers`` batches in flight it waits: the next batch to land takes it along."""
        self._dispatch_due = False
        if not self._queue or self.in_flight >= self._workers:
            return
        if self._start is not None:
            batch = self._take()
            if not batch:
                return
            self.in_flight += 1
            if self._start(batch, self._landed):
                return
            self.in_flight -= 1
            self._queue.extendleft(reversed(batch))
        self._wake_one()

    def _landed(self) -> None:
        self.in_flight -= 1
        self._dispatch()

    def _lazy_due(self, within: float) -> None:
        """The lazy timer fired: send what waited ``within`` (or nearly), else wait for the rest."""
        self._lazy_timer = None
        if self._lazy_since is None:  # taken along by a batch meanwhile
            return
        wait = self._lazy_since + within - time.monotonic()
        if wait > LAZY_SLACK:
            self._lazy_timer = asyncio.get_running_loop().call_later(wait, self._lazy_due, within)
            return
        self._dispatch()

    def _wake_one(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"store-batcher-{n}") for n in range(self._workers)
            ]
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                break

    def fail_queued(self, error: Callable[[], BaseException]) -> None:
        """Fail every operation not yet sent (the store just went down: no point waiting)."""
        while self._queue:
            self._queue.popleft().resolve(error())
        self._lazy_since = None

    async def _work(self) -> None:
        while True:
            while not self._queue:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
            batch = self._take()
            if not batch:
                continue
            self.in_flight += 1
            try:
                await self._send(batch)
            except asyncio.CancelledError:  # closing: nobody may wait forever for this batch
                for operation in batch:
                    operation.resolve(StoreUnavailableError("quota store closed"))
                raise
            except Exception as error:  # send resolves every operation; this is a last resort
                for operation in batch:
                    operation.resolve(StoreUnavailableError(f"quota store error: {error!r}"))
            finally:
                self.in_flight -= 1

    def _take(self) -> list[Operation]:
        now = time.monotonic()
        batch: list[Operation] = []
        while self._queue and len(batch) < self._max_batch:
            operation = self._queue.popleft()
            if operation.future.done():  # the caller went away before it was sent
                continue
            if now > operation.deadline:
                operation.resolve(StoreBusyError("quota store busy: no round trip within the queue budget"))
                if self._on_expired is not None:
                    self._on_expired()
                continue
            batch.append(operation)
        if not self._queue:
            self._lazy_since = None
        return batch

    async def close(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.fail_queued(lambda: StoreUnavailableError("quota store closed"))


class LoopLag:
    """How much of the wall time since a moment the event loop spent too busy to run anything.

    A task wakes every ``TICK`` seconds and adds how late it woke. Time the loop was that late is
    not held against Redis: a thousand requests parsing at once delay our reading of Redis's answer,
    and that must not look like Redis failing to answer.
    """

    TICK = 0.02

    def __init__(self) -> None:
        self.total = 0.0
        self._due = 0.0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        """Cumulative lag, including the tick that is overdue right now."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-loop-lag")
        return self.total + max(0.0, time.monotonic() - self._due) if self._due else self.total

    async def _run(self) -> None:
        while True:
            self._due = time.monotonic() + self.TICK
            await asyncio.sleep(self.TICK)
            self.total += max(0.0, time.monotonic() - self._due)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class AnswerTimeout(TimeoutError):
    """No answer within the operation timeout; ``busy_loop`` when the event loop, not Redis, was late."""

    def __init__(self, busy_loop: bool) -> None:
        super().__init__("no answer within the operation timeout")
        self.busy_loop = busy_loop


class AnswerWatch:
    """Waits ``timeout`` seconds of a responsive event loop (wall time minus loop lag) for an answer,
    then calls ``expire(busy_loop)`` once, unless ``patience()`` says Redis demonstrably answers
    (then it waits on, up to ``limit`` seconds of wall time). ``stop`` when the answer is in.

    Looked at by its own timer, or by a ``WatchTimer`` shared with other watches. An object, not
    closures: a closure that re-arms itself is a reference cycle through the waiting task, left for
    the cycle collector.
    """

    __slots__ = (
        "due",
        "expire",
        "handle",
        "lag",
        "lag0",
        "limit",
        "loop",
        "patience",
        "started",
        "timeout",
        "timer",
        "verdict",
    )

    def __init__(
        self,
        timeout: float,
        lag: LoopLag,
        expire: Callable[[bool], None],
        patience: Callable[[], bool] | None = None,
        limit: float | None = None,
        timer: WatchTimer | None = None,
    ) -> None:
        self.started, self.lag0 = time.monotonic(), lag.now()
        self.timeout, self.lag, self.expire, self.patience = timeout, lag, expire, patience
        self.limit = limit if limit is not None else timeout * 4
        self.verdict: bool | None = None
        """Once expired: True when the event loop, not Redis, was late (``busy_loop``)."""
        self.due = self.started + min(timeout, self.limit)
        """Monotonic time of the next look at the clock."""
        self.timer = timer
        self.handle: asyncio.TimerHandle | None = None
        if timer is not None:
            timer.add(self)
        else:
            self.loop = asyncio.get_running_loop()
            self.handle = self.loop.call_later(self.due - self.started, self.check)

    def check(self) -> None:
        """Its own timer fired."""
        self.handle = None
        if self.look():
            self.handle = self.loop.call_later(self.due - time.monotonic(), self.check)

    def look(self) -> bool:
        """Look at the clock: True while it waits on (``due`` moved), else it expired (once)."""
        now = time.monotonic()
        wall = now - self.started
        responsive = wall - (self.lag.now() - self.lag0)
        if wall >= self.limit:
            self.verdict = True
        elif responsive >= self.timeout and (self.patience is None or not self.patience()):
            self.verdict = wall - responsive > self.timeout / 2
        else:
            self.due = now + min(max(self.timeout - responsive, LAG_TOLERANCE), self.limit - wall)
            return True
        self.expire(self.verdict)
        return False

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.timer is not None:
            self.timer.discard(self)


class WatchTimer:
    """One timer looking at many ``AnswerWatch``es when they are due: a store's round trips, each
    far shorter than its timeout, add and drop a watch instead of arming and cancelling a timer each
    (a timer costs more than the rest of a round trip's bookkeeping, and cancelled timers stay in
    the event loop's heap until their time)."""

    def __init__(self) -> None:
        self._watches: set[AnswerWatch] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def add(self, watch: AnswerWatch) -> None:
        self._watches.add(watch)
        if self._handle is None or watch.due < self._due:
            self._arm(watch.due)

    def discard(self, watch: AnswerWatch) -> None:
        self._watches.discard(watch)

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        self._handle = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        for watch in [watch for watch in self._watches if watch.due <= now]:
            if not watch.look():
                self._watches.discard(watch)
        if self._watches:  # a watch added meanwhile may have armed the timer for later
            due = min(watch.due for watch in self._watches)
            if self._handle is None or due < self._due:
                self._arm(due)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._watches.clear()


async def answered(
    work: Awaitable[T],
    timeout: float,
    lag: LoopLag,
    patience: Callable[[], bool] | None = None,
    hard_limit: float | None = None,
) -> T:
    """Await ``work`` for ``timeout`` seconds of a responsive event loop (wall time minus loop lag).

    When that passes and ``patience()`` says Redis demonstrably answers (another round trip came
    back meanwhile), keep waiting: that is back-pressure, not silence. Never past ``hard_limit``
    seconds of wall time (default ``4 * timeout``); ``busy_loop`` then tells the two apart.

    ``work`` runs in the calling task (no task of its own, no extra loop turns): a timer looks at
    the clock when the timeout is due and, if it has really passed, cancels ``work`` where it waits
    (redis-py and the lean transport then drop the half-read connection).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as deadline:
            # Expiry cancels ``work`` where it waits; raised below as AnswerTimeout.
            watch = AnswerWatch(
                timeout, lag, lambda _: deadline.reschedule(loop.time()), patience, hard_limit
            )
            try:
                return await work
            finally:
                watch.stop()
    except TimeoutError:
        if watch.verdict is not None:
            raise AnswerTimeout(busy_loop=watch.verdict) from None
        raise
