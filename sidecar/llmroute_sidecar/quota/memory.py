"""The in-memory quota store: exact within one process; the embedded default and the reference model.

Semantics (the Redis store implements the same ones):
- requestsPerMinute / requestsPerHour are sliding logs: at most N admissions in any 60 s / 3600 s
  window — no fixed-window boundary that admits 2N;
- tokensPerMinute is a sliding log of charges: admitted only if the charges of the last 60 s plus
  this request's reservation stay within N. A reservation larger than N can never pass (retry after
  60 s, reported as such). Settlement rewrites the entry's charge in place (refund or debt);
- burst (with requestsPerMinute) is a token bucket of that capacity refilled at rpm/60 per second;
- concurrentRequests counts unexpired, unsettled leases;
- all or nothing: a rejected request consumes nothing; shadow limits report but never reject, and
  consume like the others when the request is admitted;
- counters are keyed by (route, limit, subject, dimension); changed limit values apply to the
  existing log at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmroute_sidecar.quota.base import (
    WINDOW_SECONDS,
    AdmissionRequest,
    Decision,
    Dimension,
    Lease,
    LimitCheck,
    LimitState,
)

CONCURRENCY_RETRY_SECONDS = 1.0
Key = tuple[str, str, str, Dimension]


@dataclass
class _Entry:
    at: float
    lease_id: str
    charge: int = 1


@dataclass
class _Log:
    entries: deque[_Entry] = field(default_factory=deque)
    total: int = 0

    def prune(self, horizon: float) -> None:
        while self.entries and self.entries[0].at <= horizon:
            self.total -= self.entries.popleft().charge


@dataclass
class _Bucket:
    level: float
    at: float


@dataclass
class _Outcome:
    state: LimitState
    passed: bool
    retry: float


class MemoryQuotaStore:
    """Quota state in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logs: dict[Key, _Log] = {}
        self._buckets: dict[Key, _Bucket] = {}
        self._leases: dict[Key, dict[str, float]] = {}
        self._entries: dict[str, list[tuple[Key, _Entry]]] = {}
        self._settled: set[str] = set()
        self._freed: asyncio.Condition | None = None

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate(
        self, check: LimitCheck, key: Key, dimension: Dimension, limit: int, tokens: int, now: float
    ) -> _Outcome:
        check_limit, scope = check.limit, check.scope
        if dimension is Dimension.CONCURRENT_REQUESTS:
            holders = self._live_leases(key, now)
            passed = len(holders) + 1 <= limit
            remaining = limit - len(holders) - (1 if passed else 0)
            state = LimitState(check_limit, scope, dimension, limit, max(0, remaining), 0.0)
            return _Outcome(state, passed, 0.0 if passed else CONCURRENCY_RETRY_SECONDS)
        if dimension is Dimension.BURST:
            return self._evaluate_bucket(check, key, limit, now)
        window = WINDOW_SECONDS[dimension]
        log = self._logs.setdefault(key, _Log())
        log.prune(now - window)
        cost = tokens if dimension is Dimension.TOKENS_PER_MINUTE else 1
        passed = log.total + cost <= limit
        retry = 0.0
        if not passed:
            retry = window if cost > limit else self._time_until_fits(log, limit, cost, window, now)
        remaining = limit - log.total - (cost if passed else 0)
        newest = log.entries[-1].at if log.entries else None
        reset = window if passed and cost > 0 else newest + window - now if newest is not None else 0.0
        state = LimitState(check_limit, scope, dimension, limit, max(0, remaining), reset)
        return _Outcome(state, passed, retry)

    @staticmethod
    def _time_until_fits(log: _Log, limit: int, cost: int, window: float, now: float) -> float:
        used = log.total
        for entry in log.entries:
            used -= entry.charge
            if used + cost <= limit:
                return entry.at + window - now
        return window

    def _evaluate_bucket(self, check: LimitCheck, key: Key, capacity: int, now: float) -> _Outcome:
        rate = (check.requests_per_minute or 0) / 60.0
        bucket = self._buckets.get(key) or _Bucket(float(capacity), now)
        level = min(float(capacity), bucket.level + max(0.0, now - bucket.at) * rate)
        passed = level >= 1.0
        retry = 0.0 if passed else ((1.0 - level) / rate if rate > 0 else 60.0)
        remaining = int(level - 1) if passed else 0
        reset = (capacity - level + (1 if passed else 0)) / rate if rate > 0 else 0.0
        state = LimitState(check.limit, check.scope, Dimension.BURST, capacity, max(0, remaining), reset)
        return _Outcome(state, passed, retry)

    def _live_leases(self, key: Key, now: float) -> dict[str, float]:
        holders = self._leases.get(key, {})
        expired = [lease for lease, expiry in holders.items() if expiry <= now]
        for lease in expired:
            del holders[lease]
        return holders

    # -- QuotaStore ------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Decision:
        now = self._clock()
        outcomes: list[tuple[LimitCheck, Key, Dimension, _Outcome]] = []
        for check in request.checks:
            for dimension, value in check.values().items():
                key: Key = (request.route, check.limit, check.scope + "|" + check.subject, dimension)
                outcome = self._evaluate(check, key, dimension, value, request.tokens, now)
                outcomes.append((check, key, dimension, outcome))
        states = tuple(o.state for _, _, _, o in outcomes)
        failing = [o for c, _, _, o in outcomes if not o.passed and not c.shadow]
        shadow = tuple(o.state for c, _, _, o in outcomes if not o.passed and c.shadow)
        if failing:
            binding = max(failing, key=lambda o: o.retry)
            return Decision(False, None, binding.state, binding.retry, binding.state, states, ())
        lease_id = uuid.uuid4().hex
        for check, key, dimension, outcome in outcomes:
            self._consume(check, key, dimension, request, lease_id, now, outcome)
        enforce = [o.state for c, _, _, o in outcomes if not c.shadow]
        tightest = min(enforce, key=lambda s: (s.remaining, s.reset_seconds), default=None)
        lease = Lease(lease_id, request, request.tokens)
        return Decision(True, lease, None, 0.0, tightest, states, shadow)

    def _consume(
        self,
        check: LimitCheck,
        key: Key,
        dimension: Dimension,
        request: AdmissionRequest,
        lease_id: str,
        now: float,
        outcome: _Outcome,
    ) -> None:
        if dimension is Dimension.CONCURRENT_REQUESTS:
            self._leases.setdefault(key, {})[lease_id] = now + request.lease_seconds
        elif dimension is Dimension.BURST:
            rate = (check.requests_per_minute or 0) / 60.0
            bucket = self._buckets.get(key) or _Bucket(float(outcome.state.limit_value), now)
            level = min(float(outcome.state.limit_value), bucket.level + max(0.0, now - bucket.at) * rate)
            self._buckets[key] = _Bucket(level - 1.0, now)
        else:
            charge = request.tokens if dimension is Dimension.TOKENS_PER_MINUTE else 1
            if charge <= 0:
                return
            entry = _Entry(now, lease_id, charge)
            log = self._logs.setdefault(key, _Log())
            log.entries.append(entry)
            log.total += charge
            if dimension is Dimension.TOKENS_PER_MINUTE:
                self._entries.setdefault(lease_id, []).append((key, entry))

    async def settle(self, lease: Lease, actual_tokens: int) -> None:
        if lease.lease_id in self._settled:
            return
        self._settled.add(lease.lease_id)
        now = self._clock()
        for key, entry in self._entries.pop(lease.lease_id, []):
            log = self._logs.get(key)
            if log is None or entry.at <= now - WINDOW_SECONDS[Dimension.TOKENS_PER_MINUTE]:
                continue
            log.total += max(0, actual_tokens) - entry.charge
            entry.charge = max(0, actual_tokens)
        for holders in self._leases.values():
            holders.pop(lease.lease_id, None)
        if len(self._settled) > 100_000:
            self._settled.clear()
        await self._notify()

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._freed is None:
            self._freed = asyncio.Condition()
        return self._freed

    async def wait_for_capacity(self, timeout: float) -> None:
        condition = self._condition()
        async with condition:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(condition.wait(), timeout)

    async def close(self) -> None:
        return None
