"""Live quota usage of a route, read from the sidecars' Redis structures without writing anything.

The key layout is the sidecar's (``quota/redis.py``, docs/quotas.md):
``llmr:{<namespace>/<route>}:<limit>:<subject>:<rpm|rph|tpm|conc|burst|tpd|tpmo|cpd|cpmo>`` (and
``…:tpm:c``, the token charges; budgets are hashes of their window ``w`` and total ``u``). Only
read commands are sent (TIME, SCAN, ZCOUNT, ZRANGEBYSCORE, HMGET): nothing is
pruned, so the figures are what an admission made now would count. Subjects are stored as hashed
ids (``_`` for route-scoped limits); they are reported as stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmroute_sidecar.quota.base import BUDGET_DIMENSIONS, MONTH_DIMENSIONS, Dimension
from llmroute_sidecar.quota.redis import _SHORT as DIMENSION_SUFFIX
from llmroute_sidecar.quota.redis import ORDER, connect, key_prefix, redis_password
from llmroute_sidecar.quota.windows import day_window, month_window

MINUTE_US = 60_000_000
WINDOW_US = {
    Dimension.REQUESTS_PER_MINUTE: MINUTE_US,
    Dimension.REQUESTS_PER_HOUR: 3_600_000_000,
    Dimension.TOKENS_PER_MINUTE: MINUTE_US,
}
SUFFIX_DIMENSION = {suffix: dimension for dimension, suffix in DIMENSION_SUFFIX.items()}
CHARGES_PER_READ = 1000
"""Token charges read per HMGET (a busy minute holds one per request)."""
MAX_KEYS_SCANNED = 200_000
"""A bound on the keys one limit's scan visits (a huge per-key limit is summarised from these)."""


@dataclass(frozen=True)
class LimitQuery:
    """What to read for one limit: its name and the dimensions it (or a tier of it) configures."""

    name: str
    dimensions: tuple[Dimension, ...]
    burst_capacity: int = 0
    """The limit's burst: the capacity of its token bucket."""
    burst_refill_per_minute: int = 0
    """requestsPerMinute of the limit: the refill rate of its burst bucket."""


@dataclass(frozen=True)
class SubjectUsage:
    """What one subject of one limit uses now, per dimension (its ``value`` string, e.g.
    ``requestsPerMinute``)."""

    subject: str
    used: Mapping[str, int]


def dimension_key(route: str, limit: str, subject: str, dimension: Dimension) -> str:
    """The sorted set (or bucket hash) of one limit dimension of one subject, as the sidecar names it."""
    return f"{key_prefix(route)}:{limit}:{subject or '_'}:{DIMENSION_SUFFIX[dimension]}"


def charges_key(route: str, limit: str, subject: str) -> str:
    """The hash of token charges beside a tokensPerMinute log."""
    return dimension_key(route, limit, subject, Dimension.TOKENS_PER_MINUTE) + ":c"


def limit_pattern(route: str, limit: str) -> str:
    """SCAN pattern of every key of one limit (limit and route names are DNS labels: no glob characters)."""
    return f"{key_prefix(route)}:{limit}:*"


def parse_key(key: str, route: str, limit: str) -> tuple[str, Dimension] | None:
    """(subject, dimension) of one of the limit's keys; None for charge hashes and foreign keys."""
    head = f"{key_prefix(route)}:{limit}:"
    if not key.startswith(head):
        return None
    parts = key[len(head) :].split(":")
    if len(parts) != 2 or parts[1] not in SUFFIX_DIMENSION:
        return None
    return parts[0], SUFFIX_DIMENSION[parts[1]]


def burst_used(tokens: str | None, stamp: str | None, now_us: int, capacity: int, per_minute: int) -> int:
    """Requests a burst bucket is short of full now: the bucket refills at ``per_minute``/60 s, the
    same arithmetic as the admission script (a missing bucket is full)."""
    if tokens is None or stamp is None:
        return 0
    rate = per_minute / MINUTE_US
    level = min(float(capacity), float(tokens) + max(0, now_us - int(float(stamp))) * rate)
    return max(0, int(capacity - level))


def current_window(dimension: Dimension, now_us: int) -> int:
    """The id of a budget's UTC calendar window at ``now_us`` (``quota/windows.py``)."""
    now = now_us // 1_000_000
    return (month_window if dimension in MONTH_DIMENSIONS else day_window)(now)[0]


def budget_used(window: str | None, total: str | None, dimension: Dimension, now_us: int) -> int:
    """What a budget hash (fields ``w``, ``u``) counts now: its total while its window is current."""
    if window is None or total is None or int(window) != current_window(dimension, now_us):
        return 0
    return int(total)


def rank(usage: SubjectUsage, limits: Mapping[str, int]) -> tuple[float, int, str]:
    """Sort key, busiest first: the highest used/limit fraction over the dimensions, then the most
    used in absolute terms, then the subject (stable output)."""
    fractions = [used / limits[name] for name, used in usage.used.items() if limits.get(name)]
    return (-max(fractions, default=0.0), -sum(usage.used.values()), usage.subject)


def top_subjects(
    subjects: Iterable[SubjectUsage], limits: Mapping[str, int], count: int
) -> tuple[int, tuple[SubjectUsage, ...]]:
    """(active subjects, the ``count`` busiest); a subject is active when it uses anything now."""
    active = [subject for subject in subjects if any(subject.used.values())]
    return len(active), tuple(sorted(active, key=lambda s: rank(s, limits))[:count])


# -- reading (I/O) --------------------------------------------------------------------------------


async def _scan(client: Any, route: str, query: LimitQuery) -> dict[str, set[Dimension]]:
    found: dict[str, set[Dimension]] = {}
    seen = 0
    async for raw in client.scan_iter(match=limit_pattern(route, query.name), count=1000):
        seen += 1
        parsed = parse_key(raw.decode() if isinstance(raw, bytes) else str(raw), route, query.name)
        if parsed is not None and parsed[1] in query.dimensions:
            found.setdefault(parsed[0], set()).add(parsed[1])
        if seen >= MAX_KEYS_SCANNED:
            break
    return found


async def _read_limit(client: Any, route: str, query: LimitQuery, now_us: int) -> list[SubjectUsage]:
    subjects = await _scan(client, route, query)
    reads: list[tuple[str, Dimension]] = []
    pipe = client.pipeline(transaction=False)
    for subject, dimensions in sorted(subjects.items()):
        for dimension in (d for d in ORDER if d in dimensions):
            key = dimension_key(route, query.name, subject, dimension)
            if dimension is Dimension.TOKENS_PER_MINUTE:
                pipe.zrangebyscore(key, now_us - MINUTE_US, "+inf")
            elif dimension is Dimension.CONCURRENT_REQUESTS:
                pipe.zcount(key, now_us, "+inf")
            elif dimension is Dimension.BURST or dimension in BUDGET_DIMENSIONS:
                pipe.hmget(key, ["tokens", "ts"] if dimension is Dimension.BURST else ["w", "u"])
            else:
                pipe.zcount(key, now_us - WINDOW_US[dimension], "+inf")
            reads.append((subject, dimension))
    answers = list(await pipe.execute()) if reads else []
    used = {subject: {d.value: 0 for d in ORDER if d in query.dimensions} for subject in subjects}
    charges = client.pipeline(transaction=False)
    token_reads: list[str] = []
    for (subject, dimension), answer in zip(reads, answers, strict=True):
        if dimension is Dimension.TOKENS_PER_MINUTE:
            ids = list(answer)
            for start in range(0, len(ids), CHARGES_PER_READ):
                charges.hmget(charges_key(route, query.name, subject), ids[start : start + CHARGES_PER_READ])
                token_reads.append(subject)
        elif dimension in BUDGET_DIMENSIONS:
            window, total = (_text(value) for value in answer)
            used[subject][dimension.value] = budget_used(window, total, dimension, now_us)
        elif dimension is Dimension.BURST:
            tokens, stamp = (_text(value) for value in answer)
            used[subject][dimension.value] = burst_used(
                tokens, stamp, now_us, query.burst_capacity, query.burst_refill_per_minute
            )
        else:
            used[subject][dimension.value] = int(answer)
    if token_reads:
        for subject, costs in zip(token_reads, await charges.execute(), strict=True):
            used[subject][Dimension.TOKENS_PER_MINUTE.value] += sum(int(_text(c) or 0) for c in costs)
    return [SubjectUsage(subject, values) for subject, values in sorted(used.items())]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_usage(url: str, route: str, queries: Sequence[LimitQuery]) -> dict[str, list[SubjectUsage]]:
    """Each limit's subjects and what they use now (limit name -> subjects); raises on any Redis error."""
    client = connect(url, redis_password())
    try:
        seconds, micros = await client.time()
        now_us = int(seconds) * 1_000_000 + int(micros)
        return {query.name: await _read_limit(client, route, query, now_us) for query in queries}
    finally:
        close = getattr(client, "aclose", None) or client.close
        await close()
