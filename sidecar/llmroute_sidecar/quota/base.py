"""The quota interface: what the proxy asks a quota store, and what it gets back.

One ``admit`` call checks every limit that applies to a request and consumes all of them only if all
pass (all or nothing: a rejected request consumes nothing). An admitted request holds a ``Lease``: its
concurrency slots and its reserved tokens. ``settle`` ends the lease: it releases the slots and
replaces the reserved token estimate with the actual usage; ``charge`` raises the charge of a lease
still streaming to its live usage, so other admissions see it. Stores: ``memory`` (exact within one
process; the embedded default) and ``redis`` (exact across the fleet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Dimension(StrEnum):
    """What a limit counts."""

    REQUESTS_PER_MINUTE = "requestsPerMinute"
    REQUESTS_PER_HOUR = "requestsPerHour"
    TOKENS_PER_MINUTE = "tokensPerMinute"
    CONCURRENT_REQUESTS = "concurrentRequests"
    BURST = "burst"


#: Window length of each rate dimension, in seconds.
WINDOW_SECONDS = {
    Dimension.REQUESTS_PER_MINUTE: 60.0,
    Dimension.REQUESTS_PER_HOUR: 3600.0,
    Dimension.TOKENS_PER_MINUTE: 60.0,
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
    shadow: bool = False

    def values(self) -> dict[Dimension, int]:
        """The dimensions this check sets, with their limit values."""
        pairs = {
            Dimension.REQUESTS_PER_MINUTE: self.requests_per_minute,
            Dimension.REQUESTS_PER_HOUR: self.requests_per_hour,
            Dimension.TOKENS_PER_MINUTE: self.tokens_per_minute,
            Dimension.CONCURRENT_REQUESTS: self.concurrent_requests,
            Dimension.BURST: self.burst,
        }
        return {dimension: value for dimension, value in pairs.items() if value is not None}


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


@dataclass(frozen=True)
class LimitState:
    """One limit dimension's state after a decision, for headers and error bodies."""

    limit: str
    scope: str
    dimension: Dimension
    limit_value: int
    remaining: int
    reset_seconds: float
    """Seconds until the window fully frees what is used now (0 when nothing is used)."""


@dataclass(frozen=True)
class Lease:
    """An admitted request's hold on the quota, ended by ``settle``."""

    lease_id: str
    request: AdmissionRequest
    reserved_tokens: int


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

    async def settle(self, lease: Lease, actual_tokens: int) -> None:
        """Release the lease's slots and charge ``actual_tokens`` in place of the reservation."""
        ...

    async def charge(self, lease: Lease, tokens_so_far: int) -> None:
        """Raise the lease's tokensPerMinute charges to ``max(current charge, tokens_so_far)``.

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
