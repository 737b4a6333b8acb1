"""Header handling of the proxy: hop-by-hop filtering and rate-limit headers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

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


def _window(state: LimitState) -> int:
    if state.dimension is Dimension.CONCURRENT_REQUESTS:
        return 0
    if state.dimension is Dimension.BURST:
        return 60
    return int(WINDOW_SECONDS[state.dimension])


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """``X-RateLimit-*`` for the binding limit plus the IETF ``RateLimit-Policy``/``RateLimit`` fields."""
    state = decision.rejected or decision.tightest
    if state is None:
        return {}
    reset = math.ceil(state.reset_seconds)
    headers = {
        "X-RateLimit-Limit": str(state.limit_value),
        "X-RateLimit-Remaining": str(max(0, state.remaining)),
        "X-RateLimit-Reset": str(reset),
        "X-RateLimit-Scope": f"{state.limit}/{state.dimension.value}",
    }
    policies = [s for s in decision.states if s.dimension is not Dimension.CONCURRENT_REQUESTS]
    if policies:
        headers["RateLimit-Policy"] = ", ".join(
            f'"{s.limit}-{s.dimension.value}";q={s.limit_value};w={_window(s)}' for s in policies
        )
        if state.dimension is not Dimension.CONCURRENT_REQUESTS:
            name = f"{state.limit}-{state.dimension.value}"
            headers["RateLimit"] = f'"{name}";r={max(0, state.remaining)};t={reset}'
    return headers


def retry_after(decision: Decision) -> str:
    """``Retry-After`` in whole seconds, rounded up so a client that waits is admitted."""
    return str(max(1, math.ceil(decision.retry_after)))


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value else None
