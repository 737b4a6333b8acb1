"""The Redis quota store: exact limits across every replica of a route.

One ``EVALSHA`` admits (all limits, all or nothing), one settles (actual tokens, lease release);
NOSCRIPT is handled by redis-py's script objects. Keys carry the route as hash tag
(``llmr:{ns/name}:...``) so an admission touches one Cluster slot; every key expires when idle.

Failures raise ``StoreUnavailableError`` at once; after a failure Redis is not asked again for a
short, growing pause (50 ms doubling to 500 ms) so requests take the failure policy without waiting
on timeouts, and exact limiting resumes within a second of Redis returning.

URLs: ``redis://`` and ``rediss://`` (single server), ``redis+cluster://`` / ``rediss+cluster://``
(Cluster, any node), ``redis+sentinel://host:port[,host:port]/service[/db]`` (Sentinel). A password
in the URL, or in ``LLMROUTE_REDIS_PASSWORD`` / the file named by ``LLMROUTE_REDIS_PASSWORD_FILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from llmroute_sidecar.quota.base import (
    AdmissionRequest,
    Decision,
    Dimension,
    Lease,
    LimitCheck,
    LimitState,
    StoreUnavailableError,
)
from llmroute_sidecar.quota.scripts import ADMIT, CHARGE, DIMENSION_CODES, SETTLE

log = logging.getLogger("llmroute.quota.redis")

OPERATION_TIMEOUT = 0.5
MIN_PAUSE, MAX_PAUSE = 0.05, 0.5
#: Connections per sidecar: bursts queue for a connection instead of opening hundreds at once.
MAX_CONNECTIONS = 64
#: Settlement releases slots: it is retried this long before the lease is left to expire.
SETTLE_RETRY_SECONDS = 3.0
HEARTBEAT_SECONDS = 5.0
MEMBER_TTL_SECONDS = 15.0
ORDER = (
    Dimension.REQUESTS_PER_MINUTE,
    Dimension.REQUESTS_PER_HOUR,
    Dimension.TOKENS_PER_MINUTE,
    Dimension.CONCURRENT_REQUESTS,
    Dimension.BURST,
)
_SHORT = {
    Dimension.REQUESTS_PER_MINUTE: "rpm",
    Dimension.REQUESTS_PER_HOUR: "rph",
    Dimension.TOKENS_PER_MINUTE: "tpm",
    Dimension.CONCURRENT_REQUESTS: "conc",
    Dimension.BURST: "burst",
}

Client = aioredis.Redis | RedisCluster


def key_prefix(route: str) -> str:
    """Every key of a route shares this hash tag: one admission, one Cluster slot."""
    return f"llmr:{{{route}}}"


def _items(request: AdmissionRequest) -> list[tuple[LimitCheck, Dimension, int]]:
    items = []
    for check in request.checks:
        values = check.values()
        for dimension in ORDER:
            if dimension in values:
                items.append((check, dimension, values[dimension]))
    return items


def _keys(route: str, check: LimitCheck, dimension: Dimension) -> tuple[str, str]:
    base = f"{key_prefix(route)}:{check.limit}:{check.subject or '_'}:{_SHORT[dimension]}"
    return base, f"{base}:c"


def redis_password(env: dict[str, str] | None = None) -> str | None:
    """The Redis password from the environment or a mounted Secret file."""
    env = dict(os.environ) if env is None else env
    if env.get("LLMROUTE_REDIS_PASSWORD"):
        return env["LLMROUTE_REDIS_PASSWORD"]
    path = env.get("LLMROUTE_REDIS_PASSWORD_FILE")
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def connect(url: str, password: str | None = None) -> Client:
    """A redis-py asyncio client for a single, Cluster or Sentinel URL."""
    parts = urlsplit(url)
    options: dict[str, Any] = {
        "socket_timeout": OPERATION_TIMEOUT,
        "socket_connect_timeout": OPERATION_TIMEOUT,
    }
    if password and not parts.password:
        options["password"] = password
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        plain = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(plain, **options)
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        hosts = [
            (h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1]) if ":" in h else 26379)
            for h in parts.netloc.rsplit("@", 1)[-1].split(",")
        ]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a Sentinel URL needs a service name: redis+sentinel://host:26379/mymaster[/db]")
        db = int(path[1]) if len(path) > 1 else 0
        if parts.password:
            options["password"] = unquote(parts.password)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"socket_timeout": OPERATION_TIMEOUT}, **options
        )
        master: aioredis.Redis = sentinel.master_for(path[0], db=db, ssl=parts.scheme.startswith("rediss"))
        return master
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=OPERATION_TIMEOUT * 2, **options
    )
    return aioredis.Redis(connection_pool=pool)


class RedisQuotaStore:
    """Fleet-wide quotas in Redis (single server, Cluster or Sentinel)."""

    def __init__(self, client: Client, member: str = "") -> None:
        self.client = client
        self.member = member or uuid.uuid4().hex[:12]
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)
        self._paused_until = 0.0
        self._pause = MIN_PAUSE
        self._replicas = 1
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.available = True

    @classmethod
    def from_url(cls, url: str, member: str = "") -> RedisQuotaStore:
        return cls(connect(url, redis_password()), member)

    # -- availability ----------------------------------------------------------------------------

    def _check_paused(self) -> None:
        if not self.available and time.monotonic() < self._paused_until:
            raise StoreUnavailableError("redis unavailable (retrying shortly)")

    def _failed(self, error: BaseException) -> StoreUnavailableError:
        if self.available:
            log.warning("redis unavailable", extra={"fields": {"error": repr(error)}})
        self.available = False
        self._paused_until = time.monotonic() + self._pause
        self._pause = min(MAX_PAUSE, self._pause * 2)
        return StoreUnavailableError(f"redis unavailable: {error!r}")

    def _succeeded(self) -> None:
        if not self.available:
            log.info("redis available again")
        self.available = True
        self._pause = MIN_PAUSE

    async def _run(
        self, script: Any, keys: Sequence[str], args: Sequence[Any], fail_fast: bool = True
    ) -> Any:
        if fail_fast:
            self._check_paused()
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT * 2):
                result = await script(keys=list(keys), args=list(args))
        except (RedisError, OSError, TimeoutError) as error:
            await self._drop_connections()
            raise self._failed(error) from None
        self._succeeded()
        return result

    async def _drop_connections(self) -> None:
        """Forget pooled connections after a failure so none goes stale across a Redis restart."""
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()

    # -- QuotaStore ------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Decision:
        items = _items(request)
        if not items:
            return Decision(admitted=True)
        lease_id = uuid.uuid4().hex
        keys: list[str] = []
        args: list[Any] = [lease_id, request.tokens, int(request.lease_seconds * 1_000_000), len(items)]
        for check, dimension, value in items:
            keys.extend(_keys(request.route, check, dimension))
            extra = (check.requests_per_minute or 0) if dimension is Dimension.BURST else 0
            args.extend([DIMENSION_CODES[dimension.value], value, int(check.shadow), extra])
        raw = await self._run(self._admit, keys, args)
        return _decision(request, items, [int(v) for v in raw], lease_id)

    async def settle(self, lease: Lease, actual_tokens: int) -> None:
        items = [
            (check, dimension)
            for check, dimension, _ in _items(lease.request)
            if dimension in (Dimension.TOKENS_PER_MINUTE, Dimension.CONCURRENT_REQUESTS)
        ]
        if not items:
            return
        keys: list[str] = []
        args: list[Any] = [lease.lease_id, max(0, actual_tokens), len(items)]
        for check, dimension in items:
            keys.extend(_keys(lease.request.route, check, dimension))
            args.append(DIMENSION_CODES[dimension.value])
        # Retried (not fail-fast) because a lost settlement holds slots until the lease expires.
        deadline = time.monotonic() + SETTLE_RETRY_SECONDS
        delay = MIN_PAUSE
        while True:
            try:
                await self._run(self._settle, keys, args, fail_fast=False)
                return
            except StoreUnavailableError:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(MAX_PAUSE, delay * 2)

    # -- live charges: streams outgrowing their reservation ----------------------------------------

    @functools.cached_property
    def _charge_script(self) -> Any:
        return self.client.register_script(CHARGE)

    async def charge(self, lease: Lease, tokens_so_far: int) -> None:
        """One EVALSHA raising the lease's tokensPerMinute entries to ``tokens_so_far`` (fail fast)."""
        keys = [
            key
            for check, dimension, _ in _items(lease.request)
            if dimension is Dimension.TOKENS_PER_MINUTE
            for key in _keys(lease.request.route, check, dimension)
        ]
        if keys:
            await self._run(self._charge_script, keys, [lease.lease_id, max(0, tokens_so_far)])

    async def ping(self) -> bool:
        """True when Redis answers; resets the failure pause so exact limiting resumes at once."""
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT * 2):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        self._succeeded()
        return True

    async def wait_for_capacity(self, timeout: float) -> None:
        # Slots free up in other pods too: poll at a short, bounded interval.
        await asyncio.sleep(min(timeout, 0.02))

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        close = getattr(self.client, "aclose", None) or self.client.close
        await close()

    # -- fleet heartbeat -------------------------------------------------------------------------

    @property
    def replicas(self) -> int:
        """Sidecars of this route seen alive in the last 15 s (last known value while Redis is down)."""
        return self._replicas

    def start_heartbeat(self, route: str) -> None:
        self._heartbeat_task = asyncio.create_task(self._heartbeat(route), name="fleet-heartbeat")

    async def _heartbeat(self, route: str) -> None:
        key = f"{key_prefix(route)}:members"
        while True:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                self._replicas = await self.beat(key)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def beat(self, key: str) -> int:
        """Record this member and count the live ones."""
        now = time.time()
        async with asyncio.timeout(OPERATION_TIMEOUT * 2):
            await self.client.zadd(key, {self.member: now})
            await self.client.zremrangebyscore(key, "-inf", now - MEMBER_TTL_SECONDS)
            await self.client.expire(key, int(MEMBER_TTL_SECONDS * 4))
            count = int(await self.client.zcard(key))
        return max(1, count)


def _decision(
    request: AdmissionRequest, items: list[tuple[LimitCheck, Dimension, int]], raw: list[int], lease_id: str
) -> Decision:
    admitted = raw[0] == 1
    states: list[LimitState] = []
    failing: list[tuple[LimitState, float]] = []
    shadow: list[LimitState] = []
    enforce_states: list[LimitState] = []
    for index, (check, dimension, value) in enumerate(items):
        passed, remaining, retry_us, reset_us = raw[2 + index * 4 : 6 + index * 4]
        state = LimitState(check.limit, check.scope, dimension, value, remaining, reset_us / 1_000_000)
        states.append(state)
        if check.shadow:
            if not passed:
                shadow.append(state)
            continue
        enforce_states.append(state)
        if not passed:
            failing.append((state, retry_us / 1_000_000))
    tightest = min(enforce_states, key=lambda s: (s.remaining, s.reset_seconds), default=None)
    if admitted:
        lease = Lease(lease_id, request, request.tokens)
        return Decision(True, lease, None, 0.0, tightest, tuple(states), tuple(shadow))
    rejected, retry = max(failing, key=lambda pair: pair[1])
    return Decision(False, None, rejected, retry, rejected, tuple(states), ())
