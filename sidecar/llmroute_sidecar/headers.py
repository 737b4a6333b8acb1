"""Header handling of the proxy: hop-by-hop filtering and rate-limit headers."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from llmroute_sidecar.quota.base import (
    BUDGET_DIMENSIONS,
    BUDGET_WINDOW_SECONDS,
    COST_DIMENSIONS,
    WINDOW_SECONDS,
    Decision,
    Dimension,
    LimitState,
    budget_charge,
)

#: RFC 9110 hop-by-hop headers, never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)


#: Lower-cased names a ``drop`` list excludes besides the hop-by-hop ones (few distinct lists).
_excluded_by_drop: dict[tuple[str, ...], frozenset[str]] = {}


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones (including those named in Connection) and ``drop``."""
    key = tuple(drop)
    excluded = _excluded_by_drop.get(key)
    if excluded is None:
        if len(_excluded_by_drop) >= 64:
            _excluded_by_drop.clear()
        excluded = _excluded_by_drop[key] = HOP_BY_HOP | {name.lower() for name in key}
    if "Connection" in headers:
        values = headers.getall("Connection")
        excluded = excluded | {token.strip().lower() for value in values for token in value.split(",")}
    return CIMultiDict([(name, value) for name, value in headers.items() if name.lower() not in excluded])


#: Dimensions counting requests (OpenAI's ``*-requests`` headers); tokensPerMinute counts tokens.
REQUEST_DIMENSIONS = frozenset({Dimension.REQUESTS_PER_MINUTE, Dimension.REQUESTS_PER_HOUR, Dimension.BURST})
TOKEN_DIMENSIONS = frozenset({Dimension.TOKENS_PER_MINUTE})
#: Dimensions whose RateLimit-Policy quota unit is tokens.
TOKEN_UNITS = frozenset({Dimension.TOKENS_PER_MINUTE, Dimension.TOKENS_PER_DAY, Dimension.TOKENS_PER_MONTH})


def never_fits(state: LimitState, tokens: int, cost: int = 0) -> bool:
    """The request alone exceeds the limit value (tokens > tokensPerMinute, its reservation above a
    whole day or month budget, or any limit of 0). A budget merely almost spent is not that: it frees
    when its window ends (429)."""
    if state.dimension in BUDGET_DIMENSIONS:
        return budget_charge(state.dimension, tokens, cost) > state.limit_value
    charge = tokens if state.dimension is Dimension.TOKENS_PER_MINUTE else 1
    return charge > state.limit_value


def _window(state: LimitState) -> int:
    if state.dimension is Dimension.BURST:
        return 60
    if state.dimension in BUDGET_DIMENSIONS:
        return int(BUDGET_WINDOW_SECONDS[state.dimension])
    return int(WINDOW_SECONDS[state.dimension])


def _milliseconds(seconds: float) -> int:
    """Whole milliseconds, rounded up (never promise a reset earlier than it is)."""
    return max(0, math.ceil(seconds * 1000 - 1e-6))


def _whole_seconds(milliseconds: int) -> int:
    return -(-milliseconds // 1000)


def duration(milliseconds: int) -> str:
    """OpenAI's (Go's) duration format of ``x-ratelimit-reset-*``: ``0s``, ``20ms``, ``1.5s``, ``6m0s``."""
    if milliseconds == 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


class RateLimitView:
    """What the client headers say about one decision: the visible states and when each resets.

    Shadow-mode limits are invisible, as are states the request can never fit (it is refused with a
    400, not told to wait). The rejecting state resets when the request could pass: its reset is the
    decision's ``retry_after``, so ``Retry-After``, ``X-RateLimit-Reset``, ``RateLimit t=`` and
    ``x-ratelimit-reset-*`` agree. Other rate states reset when their window frees what they count;
    a concurrency slot has no schedule (no reset) unless it is what rejected.

    Built once per response on the request path: each state's reset and nearness are computed once.
    """

    __slots__ = ("_nearness", "rejected", "resets", "states")

    def __init__(
        self, decision: Decision, shadow: Collection[str] = (), tokens: int | None = None, cost: int = 0
    ) -> None:
        self.states = tuple(
            s
            for s in decision.states
            if s.limit not in shadow and not (tokens is not None and never_fits(s, tokens, cost))
        )
        rejected = decision.rejected
        self.rejected = rejected if rejected is not None and rejected in self.states else None
        resets: list[int | None] = []
        nearness: list[tuple[bool, float, int, int]] = []
        for state in self.states:
            if self.rejected is not None and state == self.rejected:
                reset: int | None = max(1, _milliseconds(decision.retry_after))
            elif state.dimension is Dimension.CONCURRENT_REQUESTS:
                reset = None
            else:
                reset = _milliseconds(state.reset_seconds)
            resets.append(reset)
            share = state.remaining / state.limit_value if state.limit_value > 0 else 0.0
            last = state.dimension is Dimension.CONCURRENT_REQUESTS
            nearness.append((last, share, state.remaining, -(reset or 0)))
        self.resets = resets
        self._nearness = nearness

    def reset_ms(self, state: LimitState) -> int | None:
        """Milliseconds until ``state`` (one of ``states``) resets; None for a concurrency slot that did
        not reject."""
        return self.resets[self.states.index(state)]  # index() tries identity first

    def binding(self, among: Collection[Dimension] | None = None) -> LimitState | None:
        """The rejecting state, else the rate limit with the smallest share left (concurrency last)."""
        rejected = self.rejected
        if rejected is not None and (among is None or rejected.dimension in among):
            return rejected
        best: LimitState | None = None
        best_key: tuple[bool, float, int, int] | None = None
        for state, key in zip(self.states, self._nearness, strict=True):
            if among is not None and state.dimension not in among:
                continue
            if best_key is None or key < best_key:
                best, best_key = state, key
        return best


#: ``RateLimit-Policy`` values by the visible states' (limit, dimension, value): they change only when
#: the limits do. Bounded: cleared when it grows past ``_POLICY_CACHE_SIZE`` entries.
_policy_cache: dict[tuple[tuple[str, Dimension, int], ...], str] = {}
_POLICY_CACHE_SIZE = 1024


def _policy_header(states: tuple[LimitState, ...]) -> str:
    key = tuple((s.limit, s.dimension, s.limit_value) for s in states)
    value = _policy_cache.get(key)
    if value is None:
        if len(_policy_cache) >= _POLICY_CACHE_SIZE:
            _policy_cache.clear()
        value = _policy_cache[key] = ", ".join(_policy(s) for s in states)
    return value


def rate_limit_headers(
    decision: Decision, shadow: Collection[str] = (), tokens: int | None = None, cost: int = 0
) -> dict[str, str]:
    """Every rate-limit header of a response, all describing the same states in agreement.

    - ``X-RateLimit-Limit/Remaining/Reset/Scope``: the binding limit (the rejecting one on a 429, else
      the nearest rate limit; a concurrency limit only when it rejected or is the only one).
    - OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``: the binding request limit
      (requestsPerMinute, requestsPerHour, burst) and the binding token limit (tokensPerMinute).
    - IETF ``RateLimit-Policy`` (every visible limit) and ``RateLimit`` (binding first, then the rest).
    ``shadow`` names limits in shadow mode (never shown); ``tokens`` is the request's reservation,
    ``cost`` its reserved cost (micro-units).
    """
    if not decision.states:
        return {}
    view = RateLimitView(decision, shadow, tokens, cost)
    binding = view.binding()
    if binding is None:
        return {}
    headers = {
        "X-RateLimit-Limit": str(binding.limit_value),
        "X-RateLimit-Remaining": str(max(0, binding.remaining)),
    }
    reset = view.reset_ms(binding)
    if reset is not None:
        headers["X-RateLimit-Reset"] = str(_whole_seconds(reset))
    headers["X-RateLimit-Scope"] = f"{binding.limit}/{binding.dimension.value}"
    for suffix, among in (("requests", REQUEST_DIMENSIONS), ("tokens", TOKEN_DIMENSIONS)):
        state = view.binding(among)
        if state is None:
            continue
        headers[f"x-ratelimit-limit-{suffix}"] = str(state.limit_value)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, state.remaining))
        headers[f"x-ratelimit-reset-{suffix}"] = duration(view.reset_ms(state) or 0)
    headers["RateLimit-Policy"] = _policy_header(view.states)
    items = [_item(binding, reset)]
    items.extend(_item(s, r) for s, r in zip(view.states, view.resets, strict=True) if s is not binding)
    headers["RateLimit"] = ", ".join(items)
    return headers


def _name(state: LimitState) -> str:
    return f'"{state.limit}-{state.dimension.value}"'


def _policy(state: LimitState) -> str:
    if state.dimension is Dimension.CONCURRENT_REQUESTS:
        return f'{_name(state)};q={state.limit_value};qu="concurrent-requests"'
    unit = ';qu="tokens"' if state.dimension in TOKEN_UNITS else ""
    if state.dimension in COST_DIMENSIONS:
        unit = ';qu="micro-units"'
    return f"{_name(state)};q={state.limit_value};w={_window(state)}{unit}"


def _item(state: LimitState, reset_ms: int | None) -> str:
    reset = "" if reset_ms is None else f";t={_whole_seconds(reset_ms)}"
    return f"{_name(state)};r={max(0, state.remaining)}{reset}"


def retry_headers(decision: Decision) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up, at least 1) and OpenAI's ``retry-after-ms``."""
    milliseconds = max(1, _milliseconds(decision.retry_after))
    return {"Retry-After": str(_whole_seconds(milliseconds)), "retry-after-ms": str(milliseconds)}


def retry_after(decision: Decision) -> str:
    """``Retry-After`` in whole seconds, rounded up so a client that waits is admitted."""
    return retry_headers(decision)["Retry-After"]


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value else None
