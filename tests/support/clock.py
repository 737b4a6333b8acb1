"""A clock tests move by hand: time-dependent code is tested without sleeping."""

from __future__ import annotations


class FakeClock:
    """Callable like ``time.monotonic``; ``advance`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
