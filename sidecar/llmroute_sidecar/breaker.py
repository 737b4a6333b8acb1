"""A circuit breaker per upstream: closed → open after consecutive failures → one half-open probe.

Single-threaded (asyncio) by design: no locks. The open → half-open transition is lazy: it happens
(and ``on_change`` fires) the first time the breaker is looked at after ``open_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    Verdicts (``record_success``/``record_failure``) that arrive while the breaker is open come from
    requests admitted before it opened; they are ignored, so they neither close it nor extend its timer.
    In half-open, any verdict decides: success closes, failure re-opens with a fresh timer.
    """

    def __init__(
        self,
        failure_threshold: int,
        open_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = 1
        self.open_seconds = 0.0
        self.reconfigure(failure_threshold, open_seconds)
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    def reconfigure(self, failure_threshold: int, open_seconds: float) -> None:
        """Apply new settings; they take effect at the next failure or timer check."""
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if open_seconds < 0:
            raise ValueError(f"open_seconds must be >= 0, got {open_seconds}")
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose time is up is half-open."""
        self._refresh()
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def probe_out(self) -> bool:
        """Whether the half-open probe slot is taken."""
        return self._probe_out

    def allow(self) -> bool:
        """May a request go upstream now? Half-open admits exactly one probe at a time."""
        self._refresh()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN or self._probe_out:
            return False
        self._probe_out = True
        return True

    def record_success(self) -> None:
        """An attempt succeeded: resets the count; closes a half-open breaker."""
        self._refresh()
        if self._state is BreakerState.OPEN:
            return
        self._failures = 0
        self._probe_out = False
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """An attempt failed: opens at the threshold; re-opens a half-open breaker."""
        self._refresh()
        if self._state is BreakerState.OPEN:
            return
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._open()

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client cancelled): free the half-open slot."""
        self._probe_out = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_out = False
        self._set(BreakerState.OPEN)

    def _refresh(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_seconds:
            self._probe_out = False
            self._set(BreakerState.HALF_OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
