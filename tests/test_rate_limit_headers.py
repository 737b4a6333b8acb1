"""Rate-limit headers agree with each other for any decision: X-RateLimit-*, OpenAI's x-ratelimit-*,
IETF RateLimit/RateLimit-Policy, Retry-After and retry-after-ms describe the same states."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmroute_sidecar.headers import (
    REQUEST_DIMENSIONS,
    duration,
    never_fits,
    rate_limit_headers,
    retry_headers,
)
from llmroute_sidecar.quota.base import Decision, Dimension, LimitState

GO_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$|^(\d+)ms$")


def parse_duration(text: str) -> float:
    match = GO_DURATION.match(text)
    assert match is not None and text, text
    hours, minutes, seconds, millis = match.groups()
    if millis is not None:
        return int(millis) / 1000
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        *[(0, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (8640, "8.64s")],
        *[(60_000, "1m0s"), (360_000, "6m0s"), (90_500, "1m30.5s"), (3_600_000, "1h0m0s")],
    ],
)
def test_openai_duration_format(ms: int, text: str) -> None:
    assert duration(ms) == text and parse_duration(text) == ms / 1000


def parse_items(value: str) -> list[tuple[str, dict[str, str]]]:
    """A structured-field list of items with parameters (the shape RateLimit and RateLimit-Policy use)."""
    items = []
    for raw in value.split(", "):
        name, *params = raw.split(";")
        assert name.startswith('"') and name.endswith('"'), raw
        items.append((name.strip('"'), dict(p.split("=", 1) for p in params)))
    return items


DIMENSIONS = st.sampled_from(list(Dimension))


@st.composite
def decisions(draw: st.DrawFn) -> tuple[Decision, frozenset[str], int]:
    """Decisions as the stores make them: states for several limits, maybe one rejecting."""
    tokens = draw(st.integers(0, 3000))
    states: list[LimitState] = []
    for index in range(draw(st.integers(0, 4))):
        for dimension in draw(st.sets(DIMENSIONS, min_size=1, max_size=3)):
            value = draw(st.integers(0, 2000))
            remaining = draw(st.integers(0, value))
            if never_fits(LimitState("x", "route", dimension, value, 0, 0.0), tokens):
                remaining = 0
            reset = 0.0 if dimension is Dimension.CONCURRENT_REQUESTS else draw(st.floats(0, 3600))
            states.append(LimitState(f"l{index}", "route", dimension, value, remaining, reset))
    shadow = frozenset(draw(st.sets(st.sampled_from(["l0", "l1", "l2", "l3"]), max_size=2)))
    enforced = [s for s in states if s.limit not in shadow]
    if enforced and draw(st.booleans()):
        rejected = draw(st.sampled_from(enforced))
        retry = draw(st.floats(0.001, 3600))
        return Decision(False, None, rejected, retry, rejected, tuple(states)), shadow, tokens
    return Decision(True, None, None, 0.0, None, tuple(states)), shadow, tokens


def client_headers(decision: Decision, shadow: frozenset[str], tokens: int) -> tuple[dict[str, str], bool]:
    """The headers the admission sends, and whether the answer is a (retryable) 429."""
    headers = rate_limit_headers(decision, shadow, tokens)
    visible = [s for s in decision.states if s.limit not in shadow]
    oversize = any(never_fits(s, tokens) for s in visible)
    retryable = not decision.admitted and not oversize
    if retryable:
        headers.update(retry_headers(decision))
    return headers, retryable


@settings(max_examples=400)
@given(decisions())
def test_all_rate_limit_headers_agree(case: tuple[Decision, frozenset[str], int]) -> None:
    decision, shadow, tokens = case
    headers, retryable = client_headers(decision, shadow, tokens)
    visible = {
        f"{s.limit}-{s.dimension.value}": s
        for s in decision.states
        if s.limit not in shadow and not never_fits(s, tokens)
    }
    if not visible:
        assert not any(name.lower().startswith(("x-ratelimit", "ratelimit")) for name in headers)
        return
    policy = dict(parse_items(headers["RateLimit-Policy"]))
    items = parse_items(headers["RateLimit"])
    current = dict(items)
    # every visible limit is described once in each IETF field, nothing else (shadow limits never)
    assert set(policy) == set(current) == set(visible) and len(items) == len(visible)
    for name, state in visible.items():
        assert int(policy[name]["q"]) == state.limit_value
        remaining = int(current[name]["r"])
        assert 0 <= remaining <= state.limit_value and remaining == state.remaining
        concurrency = state.dimension is Dimension.CONCURRENT_REQUESTS
        assert ("w" in policy[name]) is not concurrency
        if concurrency:
            assert policy[name]["qu"] == '"concurrent-requests"'
        elif "t" not in current[name]:
            raise AssertionError(f"rate limit {name} without reset")

    # X-RateLimit-* describe the first RateLimit item
    first, params = items[0]
    scope_limit, _, scope_dimension = headers["X-RateLimit-Scope"].partition("/")
    assert first == f"{scope_limit}-{scope_dimension}"
    assert headers["X-RateLimit-Limit"] == policy[first]["q"]
    assert headers["X-RateLimit-Remaining"] == params["r"]
    assert headers.get("X-RateLimit-Reset") == params.get("t")
    binding = visible[first]
    rejected = decision.rejected
    if rejected is not None and f"{rejected.limit}-{rejected.dimension.value}" in visible:
        assert binding == rejected
    elif any(s.dimension is not Dimension.CONCURRENT_REQUESTS for s in visible.values()):
        # on success (or a refusal by a hidden limit) the nearest *rate* limit, not concurrency
        assert binding.dimension is not Dimension.CONCURRENT_REQUESTS
        assert "X-RateLimit-Reset" in headers

    # OpenAI's per-kind headers describe one visible state of that kind, the binding one if it is
    for suffix, kinds in (("requests", REQUEST_DIMENSIONS), ("tokens", {Dimension.TOKENS_PER_MINUTE})):
        of_kind = {n: s for n, s in visible.items() if s.dimension in kinds}
        if not of_kind:
            assert f"x-ratelimit-limit-{suffix}" not in headers
            continue
        limit = int(headers[f"x-ratelimit-limit-{suffix}"])
        remaining = int(headers[f"x-ratelimit-remaining-{suffix}"])
        reset = parse_duration(headers[f"x-ratelimit-reset-{suffix}"])
        matches = [
            n
            for n, s in of_kind.items()
            if (s.limit_value, s.remaining) == (limit, remaining) and str(math.ceil(reset)) == current[n]["t"]
        ]
        assert matches, (suffix, headers)
        if binding.dimension in kinds:
            assert first in matches

    # a 429 says when to come back, the same moment in every header
    if retryable:
        assert rejected is not None
        seconds = int(headers["Retry-After"])
        millis = int(headers["retry-after-ms"])
        assert seconds >= 1 and math.ceil(millis / 1000) == seconds
        assert millis >= decision.retry_after * 1000 - 1e-3
        assert headers["X-RateLimit-Reset"] == params["t"] == str(seconds)
        assert headers["X-RateLimit-Remaining"] == str(rejected.remaining)
        for suffix, kinds in (("requests", REQUEST_DIMENSIONS), ("tokens", {Dimension.TOKENS_PER_MINUTE})):
            if rejected.dimension in kinds:
                assert round(parse_duration(headers[f"x-ratelimit-reset-{suffix}"]) * 1000) == millis
    else:
        assert "Retry-After" not in headers and "retry-after-ms" not in headers


def test_burst_429_retry_after_agrees_with_reset() -> None:
    """Issue 14: a burst 429 said Retry-After: 1 beside X-RateLimit-Reset: 10."""
    burst = LimitState("b", "route", Dimension.BURST, 10, 0, 10.0)
    rpm = LimitState("b", "route", Dimension.REQUESTS_PER_MINUTE, 600, 590, 59.0)
    decision = Decision(False, None, burst, 0.1, burst, (rpm, burst))
    headers = {**rate_limit_headers(decision), **retry_headers(decision)}
    assert headers["Retry-After"] == headers["X-RateLimit-Reset"] == "1"
    assert headers["retry-after-ms"] == "100" and headers["x-ratelimit-reset-requests"] == "100ms"
    assert headers["RateLimit"].startswith('"b-burst";r=0;t=1')


def test_success_describes_the_nearest_rate_limit_not_concurrency() -> None:
    """Issue 14: headers on success described the concurrency limit (Reset: 0)."""
    states = (
        LimitState("c", "route", Dimension.CONCURRENT_REQUESTS, 2, 0, 0.0),
        LimitState("r", "route", Dimension.REQUESTS_PER_MINUTE, 100, 40, 30.5),
        LimitState("r", "route", Dimension.TOKENS_PER_MINUTE, 10_000, 9_000, 12.0),
        LimitState("s", "route", Dimension.REQUESTS_PER_MINUTE, 5, 0, 50.0),  # shadow
    )
    headers = rate_limit_headers(Decision(True, None, None, 0.0, states[0], states), frozenset({"s"}))
    assert headers["X-RateLimit-Scope"] == "r/requestsPerMinute" and headers["X-RateLimit-Reset"] == "31"
    assert headers["x-ratelimit-remaining-requests"] == "40"
    assert headers["x-ratelimit-reset-requests"] == "30.5s"
    assert headers["x-ratelimit-limit-tokens"] == "10000" and headers["x-ratelimit-reset-tokens"] == "12s"
    assert '"c-concurrentRequests";r=0' in headers["RateLimit"]  # concurrency stays visible
    assert '"s-' not in headers["RateLimit"] + headers["RateLimit-Policy"]


def test_never_fitting_request_shows_no_wait() -> None:
    """Issue 9: a never-fitting request showed reset 0 and RateLimit t=0 beside Retry-After: 60."""
    tpm = LimitState("t", "route", Dimension.TOKENS_PER_MINUTE, 1000, 0, 0.0)
    rpm = LimitState("t", "route", Dimension.REQUESTS_PER_MINUTE, 10, 9, 20.0)
    decision = Decision(False, None, tpm, 60.0, tpm, (tpm, rpm))
    headers, retryable = client_headers(decision, frozenset(), tokens=5000)
    assert not retryable and "Retry-After" not in headers
    assert headers["X-RateLimit-Scope"] == "t/requestsPerMinute" and "x-ratelimit-limit-tokens" not in headers
    assert "tokensPerMinute" not in headers["RateLimit"]
