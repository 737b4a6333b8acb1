"""Header handling of the proxy: hop-by-hop filtering and rate-limit headers."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from llmroute_sidecar.quota.base import WINDOW_SECONDS, Decision, Dimension, LimitState

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


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones (including those named in Connection) and ``drop``."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")
    }
    excluded = HOP_BY_HOP | named | {name.lower() for name in drop}
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in excluded)


#: Dimensions counting requests (OpenAI's ``*-requests`` headers); tokensPerMinute counts tokens.
REQUEST_DIMENSIONS = frozenset({Dimension.REQUESTS_PER_MINUTE, Dimension.REQUESTS_PER_HOUR, Dimension.BURST})


def never_fits(state: LimitState, tokens: int) -> bool:
    """The request alone exceeds the limit value (tokens > tokensPerMinute, or any limit of 0)."""
    cost = tokens if state.dimension is Dimension.TOKENS_PER_MINUTE else 1
    return cost > state.limit_value


def _window(state: LimitState) -> int:
    if state.dimension is Dimension.BURST:
        return 60
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
    """

    def __init__(self, decision: Decision, shadow: Collection[str] = (), tokens: int | None = None) -> None:
        self.decision = decision
        self.states = tuple(
            s
            for s in decision.states
            if s.limit not in shadow and not (tokens is not None and never_fits(s, tokens))
        )
        rejected = decision.rejected
        self.rejected = rejected if rejected in self.states else None

    def reset_ms(self, state: LimitState) -> int | None:
        """Milliseconds until ``state`` resets; None for a concurrency slot that did not reject."""
        if state == self.rejected:
            return max(1, _milliseconds(self.decision.retry_after))
        if state.dimension is Dimension.CONCURRENT_REQUESTS:
            return None
        return _milliseconds(state.reset_seconds)

    def binding(self, among: Collection[Dimension] | None = None) -> LimitState | None:
        """The rejecting state, else the rate limit with the smallest share left (concurrency last)."""
        candidates = [s for s in self.states if among is None or s.dimension in among]
        if self.rejected is not None and self.rejected in candidates:
            return self.rejected

        def nearness(s: LimitState) -> tuple[bool, float, int, int]:
            share = s.remaining / s.limit_value if s.limit_value > 0 else 0.0
            last = s.dimension is Dimension.CONCURRENT_REQUESTS
            return (last, share, s.remaining, -(self.reset_ms(s) or 0))

        return min(candidates, key=nearness, default=None)


def rate_limit_headers(
    decision: Decision, shadow: Collection[str] = (), tokens: int | None = None
) -> dict[str, str]:
    """Every rate-limit header of a response, all describing the same states in agreement.

    - ``X-RateLimit-Limit/Remaining/Reset/Scope``: the binding limit (the rejecting one on a 429, else
      the nearest rate limit; a concurrency limit only when it rejected or is the only one).
    - OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``: the binding request limit
      (requestsPerMinute, requestsPerHour, burst) and the binding token limit (tokensPerMinute).
    - IETF ``RateLimit-Policy`` (every visible limit) and ``RateLimit`` (binding first, then the rest).
    ``shadow`` names limits in shadow mode (never shown); ``tokens`` is the request's reservation.
    """
    view = RateLimitView(decision, shadow, tokens)
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
    for suffix, among in (("requests", REQUEST_DIMENSIONS), ("tokens", {Dimension.TOKENS_PER_MINUTE})):
        state = view.binding(among)
        if state is None:
            continue
        headers[f"x-ratelimit-limit-{suffix}"] = str(state.limit_value)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, state.remaining))
        headers[f"x-ratelimit-reset-{suffix}"] = duration(view.reset_ms(state) or 0)
    headers["RateLimit-Policy"] = ", ".join(_policy(s) for s in view.states)
    ordered = [binding, *(s for s in view.states if s != binding)]
    headers["RateLimit"] = ", ".join(_item(s, view.reset_ms(s)) for s in ordered)
    return headers


def _name(state: LimitState) -> str:
    return f'"{state.limit}-{state.dimension.value}"'


def _policy(state: LimitState) -> str:
    if state.dimension is Dimension.CONCURRENT_REQUESTS:
        return f'{_name(state)};q={state.limit_value};qu="concurrent-requests"'
    unit = ';qu="tokens"' if state.dimension is Dimension.TOKENS_PER_MINUTE else ""
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
