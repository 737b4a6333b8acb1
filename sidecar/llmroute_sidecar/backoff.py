"""Retry pacing: exponential backoff with full jitter, bounded by the request's deadline."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None) -> Iterator[float]:
    """Endless delays before retry n = 0, 1, ...: uniform(0, min(cap, base * 2**n)) ("full jitter")."""
    if base < 0 or cap < 0:
        raise ValueError(f"base and cap must be >= 0, got base={base} cap={cap}")
    pick = rng if rng is not None else random.Random()
    ceiling = min(cap, base)
    while True:
        yield min(ceiling, pick.uniform(0.0, ceiling))
        ceiling = min(cap, ceiling * 2)  # doubling a capped value never overflows


def bounded_delay(delay: float, remaining_budget: float, reserve: float = 0.05) -> float | None:
    """``delay`` if sleeping it leaves ``reserve`` seconds of the deadline, else None (stop retrying)."""
    delay = max(0.0, delay)
    if remaining_budget - delay < reserve:
        return None
    return delay
