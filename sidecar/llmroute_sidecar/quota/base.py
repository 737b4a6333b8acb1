"""The quota interface: what the proxy asks a quota store, and what it gets back.

One ``admit`` call checks every limit that applies to a request and consumes all of them only if all
pass (all or nothing: a rejected request consumes nothing). An admitted request holds a ``Lease``: its
concurrency slots and its reserved tokens. ``settle`` ends the lease: it releases the slots and
replaces the reserved token estimate with the actual usage; ``charge`` raises the charge of a lease
still streaming to its live usage, so other admissions see it. A store may also ``cancel`` a lease not
settled yet (both real ones do): the admission is undone as if it had been rejected, for a request
that never reached an upstream. Stores: ``memory`` (exact within one
process; the embedded default) and ``redis`` (exact across the fleet).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Generic, Protocol, TypeVar


class Dimension(StrEnum):
    """What a limit counts."""

    REQUESTS_PER_MINUTE = "requestsPerMinute"
    REQUESTS_PER_HOUR = "requestsPerHour"
    TOKENS_PER_MINUTE = "tokensPerMinute"
    CONCURRENT_REQUESTS = "concurrentRequests"
    BURST = "burst"
    TOKENS_PER_DAY = "tokensPerDay"
    TOKENS_PER_MONTH = "tokensPerMonth"
    COST_PER_DAY = "costPerDay"
    COST_PER_MONTH = "costPerMonth"


#: Budgets: one counter per UTC calendar day or month (``windows.py``), reserved and settled.
BUDGET_DIMENSIONS = frozenset(
    {Dimension.TOKENS_PER_DAY, Dimension.TOKENS_PER_MONTH, Dimension.COST_PER_DAY, Dimension.COST_PER_MONTH}
)
#: Budgets counted in money (integer micro-units of the pricing currency).
COST_DIMENSIONS = frozenset({Dimension.COST_PER_DAY, Dimension.COST_PER_MONTH})
#: Budgets whose window is a calendar month (the others: a day).
MONTH_DIMENSIONS = frozenset({Dimension.TOKENS_PER_MONTH, Dimension.COST_PER_MONTH})


#: Window length of each rate dimension, in seconds.
WINDOW_SECONDS = {
    Dimension.REQUESTS_PER_MINUTE: 60.0,
    Dimension.REQUESTS_PER_HOUR: 3600.0,
    Dimension.TOKENS_PER_MINUTE: 60.0,
}
#: Nominal window length of the budgets (headers' ``w=``; their windows are calendar days and months).
BUDGET_WINDOW_SECONDS = {
    Dimension.TOKENS_PER_DAY: 86_400.0,
    Dimension.COST_PER_DAY: 86_400.0,
    Dimension.TOKENS_PER_MONTH: 2_592_000.0,
    Dimension.COST_PER_MONTH: 2_592_000.0,
}


@dataclass(frozen=True)
class LimitCheck:
    """One limit as it applies to one request: values resolved (tier applied), subject identified.

    ``subject`` is the counted identity: "" for route-scoped limits, a sha256 hex prefix of the API key
    for apiKey limits, a sha256 hex prefix of the header value for header limits. Raw keys never
    reach a store.
    """

    limit: str
    scope: str
    subject: str = ""
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    burst: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_day: int | None = None
    """Micro-units of the pricing currency, like ``cost_per_month``."""
    cost_per_month: int | None = None
    shadow: bool = False

    def values(self) -> dict[Dimension, int]:
        """The dimensions this check sets, with their limit values (one dict per check: do not modify)."""
        return self._values

    @cached_property
    def _values(self) -> dict[Dimension, int]:
        pairs = {
            Dimension.REQUESTS_PER_MINUTE: self.requests_per_minute,
            Dimension.REQUESTS_PER_HOUR: self.requests_per_hour,
            Dimension.TOKENS_PER_MINUTE: self.tokens_per_minute,
            Dimension.CONCURRENT_REQUESTS: self.concurrent_requests,
            Dimension.BURST: self.burst,
            Dimension.TOKENS_PER_DAY: self.tokens_per_day,
            Dimension.TOKENS_PER_MONTH: self.tokens_per_month,
            Dimension.COST_PER_DAY: self.cost_per_day,
            Dimension.COST_PER_MONTH: self.cost_per_month,
        }
        return {dimension: value for dimension, value in pairs.items() if value is not None}


_T = TypeVar("_T")


class PerCheck(Generic[_T]):
    """What a store works out once per (route, ``LimitCheck``) instead of per request.

    Keyed by the check object's identity: policies hand out one LimitCheck per limit and counted
    identity (``build_checks``), so this usually hits; the entry keeps the check, so a reused id never
    matches. Cleared whole past ``size`` entries.
    """

    __slots__ = ("_entries", "_make", "_size")

    def __init__(self, make: Callable[[str, LimitCheck], _T], size: int = 4096) -> None:
        self._make = make
        self._size = size
        self._entries: dict[int, tuple[str, LimitCheck, _T]] = {}

    def get(self, route: str, check: LimitCheck) -> _T:
        cached = self._entries.get(id(check))
        if cached is not None and cached[1] is check and cached[0] == route:
            return cached[2]
        value = self._make(route, check)
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(check)] = (route, check, value)
        return value


@dataclass(frozen=True)
class AdmissionRequest:
    """Everything a store needs to admit one request."""

    route: str
    checks: tuple[LimitCheck, ...]
    tokens: int
    """Reserved token estimate (prompt estimate + max output tokens); 0 for non-LLM paths."""
    lease_seconds: float
    """Lease expiry: concurrency slots of a lease nobody settles return after this long."""
    request_id: str = ""
    cost: int = 0
    """Reserved cost in micro-units of the pricing currency (costPerDay/Month budgets); 0 unpriced."""
    cancellable: bool = False
    """The admission may be undone (``cancel``) before the request reaches an upstream: a store that
    must remember more per lease to do so (memory) only does it for such requests."""


def micros(money: float) -> int:
    """Money in integer micro-units (the quota stores count cost budgets in them)."""
    return round(money * 1_000_000)


def budget_charge(dimension: Dimension, tokens: int, cost: int) -> int:
    """What one request charges a budget dimension: its cost for cost budgets, else its tokens."""
    return cost if dimension in COST_DIMENSIONS else tokens


@dataclass(frozen=True)
class LimitState:
    """One limit dimension's state after a decision, for headers and error bodies."""

    limit: str
    scope: str
    dimension: Dimension
    limit_value: int
    remaining: int
    reset_seconds: float
    """Seconds until the window fully frees what is used now (0 when nothing is used); for day and
    month budgets the time until the window ends."""


@dataclass(frozen=True)
class Lease:
    """An admitted request's hold on the quota, ended by ``settle``."""

    lease_id: str
    request: AdmissionRequest
    reserved_tokens: int
    day: int = 0
    """The UTC day (days since the epoch) of the admission: budgets settle in its window."""
    month: int = 0
    """The UTC month (year x 12 + month - 1) of the admission."""

    def window(self, dimension: Dimension) -> int:
        """The window id a budget dimension of this lease was charged in."""
        return self.month if dimension in MONTH_DIMENSIONS else self.day


@dataclass(frozen=True)
class Decision:
    """The answer to ``admit``."""

    admitted: bool
    lease: Lease | None = None
    rejected: LimitState | None = None
    """The enforced limit that rejected the request (None when admitted)."""
    retry_after: float = 0.0
    """Seconds after which the same request could be admitted (exact to the algorithm)."""
    tightest: LimitState | None = None
    """The limit state with the least remaining, for X-RateLimit-* headers."""
    states: tuple[LimitState, ...] = ()
    shadow_rejections: tuple[LimitState, ...] = field(default=())
    """Shadow-mode limits that would have rejected the request."""
    degraded: bool = False
    """True when decided by a local fallback because the shared store was unreachable."""

    @property
    def waits_for_concurrency(self) -> bool:
        """Rejected only for lack of a concurrency slot: the caller may queue and try again."""
        return self.rejected is not None and self.rejected.dimension is Dimension.CONCURRENT_REQUESTS


class StoreUnavailableError(Exception):
    """The quota store cannot be reached; the failure policy decides what happens."""


class StoreState(StrEnum):
    """How a shared store is doing: only ``down`` makes a pod not ready."""

    UP = "up"
    BUSY = "busy"
    """Redis answers, but operations waited past their budget in this sidecar (back-pressure)."""
    DOWN = "down"
    """Connection refused or reset, or no answer within the operation timeout."""


class QuotaStore(Protocol):
    """A place where fleet-wide (or process-wide) quota state lives."""

    async def admit(self, request: AdmissionRequest) -> Decision:
        """Check every limit of ``request``; consume all of them or none."""
        ...

    async def settle(self, lease: Lease, actual_tokens: int, actual_cost: int | None = None) -> None:
        """Release the lease's slots and charge ``actual_tokens`` in place of the reservation.

        ``actual_cost`` (micro-units) replaces the reserved cost of cost budgets; None: 0 when
        ``actual_tokens`` is 0, else the reservation stays charged.
        """
        ...

    async def charge(self, lease: Lease, tokens_so_far: int, cost_so_far: int | None = None) -> None:
        """Raise the lease's tokensPerMinute charges to ``max(current charge, tokens_so_far)``.

        Day and month budgets too, in the window the lease was charged in: token budgets to
        ``tokens_so_far``, cost budgets to ``cost_so_far`` (micro-units; None leaves them alone).

        Live usage of an unsettled lease (a stream outgrowing its reservation), so concurrent
        admissions see it; never lowers a charge. Call it only before ``settle`` (the sidecar waits
        for its last charge first): the memory store ignores settled leases, Redis cannot tell.
        """
        ...

    async def wait_for_capacity(self, timeout: float) -> None:
        """Return when a concurrency slot may have been freed, or after ``timeout`` seconds."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


def settled_cost(lease: Lease, actual_tokens: int, actual_cost: int | None) -> int:
    """The cost a settlement charges: ``actual_cost``, else 0 for no usage, else the reservation."""
    if actual_cost is not None:
        return max(0, actual_cost)
    return 0 if actual_tokens <= 0 else lease.request.cost
