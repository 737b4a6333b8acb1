"""Full-jitter exponential backoff and the deadline bound on retry sleeps."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmroute_sidecar.backoff import backoff_delays, bounded_delay


def _take(n: int, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None) -> list[float]:
    return list(itertools.islice(backoff_delays(base, cap, rng), n))


def test_seeded_rng_is_deterministic() -> None:
    assert _take(10, rng=random.Random(7)) == _take(10, rng=random.Random(7))
    assert _take(10, rng=random.Random(7)) != _take(10, rng=random.Random(8))


def test_delays_follow_full_jitter_formula() -> None:
    reference = random.Random(3)
    expected = [reference.uniform(0.0, min(5.0, 0.1 * 2**n)) for n in range(12)]
    assert _take(12, base=0.1, cap=5.0, rng=random.Random(3)) == pytest.approx(expected)


def test_caps_grow_then_saturate() -> None:
    class Top(random.Random):
        """Always picks the upper bound, exposing each ceiling."""

        def uniform(self, a: float, b: float) -> float:
            return b

    assert _take(8, base=0.1, cap=5.0, rng=Top()) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_delays_stay_within_growing_bounds() -> None:
    delays = _take(200, base=0.05, cap=2.0, rng=random.Random(1))
    for n, delay in enumerate(delays):
        assert 0.0 <= delay <= min(2.0, 0.05 * 2**n)


def test_long_sequences_do_not_overflow() -> None:
    delays = _take(5000, base=1.0, cap=3.0, rng=random.Random(0))
    assert max(delays) <= 3.0


def test_rejects_negative_parameters() -> None:
    with pytest.raises(ValueError):
        next(backoff_delays(base=-1.0))


@given(
    base=st.floats(0.0, 10.0),
    cap=st.floats(0.0, 60.0),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 80),
)
def test_all_delays_in_zero_to_cap(base: float, cap: float, seed: int, n: int) -> None:
    for delay in _take(n, base=base, cap=cap, rng=random.Random(seed)):
        assert 0.0 <= delay <= cap


@pytest.mark.parametrize(
    ("delay", "remaining", "reserve", "expected"),
    [
        (0.5, 10.0, 0.05, 0.5),  # plenty of budget
        (0.5, 0.55, 0.05, 0.5),  # exactly the reserve left afterwards
        (0.5, 0.54, 0.05, None),  # would dip into the reserve
        (2.0, 1.0, 0.05, None),  # sleeping past the deadline
        (0.0, 0.01, 0.05, None),  # already inside the reserve
        (0.0, 1.0, 0.0, 0.0),
        (-1.0, 1.0, 0.05, 0.0),  # negative delays clamp to zero
        (0.1, -1.0, 0.05, None),  # deadline already passed
    ],
)
def test_bounded_delay(delay: float, remaining: float, reserve: float, expected: float | None) -> None:
    result = bounded_delay(delay, remaining, reserve)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_bounded_delay_default_reserve() -> None:
    assert bounded_delay(1.0, 1.06) == 1.0
    assert bounded_delay(1.0, 1.04) is None
