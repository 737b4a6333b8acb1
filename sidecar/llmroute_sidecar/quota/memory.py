"""The in-memory quota store: exact within one process; the embedded default and the reference model.

The Redis store is property-tested against this one, so the semantics here are the specification:

- Counters are keyed by (route, limit name, subject, dimension): the same limit on another route or
  subject counts separately. Limit values are read on every call, so a changed value (config reload)
  applies at once to what is already counted.
- requestsPerMinute / requestsPerHour are sliding logs: at most N admissions in any 60 s / 3600 s
  window (an entry admitted at ``t`` counts while ``now < t + window``), so there is no fixed-window
  boundary that lets 2N through.
- tokensPerMinute is a sliding log of charges: a request passes only if the charges of the last 60 s
  plus its reservation stay within N. A reservation larger than N can never pass: it is rejected with
  ``retry_after`` = 60 and ``remaining`` 0. Admission charges the reservation; ``settle`` rewrites the
  entry's charge to the actual usage (refund or debt; the entry keeps its admission time; an entry
  already out of the window is left alone). Debt can push usage above N: nothing passes until it ages
  out. A reservation of 0 still logs an entry, so settlement can charge it. ``charge(lease, tokens)``
  raises an unsettled lease's entries to ``max(charge, tokens)`` (live usage of a stream; it never
  lowers a charge; settled or unknown leases and entries out of the window are left alone).
- burst (only with requestsPerMinute) is a token bucket of capacity ``burst``, starting full, refilled
  continuously at requestsPerMinute/60 per second; each admission takes 1. It never goes below empty.
- concurrentRequests counts the unsettled, unexpired leases holding a slot. A lease expires
  ``lease_seconds`` after admission and its slots return, so nothing locks a key forever.
- ``admit`` is all or nothing: every dimension of every check is evaluated; if an enforced one fails,
  nothing is consumed (shadow counters included). Shadow checks never reject; when the request is
  admitted they consume like the others (their counters mirror admitted traffic) and the ones that
  failed are reported in ``shadow_rejections`` (empty on rejected decisions).
- Decisions: ``states`` describe every dimension after the decision (after consumption when admitted,
  unchanged when rejected); ``remaining`` is what is left (requests, tokens, whole bucket tokens or
  slots, never below 0); ``reset_seconds`` is the time until the window frees everything counted now
  (newest charged entry + window - now; for burst, until the bucket is full; 0 for concurrency and
  empty logs). ``rejected`` is the failing enforced state with the largest ``retry_after`` and
  ``retry_after`` is the exact time until every failing enforced dimension would pass, given no other
  traffic: the oldest entries ageing out, the bucket refilling to 1. A limit of 0 retries after its
  window. Concurrency retries after 1 s (``CONCURRENCY_RETRY_SECONDS``): slots free when other
  requests finish, not on a schedule. ``tightest`` is the enforced state with the least remaining
  (ties: the shorter window, concurrency counting as 0 s and burst as 60 s).
- ``settle`` releases the slots and settles the tokens; it is idempotent and ignores unknown leases.
  After its lease expired, a lease's token entries can still be settled while they are in the window.
- Day and month budgets (tokensPerDay/Month, costPerDay/Month) are one counter per subject and UTC
  calendar window (``windows.py``, from the ``wall_clock``): a request passes if the window's total
  plus its charge (tokens, or ``request.cost`` micro-units for cost budgets) stays within N; the
  counter starts at 0 in each new window. A charge larger than N never passes (remaining 0). When
  rejected, ``retry_after`` is the time until the window ends; ``reset_seconds`` likewise (0 when
  nothing is used). ``settle`` adds (actual - charged) to the counter of the window the lease was
  charged in, if that window is still current (a reservation settled after its window ended is left
  alone; a lease stays settleable until its windows end); cost settles to ``settled_cost``.
  ``charge`` raises an unsettled lease's budget charges the same way (tokens, or ``cost_so_far``
  when given; never lower). Per limit and dimension, each non-route subject's spend in the current
  window is kept for ``top_consumers`` (most first; equal spends in reverse subject order, as Redis
  ranks them).
- ``wait_for_capacity`` returns when a lease is settled or expires, or after ``timeout``.
- Memory stays bounded: logs are pruned on access and swept every minute, empty counters and full
  buckets are dropped, lease records go once their slots expired and their entries left the window
  (with budgets: once their windows ended); budget counters and spends go when their window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmroute_sidecar.quota.base import (
    BUDGET_DIMENSIONS,
    BUDGET_WINDOW_SECONDS,
    COST_DIMENSIONS,
    MONTH_DIMENSIONS,
    WINDOW_SECONDS,
    AdmissionRequest,
    Decision,
    Dimension,
    Lease,
    LimitCheck,
    LimitState,
    PerCheck,
    budget_charge,
    settled_cost,
)
from llmroute_sidecar.quota.windows import day_window, month_window

#: ``retry_after`` of a concurrency rejection: slots free when other requests finish.
CONCURRENCY_RETRY_SECONDS = 1.0
#: How often every counter is pruned, so idle subjects do not accumulate.
SWEEP_SECONDS = 60.0
#: Float slack of the token bucket, whose level accumulates rounding.
EPSILON = 1e-9
#: Window of each dimension for ranking ``tightest`` (and for retrying a limit of 0).
RANK_WINDOWS = {
    **WINDOW_SECONDS,
    Dimension.BURST: 60.0,
    Dimension.CONCURRENT_REQUESTS: 0.0,
    **BUDGET_WINDOW_SECONDS,
}
TOKEN_WINDOW = WINDOW_SECONDS[Dimension.TOKENS_PER_MINUTE]
#: Lease ids: 16 random bytes in hex each, read from the OS 256 at a time.
_ID_CHARS = 32
_ID_POOL_CHARS = _ID_CHARS * 256

Key = tuple[str, str, str, Dimension]
"""(route, limit name, subject, dimension)."""


@dataclass(slots=True)
class _Entry:
    at: float
    charge: int


@dataclass(slots=True)
class _Log:
    """A sliding log: entries oldest first and the sum of their charges."""

    entries: deque[_Entry] = field(default_factory=deque)
    total: int = 0

    def prune(self, horizon: float) -> None:
        while self.entries and self.entries[0].at <= horizon:
            self.total -= self.entries.popleft().charge

    def append(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.total += entry.charge

    def time_until(self, allowed: int, window: float, now: float) -> float:
        """Seconds until the total is at most ``allowed`` (>= 0) as the oldest entries age out."""
        used = self.total
        for entry in self.entries:
            used -= entry.charge
            if used <= allowed:
                return entry.at + window - now
        return window

    def newest_charged(self) -> float | None:
        return next((entry.at for entry in reversed(self.entries) if entry.charge > 0), None)


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float
    full_at: float


@dataclass(slots=True)
class _Budget:
    """One subject's counter in one calendar window."""

    window: int
    end: float
    """Unix seconds."""
    used: int = 0


TopKey = tuple[str, str, Dimension]
"""(route, limit name, budget dimension)."""


@dataclass(slots=True)
class _Top:
    """Spend per subject of one budget in one window."""

    window: int
    end: float
    spend: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Hold:
    """What a lease holds until settled: concurrency slots, token-log entries, budget charges."""

    expires_at: float
    drop_at: float
    slots: list[Key] = field(default_factory=list)
    recheck_at: float = 0.0
    """When the hold is looked at again after its slots expired (its last deadline queued so far)."""
    charges: list[tuple[Key, _Entry]] = field(default_factory=list)
    budgets: list[_BudgetCharge] = field(default_factory=list)
    """What each budget dimension holds for the lease, charged in the lease's windows."""
    counts: list[tuple[Key, _Entry]] = field(default_factory=list)
    """Request-count entries, kept only for cancellable admissions."""
    bursts: list[_Item] = field(default_factory=list)
    """Burst buckets taken from, kept only for cancellable admissions."""


@dataclass(slots=True)
class _BudgetCharge:
    item: _Item
    charge: int


#: ``_Item.kind``: how a dimension is counted (a sliding log, slots, a bucket, a calendar budget).
_LOG, _SLOTS, _BUCKET, _BUDGET = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class _Item:
    """One dimension of one check of a request (with what admission reads of it, resolved once)."""

    check: LimitCheck
    dimension: Dimension
    value: int
    key: Key
    kind: int
    window: float
    """``RANK_WINDOWS`` of the dimension (a log's window)."""
    rate: float
    """Refill rate of a burst bucket, per second."""
    limit: str
    scope: str
    shadow: bool

    def state(self, remaining: int, reset_seconds: float) -> LimitState:
        return LimitState(
            self.limit,
            self.scope,
            self.dimension,
            self.value,
            remaining if remaining > 0 else 0,
            reset_seconds if reset_seconds > 0.0 else 0.0,
        )


def _kind(dimension: Dimension) -> int:
    if dimension in BUDGET_DIMENSIONS:
        return _BUDGET
    if dimension is Dimension.CONCURRENT_REQUESTS:
        return _SLOTS
    return _BUCKET if dimension is Dimension.BURST else _LOG


Plan = tuple[tuple[_Item, ...], bool]
"""A request's items, and whether one is a budget (then the wall clock is read)."""
_NO_PLAN: Plan = ((), False)


def _check_plan(route: str, check: LimitCheck) -> Plan:
    """One check's items (worked out once per check: ``_check_plans``)."""
    rate = (check.requests_per_minute or 0) / 60.0
    items = tuple(
        _Item(
            check,
            dimension,
            value,
            (route, check.limit, check.subject, dimension),
            _kind(dimension),
            RANK_WINDOWS[dimension],
            rate,
            check.limit,
            check.scope,
            check.shadow,
        )
        for dimension, value in check.values().items()
    )
    return items, any(item.kind == _BUDGET for item in items)


_check_plans = PerCheck(_check_plan)


def _plan(request: AdmissionRequest) -> Plan:
    """Every check's items in order (one cached plan for the usual single check)."""
    plan = _NO_PLAN
    route = request.route
    for check in request.checks:
        part = _check_plans.get(route, check)
        plan = part if plan is _NO_PLAN else (plan[0] + part[0], plan[1] or part[1])
    return plan


def _window(dimension: Dimension, wall: float) -> tuple[int, float]:
    """(window id, end) of a budget dimension at unix time ``wall``."""
    return month_window(wall) if dimension in MONTH_DIMENSIONS else day_window(wall)


def _top_key(item: _Item) -> TopKey:
    return (item.key[0], item.check.limit, item.dimension)


def _cost(item: _Item, tokens: int) -> int:
    return tokens if item.dimension is Dimension.TOKENS_PER_MINUTE else 1


class MemoryQuotaStore:
    """Quota state in this process's memory; ``clock`` returns seconds (injectable for tests)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        """Unix seconds: what calendar windows (budgets) are read from."""
        self._budgets: dict[Key, _Budget] = {}
        self._tops: dict[TopKey, _Top] = {}
        self._logs: dict[Key, _Log] = {}
        self._buckets: dict[Key, _Bucket] = {}
        self._slots: dict[Key, set[str]] = {}
        self._holds: dict[str, _Hold] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._freed: asyncio.Event | None = None
        self._next_sweep = clock() + SWEEP_SECONDS
        self._ids = ""
        self._ids_at = _ID_POOL_CHARS

    # -- QuotaStore ------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Decision:
        """Check every dimension of every check; consume all of them or none.

        The request path's hot spot: sliding logs and slots (the usual dimensions) are evaluated
        inline, buckets and budgets through ``_verdict`` and ``_state``; the same semantics either way.
        """
        now = self._clock()
        self._maintain(now)
        tokens = request.tokens
        if tokens < 0:
            tokens = 0
        cost = request.cost
        items, budgets = _plan(request)
        wall = self._wall() if budgets else 0.0
        logs = self._logs
        slots = self._slots
        # Verdicts: the enforced failure with the largest retry (the first of equals), failing shadows.
        failing = -1
        failing_retry = 0.0
        shadow_failing: tuple[int, ...] = ()
        for index, item in enumerate(items):
            kind = item.kind
            retry: float | None
            if kind == _LOG:
                charge = _cost(item, tokens)
                log = self._log(item.key, now)
                if log is None:
                    if charge <= item.value:
                        continue
                    retry = item.window
                elif log.total + charge <= item.value:
                    continue
                elif charge > item.value:
                    retry = item.window
                else:
                    retry = log.time_until(item.value - charge, item.window, now)
            elif kind == _SLOTS:
                holders = slots.get(item.key)
                if (len(holders) if holders is not None else 0) < item.value:
                    continue
                retry = CONCURRENCY_RETRY_SECONDS
            else:
                retry = self._verdict(item, tokens, now, cost, wall)
                if retry is None:
                    continue
            if item.shadow:
                shadow_failing += (index,)
            elif failing < 0 or retry > failing_retry:
                failing, failing_retry = index, retry
        lease = None
        if failing < 0:
            day, month = (day_window(wall)[0], month_window(wall)[0]) if wall else (0, 0)
            offset = self._ids_at
            if offset >= _ID_POOL_CHARS:
                self._ids = os.urandom(_ID_POOL_CHARS // 2).hex()
                offset = 0
            self._ids_at = offset + _ID_CHARS
            lease = Lease(self._ids[offset : offset + _ID_CHARS], request, tokens, day, month)
            self._consume(items, lease, now, wall)
        # States (after consumption when admitted); tightest: the enforced one with the least remaining
        # (ties: the shorter window; the first of equals).
        states: tuple[LimitState, ...] = ()
        tightest: LimitState | None = None
        tightest_window = 0.0
        for item in items:
            kind = item.kind
            if kind == _LOG:
                log = logs.get(item.key)  # pruned above (and only appended to since)
                if log is None:
                    used = 0
                    reset = 0.0
                else:
                    used = log.total
                    newest = log.entries[-1]
                    at = newest.at if newest.charge > 0 else log.newest_charged()
                    reset = at + item.window - now if at is not None else 0.0
                value = item.value
                remaining = 0 if _cost(item, tokens) > value else value - used
                state = LimitState(
                    item.limit,
                    item.scope,
                    item.dimension,
                    value,
                    remaining if remaining > 0 else 0,
                    reset if reset > 0.0 else 0.0,
                )
            elif kind == _SLOTS:
                holders = slots.get(item.key)
                remaining = item.value - (len(holders) if holders is not None else 0)
                state = LimitState(
                    item.limit, item.scope, item.dimension, item.value, remaining if remaining > 0 else 0, 0.0
                )
            else:
                state = self._state(item, tokens, now, cost, wall)
            states += (state,)
            if not item.shadow and (
                tightest is None
                or state.remaining < tightest.remaining
                or (state.remaining == tightest.remaining and item.window < tightest_window)
            ):
                tightest, tightest_window = state, item.window
        if failing >= 0:
            return Decision(False, None, states[failing], failing_retry, tightest, states)
        shadow = tuple(states[index] for index in shadow_failing) if shadow_failing else ()
        return Decision(True, lease, None, 0.0, tightest, states, shadow)

    async def settle(self, lease: Lease, actual_tokens: int, actual_cost: int | None = None) -> None:
        """Release the lease's slots and charge ``actual_tokens``; a no-op for unknown or settled leases."""
        self.settle_now(lease, actual_tokens, actual_cost)

    def settle_now(self, lease: Lease, actual_tokens: int, actual_cost: int | None = None) -> None:
        """``settle`` without awaiting anything (the request path's finish calls it directly)."""
        now = self._clock()
        self._maintain(now)
        hold = self._holds.pop(lease.lease_id, None)
        if hold is None:
            return
        if hold.slots:
            self._release(lease.lease_id, hold)
        actual = actual_tokens if actual_tokens > 0 else 0
        for key, entry in hold.charges:
            log = self._logs.get(key)
            if log is None or entry.at <= now - TOKEN_WINDOW:
                continue
            log.total += actual - entry.charge
            entry.charge = actual
        if hold.budgets:
            cost = settled_cost(lease, actual, actual_cost)
            for held in hold.budgets:
                self._recharge(lease, held, budget_charge(held.item.dimension, actual, cost))
        if self._freed is not None:
            self._signal()

    async def cancel(self, lease: Lease) -> None:
        """Undo a cancellable admission as if it had been rejected (``AdmissionRequest.cancellable``):
        its request-count and token entries leave the logs, its slots, budget charges and a burst
        token return. A no-op for unknown or settled leases."""
        now = self._clock()
        hold = self._holds.pop(lease.lease_id, None)
        if hold is None:
            return
        self._release(lease.lease_id, hold)
        for key, entry in (*hold.charges, *hold.counts):
            log = self._logs.get(key)
            if log is not None and any(held is entry for held in log.entries):
                log.entries.remove(entry)
                log.total -= entry.charge
        for item in hold.bursts:  # give the request back to the bucket
            self._fill(item, min(float(item.value), self._level(item, now) + 1.0), now)
        for held in hold.budgets:
            self._recharge(lease, held, 0)
        self._signal()

    def _recharge(self, lease: Lease, held: _BudgetCharge, charge: int, raise_only: bool = False) -> None:
        """Replace a lease's charge of a budget (in the window it was made in; else leave it)."""
        item = held.item
        window = lease.window(item.dimension)
        budget = self._budgets.get(item.key)
        if budget is None or budget.window != window or (raise_only and charge <= held.charge):
            return
        delta, held.charge = charge - held.charge, charge
        budget.used += delta
        top = self._tops.get(_top_key(item))
        if item.check.scope != "route" and top is not None and top.window == window:
            top.spend[item.check.subject] = top.spend.get(item.check.subject, 0) + delta

    def budget_used(self, route: str, limit: str, subject: str, dimension: Dimension) -> int:
        """What a budget counts in its current window (0 when nothing is counted)."""
        budget = self._budgets.get((route, limit, subject, dimension))
        return 0 if budget is None or budget.end <= self._wall() else budget.used

    def top_consumers(
        self, route: str, limit: str, dimension: Dimension, count: int = 5
    ) -> list[tuple[str, int]]:
        """The ``count`` subjects that spent most of a budget in its current window, most first; equal
        spends in reverse subject order, as Redis ranks them (``ZREVRANGEBYSCORE``: what the operator
        reports)."""
        top = self._tops.get((route, limit, dimension))
        if top is None or top.end <= self._wall():
            return []
        return sorted(top.spend.items(), key=lambda pair: (pair[1], pair[0]), reverse=True)[:count]

    async def charge(self, lease: Lease, tokens_so_far: int, cost_so_far: int | None = None) -> None:
        """Raise the unsettled lease's token charges to ``tokens_so_far`` (and budgets' to it or to
        ``cost_so_far``); never lower them."""
        now = self._clock()
        self._maintain(now)
        hold = self._holds.get(lease.lease_id)
        if hold is None:
            return
        for key, entry in hold.charges:
            log = self._logs.get(key)
            if log is None or entry.at <= now - TOKEN_WINDOW or tokens_so_far <= entry.charge:
                continue
            log.total += tokens_so_far - entry.charge
            entry.charge = tokens_so_far
        for held in hold.budgets:
            cost = held.item.dimension in COST_DIMENSIONS
            if cost and cost_so_far is None:
                continue
            want = max(0, cost_so_far or 0) if cost else max(0, tokens_so_far)
            self._recharge(lease, held, want, raise_only=True)

    async def wait_for_capacity(self, timeout: float) -> None:
        """Return when a lease is settled or expires, or after ``timeout`` seconds."""
        event = self._event()
        now = self._clock()
        self._maintain(now)  # may expire leases, which sets the event
        delay = timeout
        if self._deadlines:
            delay = min(delay, self._deadlines[0][0] - now)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, delay)):
                await event.wait()

    async def close(self) -> None:
        """Wake every waiter; there is nothing else to release."""
        self._signal()

    # -- evaluation ------------------------------------------------------------------------------

    def _verdict(
        self, item: _Item, tokens: int, now: float, cost: int = 0, wall: float = 0.0
    ) -> float | None:
        """None when ``item`` (a budget or a burst bucket; ``admit`` reads logs and slots itself)
        admits the request, else the seconds until it would."""
        if item.kind == _BUDGET:
            window, end = _window(item.dimension, wall)
            used = self._used(item.key, window)
            charge = budget_charge(item.dimension, tokens, cost)
            return None if used + charge <= item.value else end - wall
        return self._bucket_verdict(item, now)

    def _bucket_verdict(self, item: _Item, now: float) -> float | None:
        level = self._level(item, now)
        if level >= 1.0 - EPSILON:
            return None
        return (1.0 - level) / item.rate if item.rate > 0 else item.window

    def _used(self, key: Key, window: int) -> int:
        budget = self._budgets.get(key)
        return budget.used if budget is not None and budget.window == window else 0

    def _state(self, item: _Item, tokens: int, now: float, cost: int = 0, wall: float = 0.0) -> LimitState:
        """The state of ``item`` (a budget or a burst bucket, as for ``_verdict``)."""
        if item.kind == _BUDGET:
            window, end = _window(item.dimension, wall)
            used = self._used(item.key, window)
            oversize = budget_charge(item.dimension, tokens, cost) > item.value
            return item.state(0 if oversize else item.value - used, end - wall if used > 0 else 0.0)
        level = self._level(item, now)
        reset = (item.value - level) / item.rate if item.rate > 0 else 0.0
        return item.state(math.floor(level + EPSILON), reset)

    def _log(self, key: Key, now: float) -> _Log | None:
        """The key's log with expired entries pruned; None (and dropped) when empty."""
        log = self._logs.get(key)
        if log is None:
            return None
        entries = log.entries
        horizon = now - WINDOW_SECONDS[key[3]]
        if entries and entries[0].at > horizon:  # the usual case: nothing to prune
            return log
        log.prune(horizon)
        if not log.entries:
            del self._logs[key]
            return None
        return log

    def _level(self, item: _Item, now: float) -> float:
        bucket = self._buckets.get(item.key)
        if bucket is None:
            return float(item.value)
        return min(float(item.value), bucket.level + max(0.0, now - bucket.at) * item.rate)

    # -- consumption -----------------------------------------------------------------------------

    def _consume(self, items: tuple[_Item, ...], lease: Lease, now: float, wall: float = 0.0) -> None:
        request = lease.request
        expires_at = now + request.lease_seconds
        hold = _Hold(expires_at, expires_at)
        tokens = lease.reserved_tokens
        for item in items:
            kind = item.kind
            if kind == _LOG:
                tpm = item.dimension is Dimension.TOKENS_PER_MINUTE
                entry = _Entry(now, tokens if tpm else 1)
                log = self._logs.get(item.key)
                if log is None:
                    log = self._logs[item.key] = _Log()
                log.entries.append(entry)
                log.total += entry.charge
                if tpm:
                    hold.charges.append((item.key, entry))
                elif request.cancellable:
                    hold.counts.append((item.key, entry))
            elif kind == _SLOTS:
                holders = self._slots.get(item.key)
                if holders is None:
                    holders = self._slots[item.key] = set()
                holders.add(lease.lease_id)
                hold.slots.append(item.key)
            elif kind == _BUCKET:
                self._take(item, now)
                if request.cancellable:
                    hold.bursts.append(item)
            else:
                charge = budget_charge(item.dimension, tokens, request.cost)
                self._charge_budget(item, charge, wall)
                hold.budgets.append(_BudgetCharge(item, charge))
        if hold.charges or hold.budgets:
            token_end = now + TOKEN_WINDOW
            hold.drop_at = token_end if token_end > expires_at else expires_at
        hold.recheck_at = hold.drop_at
        if hold.budgets:  # settleable until its windows end, as in Redis (only leaked leases stay)
            end = max(_window(held.item.dimension, wall)[1] for held in hold.budgets)
            hold.drop_at = max(hold.drop_at, now + (end - wall))
        if hold.slots or hold.charges or hold.budgets or hold.counts or hold.bursts:
            self._holds[lease.lease_id] = hold
            heapq.heappush(self._deadlines, (expires_at, lease.lease_id))
            # The far end of a budget hold is queued only if it is still held then (``_expire``):
            # settled leases must not leave a deadline per request for a month.
            if hold.recheck_at > expires_at:
                heapq.heappush(self._deadlines, (hold.recheck_at, lease.lease_id))

    def _charge_budget(self, item: _Item, charge: int, wall: float) -> None:
        window, end = _window(item.dimension, wall)
        budget = self._budgets.get(item.key)
        if budget is None or budget.window != window:
            budget = self._budgets[item.key] = _Budget(window, end)
        budget.used += charge
        if item.check.scope == "route":
            return
        top = self._tops.get(_top_key(item))
        if top is None or top.window != window:
            top = self._tops[_top_key(item)] = _Top(window, end)
        top.spend[item.check.subject] = top.spend.get(item.check.subject, 0) + charge

    def _take(self, item: _Item, now: float) -> None:
        self._fill(item, max(0.0, self._level(item, now) - 1.0), now)

    def _fill(self, item: _Item, level: float, now: float) -> None:
        """Set a burst bucket to ``level`` now (it refills from there)."""
        full_at = now + (item.value - level) / item.rate if item.rate > 0 else math.inf
        self._buckets[item.key] = _Bucket(level, now, full_at)

    def _release(self, lease_id: str, hold: _Hold) -> None:
        for key in hold.slots:
            holders = self._slots.get(key)
            if holders is None:
                continue
            holders.discard(lease_id)
            if not holders:
                del self._slots[key]
        hold.slots.clear()

    # -- housekeeping ----------------------------------------------------------------------------

    def _maintain(self, now: float) -> None:
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now:  # else nothing is due (``_expire`` would do nothing)
            self._expire(now)
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + SWEEP_SECONDS

    def _expire(self, now: float) -> None:
        """Return the slots of expired leases; forget leases with nothing left to settle."""
        freed = False
        while self._deadlines and self._deadlines[0][0] <= now:
            due, lease_id = heapq.heappop(self._deadlines)
            hold = self._holds.get(lease_id)
            if hold is None:
                continue
            if hold.slots and hold.expires_at <= now:
                self._release(lease_id, hold)
                freed = True
            if hold.drop_at <= now:
                del self._holds[lease_id]
            elif due >= hold.recheck_at:  # a budget hold still unsettled: forget it at its window's end
                heapq.heappush(self._deadlines, (hold.drop_at, lease_id))
        if freed:
            self._signal()

    def _sweep(self, now: float) -> None:
        for key in list(self._logs):
            self._log(key, now)
        for key in [key for key, bucket in self._buckets.items() if bucket.full_at <= now]:
            del self._buckets[key]
        wall = self._wall()
        for key in [key for key, budget in self._budgets.items() if budget.end <= wall]:
            del self._budgets[key]
        for top_key in [key for key, top in self._tops.items() if top.end <= wall]:
            del self._tops[top_key]

    def _event(self) -> asyncio.Event:
        if self._freed is None:
            self._freed = asyncio.Event()
        return self._freed

    def _signal(self) -> None:
        """Wake the current waiters; later waiters wait on a fresh event."""
        if self._freed is not None:
            self._freed.set()
            self._freed = None
