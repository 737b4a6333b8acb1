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
    # A copy (order and spelling kept) less every excluded name: ``in`` and ``del`` match any case, so
    # no per-header lower() (a header repeated is dropped whole, like the filter over its entries did).
    kept = CIMultiDict(headers)
    for name in excluded:
        if name in kept:
            del kept[name]
    return kept


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
    # Trailing zeros of the fraction dropped (no divmod, no rstrip: this runs twice per response).
    whole, fraction = milliseconds // 1000, milliseconds % 1000
    if fraction == 0:
        seconds = f"{whole % 60}"
    elif fraction % 100 == 0:
        seconds = f"{whole % 60}.{fraction // 100}"
    elif fraction % 10 == 0:
        seconds = f"{whole % 60}.{fraction // 10:02d}"
    else:
        seconds = f"{whole % 60}.{fraction:03d}"
    if whole >= 3600:
        return f"{whole // 3600}h{whole // 60 % 60}m{seconds}s"
    if whole >= 60:
        return f"{whole // 60}m{seconds}s"
    return f"{seconds}s"


#: ``RateLimit-Policy`` values by the visible states' (limit, dimension, value) triples, flattened: they
#: change only when the limits do. Bounded: cleared when it grows past ``_POLICY_CACHE_SIZE`` entries.
_policy_cache: dict[tuple[str | Dimension | int, ...], str] = {}
_POLICY_CACHE_SIZE = 1024
#: Per (limit, dimension): the quoted ``"limit-dimension"`` item name and the ``limit/dimension`` scope
#: (they depend only on the limit). Bounded like ``_policy_cache``.
_labels: dict[tuple[str, Dimension], tuple[str, str]] = {}
_LABELS_SIZE = 4096


def _labels_of(limit: str, dimension: Dimension) -> tuple[str, str]:
    labels = _labels.get((limit, dimension))
    if labels is None:
        if len(_labels) >= _LABELS_SIZE:
            _labels.clear()
        labels = _labels[(limit, dimension)] = (f'"{limit}-{dimension.value}"', f"{limit}/{dimension.value}")
    return labels


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

    Shadow-mode limits are invisible, as are states the request can never fit (``never_fits``: it is
    refused with a 400, not told to wait). The rejecting state resets when the request could pass: its
    reset is the decision's ``retry_after``, so ``Retry-After``, ``X-RateLimit-Reset``, ``RateLimit t=``
    and ``x-ratelimit-reset-*`` agree. Other rate states reset when their window frees what they count;
    a concurrency slot has no schedule (no reset) unless it is what rejected. The nearest state has the
    smallest share left (concurrency last; then the least remaining, then the latest reset; the first
    of equals).

    On the request path of every response: one pass over the states finds the visible ones, their
    resets, the three binding states and the RateLimit items.
    """
    states = decision.states
    if not states:
        return {}
    rejected = decision.rejected
    rejected_reset = 0
    rejected_labels: tuple[str, str] | None = None
    visible: tuple[LimitState, ...] = ()
    items: tuple[str, ...] = ()
    policy_key: tuple[str | Dimension | int, ...] = ()
    best: LimitState | None = None
    best_requests: LimitState | None = None
    best_tokens: LimitState | None = None
    best_key: tuple[bool, float, int, int] | None = None
    requests_key: tuple[bool, float, int, int] | None = None
    tokens_key: tuple[bool, float, int, int] | None = None
    best_reset: int | None = None
    requests_reset: int | None = None
    tokens_reset: int | None = None
    best_labels = ("", "")
    for state in states:
        limit = state.limit
        if limit in shadow:
            continue
        dimension = state.dimension
        value = state.limit_value
        if tokens is not None and never_fits(state, tokens, cost):
            continue
        labels = _labels_of(limit, dimension)
        remaining = state.remaining
        reset: int | None
        if rejected is not None and (state is rejected or state == rejected):
            if rejected_labels is None:
                rejected_reset = max(1, _milliseconds(decision.retry_after))
                rejected_labels = labels
            reset = rejected_reset
        elif dimension is Dimension.CONCURRENT_REQUESTS:
            reset = None
        else:
            reset = _milliseconds(state.reset_seconds)
        key = (
            dimension is Dimension.CONCURRENT_REQUESTS,
            remaining / value if value > 0 else 0.0,
            remaining,
            -(reset or 0),
        )
        if best_key is None or key < best_key:
            best, best_key, best_reset, best_labels = state, key, reset, labels
        if dimension in REQUEST_DIMENSIONS and (requests_key is None or key < requests_key):
            best_requests, requests_key, requests_reset = state, key, reset
        elif dimension is Dimension.TOKENS_PER_MINUTE and (tokens_key is None or key < tokens_key):
            best_tokens, tokens_key, tokens_reset = state, key, reset
        visible += (state,)
        policy_key += (limit, dimension, value)
        shown = remaining if remaining > 0 else 0
        items += (
            f"{labels[0]};r={shown}" if reset is None else f"{labels[0]};r={shown};t={_whole_seconds(reset)}",
        )
    binding: LimitState | None
    if rejected_labels is not None:  # the rejecting state is visible: it binds
        assert rejected is not None
        binding, reset, labels = rejected, rejected_reset, rejected_labels
        if rejected.dimension in REQUEST_DIMENSIONS:
            best_requests, requests_reset = rejected, rejected_reset
        elif rejected.dimension is Dimension.TOKENS_PER_MINUTE:
            best_tokens, tokens_reset = rejected, rejected_reset
    else:
        binding, reset, labels = best, best_reset, best_labels
    if binding is None:
        return {}
    remaining = binding.remaining
    headers = {
        "X-RateLimit-Limit": str(binding.limit_value),
        "X-RateLimit-Remaining": str(remaining if remaining > 0 else 0),
    }
    if reset is not None:
        headers["X-RateLimit-Reset"] = str(_whole_seconds(reset))
    headers["X-RateLimit-Scope"] = labels[1]
    if best_requests is not None:
        remaining = best_requests.remaining
        headers["x-ratelimit-limit-requests"] = str(best_requests.limit_value)
        headers["x-ratelimit-remaining-requests"] = str(remaining if remaining > 0 else 0)
        headers["x-ratelimit-reset-requests"] = duration(requests_reset or 0)
    if best_tokens is not None:
        remaining = best_tokens.remaining
        headers["x-ratelimit-limit-tokens"] = str(best_tokens.limit_value)
        headers["x-ratelimit-remaining-tokens"] = str(remaining if remaining > 0 else 0)
        headers["x-ratelimit-reset-tokens"] = duration(tokens_reset or 0)
    policy = _policy_cache.get(policy_key)
    if policy is None:
        if len(_policy_cache) >= _POLICY_CACHE_SIZE:
            _policy_cache.clear()
        policy = _policy_cache[policy_key] = ", ".join([_policy(s) for s in visible])
    headers["RateLimit-Policy"] = policy
    remaining = binding.remaining
    current = f"{labels[0]};r={remaining if remaining > 0 else 0}"
    if reset is not None:
        current += f";t={_whole_seconds(reset)}"
    for state, item in zip(visible, items, strict=True):
        if state is not binding:
            current += ", " + item
    headers["RateLimit"] = current
    return headers


def _name(state: LimitState) -> str:
    return _labels_of(state.limit, state.dimension)[0]


def _policy(state: LimitState) -> str:
    if state.dimension is Dimension.CONCURRENT_REQUESTS:
        return f'{_name(state)};q={state.limit_value};qu="concurrent-requests"'
    unit = ';qu="tokens"' if state.dimension in TOKEN_UNITS else ""
    if state.dimension in COST_DIMENSIONS:
        unit = ';qu="micro-units"'
    return f"{_name(state)};q={state.limit_value};w={_window(state)}{unit}"


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
