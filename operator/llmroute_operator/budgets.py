"""``status.budgets``: each day or month budget's use and top consumers, read from the sidecars' Redis.

Reading (``read_budgets``) sends only read commands: TIME, HMGET of a route-scoped budget's hash
(window ``w``, total ``u``) and, for budgets counted per client (apiKey, model, header, claim), the
top five of the window's spend set (ZSCORE of its ``_w`` marker, ZREVRANGEBYSCORE). Everything else
here is pure: what to read for a route, and the status entries made of what was read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmroute_operator.quota_usage import current_window, dimension_key
from llmroute_sidecar.api import LLMRoute
from llmroute_sidecar.quota.base import (
    BUDGET_DIMENSIONS,
    COST_DIMENSIONS,
    MONTH_DIMENSIONS,
    Dimension,
    micros,
)
from llmroute_sidecar.quota.redis import ORDER, connect, redis_password, top_key
from llmroute_sidecar.quota.windows import DAY_SECONDS, civil_from_days

TOP = 5
ID_HEX = 12
"""Top consumers are shown by this many hex digits of their hashed id (never a raw key)."""
FIELDS = {
    Dimension.TOKENS_PER_DAY: "tokens_per_day",
    Dimension.TOKENS_PER_MONTH: "tokens_per_month",
    Dimension.COST_PER_DAY: "cost_per_day",
    Dimension.COST_PER_MONTH: "cost_per_month",
}


@dataclass(frozen=True)
class BudgetQuery:
    """One budget dimension of one limit: what to read."""

    limit: str
    dimension: Dimension
    per_client: bool
    """Counted per client (a spend set is kept) rather than once for the route."""
    value: int | None
    """The limit's own value (micro-units for cost); None when only tiers set it."""


@dataclass(frozen=True)
class BudgetRead:
    """What Redis held for one budget at ``now_us``."""

    query: BudgetQuery
    now_us: int
    used: int | None = None
    """The route-scoped total (None for per-client budgets)."""
    top: tuple[tuple[str, int], ...] = ()
    """(subject, spend) of the top consumers, most first."""


def budget_queries(route: LLMRoute) -> list[BudgetQuery]:
    """Every budget dimension a limit of the route (or a tier of an apiKey limit) sets."""
    queries = []
    for limit in route.spec.limits:
        sources = [limit, *(route.spec.tiers.values() if limit.key == "apiKey" else ())]
        for dimension in (d for d in ORDER if d in BUDGET_DIMENSIONS):
            if all(getattr(source, FIELDS[dimension]) is None for source in sources):
                continue
            raw = getattr(limit, FIELDS[dimension])
            value = None if raw is None else micros(raw) if dimension in COST_DIMENSIONS else int(raw)
            queries.append(BudgetQuery(limit.name, dimension, limit.key != "route", value))
    return queries


def window_label(dimension: Dimension, now_us: int) -> str:
    """The UTC window a budget counts at ``now_us``: ``2026-12-03`` (day) or ``2026-12`` (month)."""
    year, month, day = civil_from_days(now_us // 1_000_000 // DAY_SECONDS)
    return f"{year:04d}-{month:02d}" if dimension in MONTH_DIMENSIONS else f"{year:04d}-{month:02d}-{day:02d}"


def _amount(dimension: Dimension, value: int) -> float | int:
    """Money back from micro-units; tokens as they are."""
    return round(value / 1_000_000, 6) if dimension in COST_DIMENSIONS else value


def budget_status(reads: Sequence[BudgetRead]) -> list[dict[str, Any]]:
    """``status.budgets`` entries (camelCase) from what was read."""
    entries = []
    for read in reads:
        query = read.query
        entry: dict[str, Any] = {
            "limit": query.limit,
            "dimension": query.dimension.value,
            "window": window_label(query.dimension, read.now_us),
        }
        if query.value is not None:
            entry["budget"] = _amount(query.dimension, query.value)
        if read.used is not None:
            entry["used"] = _amount(query.dimension, read.used)
        if query.per_client:
            entry["topConsumers"] = [
                {"id": subject[:ID_HEX], "spend": _amount(query.dimension, spend)}
                for subject, spend in read.top
            ]
        entries.append(entry)
    return entries


async def read_budgets(url: str, route: str, queries: Sequence[BudgetQuery]) -> list[BudgetRead]:
    """What each budget holds now (one pipelined round trip after TIME); raises on Redis errors."""
    client = connect(url, redis_password())
    try:
        seconds, micros_now = await client.time()
        now_us = int(seconds) * 1_000_000 + int(micros_now)
        pipe = client.pipeline(transaction=False)
        for query in queries:
            if query.per_client:
                key = top_key(route, query.limit, query.dimension)
                pipe.zscore(key, "_w")
                pipe.zrevrangebyscore(key, "+inf", 0, start=0, num=TOP, withscores=True)
            else:
                pipe.hmget(dimension_key(route, query.limit, "", query.dimension), ["w", "u"])
        answers = list(await pipe.execute()) if queries else []
    finally:
        close = getattr(client, "aclose", None) or client.close
        await close()
    reads = []
    position = 0
    for query in queries:
        window = current_window(query.dimension, now_us)
        if query.per_client:
            marker, members = answers[position], answers[position + 1]
            position += 2
            current = marker is not None and int(float(marker)) == -window
            top = tuple((_text(m), int(s)) for m, s in members) if current else ()
            reads.append(BudgetRead(query, now_us, None, top))
        else:
            stored, total = answers[position]
            position += 1
            current = stored is not None and int(stored) == window
            reads.append(BudgetRead(query, now_us, int(total) if current and total is not None else 0))
    return reads


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
