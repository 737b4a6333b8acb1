"""Autoscaling hints: this pod's load over the last minute, for the operator to aggregate.

The operator sums ``inflightAvg`` over a route's pods and divides by
``autoscaling.targetInFlightPerPod`` to recommend replicas.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class HintTracker:
    """In-flight samples over a sliding minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, inflight: int) -> None:
        now = self._clock()
        self._samples.append((now, inflight))
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()

    def snapshot(self, live: int | None = None) -> dict[str, float | int]:
        """In flight now (``live`` when given, else the last sample), average and peak over the window."""
        values = [value for _, value in self._samples]
        last = values[-1] if values else 0
        return {
            "inflight": live if live is not None else last,
            "inflightAvg": round(sum(values) / len(values), 3) if values else 0.0,
            "inflightPeak": max(values) if values else 0,
            "samples": len(values),
            "windowSeconds": self._window,
        }
