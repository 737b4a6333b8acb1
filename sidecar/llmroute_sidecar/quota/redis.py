"""The Redis quota store: exact limits across every replica of a route.

One ``EVALSHA`` admits (all limits, all or nothing), one settles (actual tokens, lease release).
Concurrent operations are batched: a few workers, one connection each, send every operation queued
meanwhile as one pipeline, so a burst costs a handful of round trips and never waits for a pool
(``batching.py``). NOSCRIPT (a restarted Redis) is answered by loading the script and resending.
Keys carry the route as hash tag (``llmr:{ns/name}:...``) so an admission touches one Cluster slot;
every key expires when idle.

Failure detection: a round trip that fails on a connection (refused, reset, a pooled connection
that died with its Redis) is retried once, on a fresh connection; a second failure, or no answer
within ``OPERATION_TIMEOUT`` of a responsive event loop, marks the store *down*: operations then
fail at once for a short, growing pause (50 ms doubling to 500 ms; one probe at a time after it)
and a PING ends the pause. An operation that waited past its queue budget while Redis answers
marks it *busy* (back-pressure), which never makes a pod not ready. Every exception out of
redis-py becomes ``StoreUnavailableError``.

URLs: ``redis://`` and ``rediss://`` (single server), ``redis+cluster://`` / ``rediss+cluster://``
(Cluster, any node), ``redis+sentinel://host:port[,host:port]/service[/db]`` (Sentinel). A password
in the URL, or in ``LLMROUTE_REDIS_PASSWORD`` / the file named by ``LLMROUTE_REDIS_PASSWORD_FILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from llmroute_sidecar.quota.base import (
    BUDGET_DIMENSIONS,
    AdmissionRequest,
    Decision,
    Dimension,
    Lease,
    LimitCheck,
    LimitState,
    PerCheck,
    StoreState,
    StoreUnavailableError,
    settled_cost,
)
from llmroute_sidecar.quota.batching import (
    AnswerTimeout,
    AnswerWatch,
    Batcher,
    LoopLag,
    Operation,
    StoreBusyError,
    WatchTimer,
    answered,
)
from llmroute_sidecar.quota.resp import RespConnection, RespPool, command, evalsha
from llmroute_sidecar.quota.scripts import ADMIT, CANCEL, CHARGE, DIMENSION_CODES, SETTLE

log = logging.getLogger("llmroute.quota.redis")

#: One round trip (a whole batch) before Redis counts as not answering.
OPERATION_TIMEOUT = 0.5
#: How long an operation may wait in this sidecar for its round trip while Redis answers.
QUEUE_BUDGET_SECONDS = 5.0
#: Script errors (a bug, or a Redis refusing scripts) are logged at most this often.
SCRIPT_ERROR_LOG_SECONDS = 10.0
#: Concurrent round trips carrying batched operations, and the most operations in one.
WORKERS = 4
MAX_BATCH = 100
#: A settlement waits at most this long in the batch queue for an admission to ride along with.
SETTLE_WITHIN_SECONDS = 0.005
#: Connections per sidecar: the workers, the health ping, the fleet heartbeat, spares.
MAX_CONNECTIONS = 16
MIN_PAUSE, MAX_PAUSE = 0.05, 0.5
HEARTBEAT_SECONDS = 5.0
MEMBER_TTL_SECONDS = 15.0
ORDER = (
    Dimension.REQUESTS_PER_MINUTE,
    Dimension.REQUESTS_PER_HOUR,
    Dimension.TOKENS_PER_MINUTE,
    Dimension.CONCURRENT_REQUESTS,
    Dimension.BURST,
    Dimension.TOKENS_PER_DAY,
    Dimension.TOKENS_PER_MONTH,
    Dimension.COST_PER_DAY,
    Dimension.COST_PER_MONTH,
)
#: Dimensions a settlement touches.
SETTLED = frozenset({Dimension.TOKENS_PER_MINUTE, Dimension.CONCURRENT_REQUESTS}) | BUDGET_DIMENSIONS
_SHORT = {
    Dimension.REQUESTS_PER_MINUTE: "rpm",
    Dimension.REQUESTS_PER_HOUR: "rph",
    Dimension.TOKENS_PER_MINUTE: "tpm",
    Dimension.CONCURRENT_REQUESTS: "conc",
    Dimension.BURST: "burst",
    Dimension.TOKENS_PER_DAY: "tpd",
    Dimension.TOKENS_PER_MONTH: "tpmo",
    Dimension.COST_PER_DAY: "cpd",
    Dimension.COST_PER_MONTH: "cpmo",
}

Client = aioredis.Redis | RedisCluster
StateListener = Callable[[StoreState], None]


def describe(error: BaseException) -> str:
    """``Type: message`` (redis-py's own repr hides the message)."""
    return f"{type(error).__name__}: {error}"


def key_prefix(route: str) -> str:
    """Every key of a route shares this hash tag: one admission, one Cluster slot."""
    return f"llmr:{{{route}}}"


Item = tuple[LimitCheck, Dimension, int]


@dataclass(frozen=True)
class _Plan:
    """What one check sends to Redis, worked out once per (route, check): its items in ``ORDER``,
    their admission KEYS and ARGV as bytes, and the settlement's keys, codes and members."""

    items: tuple[Item, ...]
    admit_keys: tuple[bytes, ...]
    admit_args: tuple[bytes, ...]
    settle_keys: tuple[str, ...]
    settle_codes: tuple[int, ...]
    settle_members: tuple[str, ...]


def _make_plan(route: str, check: LimitCheck) -> _Plan:
    values = check.values()
    items = tuple((check, dimension, values[dimension]) for dimension in ORDER if dimension in values)
    admit_keys: list[bytes] = []
    admit_args: list[bytes] = []
    settled = [
        (dimension, _keys(route, check, dimension)) for _, dimension, _ in items if dimension in SETTLED
    ]
    for _, dimension, value in items:
        item_keys, item_args = _encoded_item(route, check, dimension, value)
        admit_keys.extend(item_keys)
        admit_args.extend(item_args)
    return _Plan(
        items,
        tuple(admit_keys),
        tuple(admit_args),
        tuple(key for _, keys in settled for key in keys),
        tuple(DIMENSION_CODES[dimension.value] for dimension, _ in settled),
        tuple(_member(check) if dimension in BUDGET_DIMENSIONS else "" for dimension, _ in settled),
    )


_plan = PerCheck(_make_plan).get


def _items(request: AdmissionRequest) -> list[Item]:
    return [item for check in request.checks for item in _plan(request.route, check).items]


def _encoded_item(
    route: str, check: LimitCheck, dimension: Dimension, value: int
) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes, bytes, bytes]]:
    """An admission item's KEYS and ARGV as bytes (made once per check: ``_make_plan``).

    redis-py encodes every argument of every command (several type checks and a conversion each);
    bytes pass straight through, and an item's keys and values only change with its configuration.
    """
    key, hkey = _keys(route, check, dimension)
    if dimension in BUDGET_DIMENSIONS:
        extra = _member(check).encode()
    else:
        extra = b"%d" % ((check.requests_per_minute or 0) if dimension is Dimension.BURST else 0)
    code = DIMENSION_CODES[dimension.value]
    args = (b"%d" % code, b"%d" % value, b"%d" % int(check.shadow), extra)
    return (key.encode(), hkey.encode()), args


def _keys(route: str, check: LimitCheck, dimension: Dimension) -> tuple[str, str]:
    base = f"{key_prefix(route)}:{check.limit}:{check.subject or '_'}:{_SHORT[dimension]}"
    if dimension in BUDGET_DIMENSIONS:
        return base, top_key(route, check.limit, dimension)
    return base, f"{base}:c"


def top_key(route: str, limit: str, dimension: Dimension) -> str:
    """The sorted set of each subject's spend in a budget's current window (member ``_w``: -window)."""
    return f"{key_prefix(route)}:{limit}:{_SHORT[dimension]}:top"


def _member(check: LimitCheck) -> str:
    """A budget's subject in its top-consumers set; '' (not tracked) for route-scoped limits."""
    return "" if check.scope == "route" else check.subject


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
    """A redis-py asyncio client for a single, Cluster or Sentinel URL.

    redis-py never retries by itself (the store retries once, on a fresh connection); its socket
    timeout is only a backstop behind the store's own, loop-lag-aware operation timeout.
    """
    parts = urlsplit(url)
    options: dict[str, Any] = {
        "socket_timeout": OPERATION_TIMEOUT * 4,
        "socket_connect_timeout": OPERATION_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
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
        url, max_connections=MAX_CONNECTIONS, timeout=OPERATION_TIMEOUT * 4, **options
    )
    return aioredis.Redis(connection_pool=pool)


def lean_pool(client: Client) -> RespPool | None:
    """The lean transport (``resp.py``) for a standalone Redis over TCP; None for anything else."""
    pool = getattr(client, "connection_pool", None)
    if type(client) is not aioredis.Redis or pool is None or pool.connection_class is not aioredis.Connection:
        return None
    options = pool.connection_kwargs
    return RespPool(
        options.get("host", "localhost"),
        int(options.get("port", 6379)),
        OPERATION_TIMEOUT,
        password=options.get("password"),
        username=options.get("username"),
        db=int(options.get("db", 0) or 0),
    )


class RedisQuotaStore:
    """Fleet-wide quotas in Redis (single server, Cluster or Sentinel)."""

    settles_in_background = True
    """Settlement may take a round trip or a retry: callers hand it off the response path."""

    def __init__(self, client: Client, member: str = "") -> None:
        self.client = client
        self._lean = lean_pool(client)
        """Script calls on a standalone Redis skip redis-py (``resp.py``); None: through redis-py."""
        self.member = member or os.urandom(16).hex()[:12]
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)
        self._charge = client.register_script(CHARGE)
        self._cancel = client.register_script(CANCEL)
        self._scripts = {
            script.sha: script for script in (self._admit, self._settle, self._charge, self._cancel)
        }
        start = self._start if self._lean is not None else None  # only the lean transport writes at once
        self._batcher = Batcher(self._send, WORKERS, MAX_BATCH, on_expired=self._busy, start=start)
        self._closing = False
        self.state = StoreState.UP
        self._listeners: list[tuple[StateListener, Callable[[], None] | None]] = []
        self._paused_until = 0.0
        self._probe_until = 0.0
        self._probe = asyncio.Event()
        self._pause = MIN_PAUSE
        self._replicas = 1
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._lag = LoopLag()
        self._watches = WatchTimer()
        """Looks at the lean batches' answer timeouts (one timer for all of them)."""
        self._last_answer = 0.0
        self._script_error_logged = -SCRIPT_ERROR_LOG_SECONDS

    @classmethod
    def from_url(cls, url: str, member: str = "") -> RedisQuotaStore:
        return cls(connect(url, redis_password()), member)

    # -- state -----------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False only while the store is down (busy is back-pressure, not unavailability)."""
        return self.state is not StoreState.DOWN

    def watch(self, on_state: StateListener, on_busy: Callable[[], None] | None = None) -> None:
        """Call ``on_state`` now and on every state change, ``on_busy`` for every busy operation."""
        self._listeners.append((on_state, on_busy))
        on_state(self.state)

    def _set_state(self, state: StoreState, error: BaseException | None = None) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        fields: dict[str, Any] = {"from": previous.value, "to": state.value}
        if error is not None:
            fields["error"] = describe(error)
        level = logging.WARNING if state is StoreState.DOWN else logging.INFO
        log.log(level, "redis store %s", state.value, extra={"fields": fields})
        for on_state, _ in self._listeners:
            on_state(state)

    async def _check_paused(self) -> None:
        """While down: fail at once during the pause; after it, one operation probes Redis and the
        others wait for its outcome (at most about one operation timeout) instead of failing."""
        if self.state is not StoreState.DOWN:
            return
        now = time.monotonic()
        if now < self._paused_until:
            raise StoreUnavailableError("redis unavailable (retrying shortly)")
        if now < self._probe_until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe.wait(), self._probe_until - now)
            if self.state is StoreState.DOWN:
                raise StoreUnavailableError("redis unavailable (retrying shortly)")
            return
        self._probe = asyncio.Event()
        self._probe_until = now + OPERATION_TIMEOUT * 2

    def _probed(self) -> None:
        self._probe_until = 0.0
        self._probe.set()

    def _failed(self, error: BaseException) -> None:
        self._set_state(StoreState.DOWN, error)
        self._paused_until = time.monotonic() + self._pause
        self._pause = min(MAX_PAUSE, self._pause * 2)
        self._probed()
        self._batcher.fail_queued(lambda: StoreUnavailableError(f"redis unavailable: {describe(error)}"))

    def _succeeded(self) -> None:
        self._set_state(StoreState.UP)
        self._pause = MIN_PAUSE
        self._probed()

    def _busy(self) -> None:
        if self.state is StoreState.UP:
            self._set_state(StoreState.BUSY)
        for _, on_busy in self._listeners:
            if on_busy is not None:
                on_busy()

    # -- round trips -----------------------------------------------------------------------------

    async def _call(
        self,
        script: Any,
        keys: Sequence[str],
        args: Sequence[Any],
        orphaned: Callable[[Any], None] | None = None,
    ) -> Any:
        """Queue one script call for the next batch and wait for its result."""
        if self.state is StoreState.DOWN:
            await self._check_paused()
        operation = Operation(
            script.sha, script.script, list(keys), list(args), time.monotonic() + QUEUE_BUDGET_SECONDS
        )
        operation.orphaned = orphaned
        self._batcher.submit(operation)
        return await operation.future

    def _start(self, batch: list[Operation], landed: Callable[[], None]) -> bool:
        """Write ``batch`` now, from the submitting task, on an idle lean connection: its replies are
        handled where they are read (``_landed``, which calls ``landed`` once every operation is
        resolved), so a lone admission costs no worker's loop turns and no task. False (a worker
        sends it) without the lean transport or an idle connection, or while Redis is not known to be
        up; any failure is handed to the worker path's handling."""
        if self._lean is None or self.state is not StoreState.UP or self._closing:
            return False
        connection = self._lean.take_idle()
        if connection is None:
            return False
        sent = time.monotonic()
        watch = AnswerWatch(
            OPERATION_TIMEOUT,
            self._lag,
            lambda _: connection.fail(RedisConnectionError("no answer within the operation timeout")),
            lambda: self._last_answer > sent,
            QUEUE_BUDGET_SECONDS,
            self._watches,
        )
        connection.send_then(
            _payload(batch), len(batch), partial(self._landed, batch, connection, sent, watch, landed)
        )
        return True

    def _landed(
        self,
        batch: list[Operation],
        connection: RespConnection,
        sent: float,
        watch: AnswerWatch,
        landed: Callable[[], None],
        results: list[Any],
        error: BaseException | None,
    ) -> None:
        """The replies (or the failure) of a batch ``_start`` sent, where they were read (inside the
        connection's ``data_received``: whatever goes wrong here must not leave a caller waiting)."""
        resend: Coroutine[Any, Any, None] | None = None
        try:
            watch.stop()
            assert self._lean is not None
            if error is None:
                self._lean.give_back(connection)
                lost = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
                if not lost:
                    self._sent(batch, results)
                else:  # Redis lost its scripts (a restart, SCRIPT FLUSH): the worker path loads and resends
                    kept = [index for index in range(len(batch)) if index not in lost]
                    self._sent([batch[index] for index in kept], [results[index] for index in kept])
                    resend = self._reload_and_send([batch[index] for index in lost])
            else:
                self._lean.drop(connection, error)
                if self._closing:
                    for operation in batch:
                        operation.resolve(StoreUnavailableError("quota store closed"))
                elif watch.verdict is not None:
                    self._send_failed(batch, AnswerTimeout(busy_loop=watch.verdict), sent)
                else:
                    self._retrying(error)  # a pooled connection of a restarted Redis, a reset
                    resend = self._send(batch, retry=False)
        except Exception as failure:  # a bug: fail the batch's callers rather than strand them
            log.error("redis batch handling failed", exc_info=failure)
            for operation in batch:
                operation.resolve(StoreUnavailableError(f"quota store error: {failure!r}"))
            if resend is not None:
                resend.close()
                resend = None
        if resend is None:
            landed()
        else:
            self._in_background(resend).add_done_callback(lambda _: landed())

    async def _send(self, batch: list[Operation], retry: bool = True) -> None:
        """One batch: a pipelined round trip; resolves every operation, never raises."""
        sent = time.monotonic()
        try:
            results = await self._retried(lambda: self._pipeline(batch), sent, retry)
        except Exception as error:
            self._send_failed(batch, error, sent)
            return
        self._sent(batch, results)

    def _sent(self, batch: list[Operation], results: list[Any]) -> None:
        """Resolve a batch's operations with their replies (the last first: in a batch of settlements
        and an admission, the admission's request goes on first)."""
        self._last_answer = time.monotonic()
        self._succeeded()
        for index in range(len(batch) - 1, -1, -1):
            operation, result = batch[index], results[index]
            if isinstance(result, ResponseError):  # this command failed, the connection is fine
                busy = str(result).startswith("BUSY")
                if not busy:
                    self._script_failed(result)
                error_type = StoreBusyError if busy else StoreUnavailableError
                operation.resolve(error_type(f"redis error: {result}"))
            else:
                operation.resolve(result)

    def _send_failed(self, batch: list[Operation], error: Exception, sent: float) -> None:
        """Resolve a batch whose round trip failed: busy when Redis answers others, else down."""
        if isinstance(error, AnswerTimeout):
            if error.busy_loop or self._last_answer > sent:  # Redis answers others: back-pressure
                self._busy()
                for operation in batch:
                    operation.resolve(StoreBusyError("quota store busy: this sidecar is overloaded"))
                return
            self._failed(error)
            for operation in batch:
                operation.resolve(StoreUnavailableError("redis did not answer in time"))
            return
        self._failed(error)
        for operation in batch:
            operation.resolve(StoreUnavailableError(f"redis unavailable: {describe(error)}"))

    def _script_failed(self, error: ResponseError) -> None:
        """A script error is a bug or a misconfigured Redis, never silent: logged, at most every 10 s."""
        now = time.monotonic()
        if now - self._script_error_logged >= SCRIPT_ERROR_LOG_SECONDS:
            self._script_error_logged = now
            log.error("redis script error", extra={"fields": {"error": str(error)}})

    async def _retried(
        self, work: Callable[[], Awaitable[Any]], sent: float | None = None, retry: bool = True
    ) -> Any:
        """Run one round trip; once more on a fresh connection when the first one proves dead (unless
        ``retry`` is False: this is already the second attempt).

        With ``sent`` (a batch), a slow answer is waited for up to the queue budget while other
        round trips since ``sent`` prove that Redis answers.
        """
        patience = None if sent is None else (lambda: self._last_answer > sent)
        limit = None if sent is None else QUEUE_BUDGET_SECONDS
        try:
            return await answered(work(), OPERATION_TIMEOUT, self._lag, patience, limit)
        except AnswerTimeout:
            raise
        except Exception as error:  # refused, reset, a pooled connection of a restarted Redis
            if not retry:
                raise
            self._retrying(error)
        return await answered(work(), OPERATION_TIMEOUT, self._lag, patience, limit)

    def _retrying(self, error: BaseException) -> None:
        """A round trip failed on a connection that may belong to a restarted Redis: the next attempt
        goes on a fresh one."""
        log.info("redis round trip failed; retrying once", extra={"fields": {"error": describe(error)}})
        self._forget_idle_connections()

    def _forget_idle_connections(self) -> None:
        """Take the idle pooled connections out of the pool (they may all belong to a dead Redis).

        Only idle ones, synchronously: nobody else holds them, so nothing is disconnected under another
        request's feet (disconnecting a shared pool raced redis-py into AttributeErrors).
        """
        idle = getattr(getattr(self.client, "connection_pool", None), "_available_connections", None)
        if not isinstance(idle, list):
            return
        if self._lean is not None:
            self._lean.forget_idle()
        stale = list(idle)
        idle.clear()
        for connection in stale:
            self._in_background(connection.disconnect())

    async def _pipeline(self, batch: list[Operation]) -> list[Any]:
        """EVALSHA every operation in one pipeline; load scripts Redis lost and resend those."""
        if isinstance(self.client, RedisCluster):
            return await self._one_by_one(batch)
        results = await self._evalsha(batch)
        missing = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await self._load_scripts({batch[index].source for index in missing})
            again = await self._evalsha([batch[index] for index in missing])
            for index, result in zip(missing, again, strict=True):
                results[index] = result
        return results

    async def _load_scripts(self, sources: set[str]) -> None:
        for source in sources:
            if self._lean is not None:
                (loaded,) = await self._lean.execute(command(b"SCRIPT", b"LOAD", source), 1)
                if isinstance(loaded, ResponseError):
                    raise loaded
            else:
                await self.client.script_load(source)

    async def _reload_and_send(self, batch: list[Operation]) -> None:
        """Load the scripts Redis lost, then send ``batch`` (one attempt); resolves every operation."""
        try:
            await answered(self._load_scripts({op.source for op in batch}), OPERATION_TIMEOUT, self._lag)
        except Exception as error:
            self._send_failed(batch, error, time.monotonic())
            return
        await self._send(batch, retry=False)

    async def _evalsha(self, batch: list[Operation]) -> list[Any]:
        if self._lean is not None:
            return await self._lean.execute(_payload(batch), len(batch))
        if len(batch) == 1:  # a lone operation skips the pipeline object (about a quarter of the cost)
            (operation,) = batch
            try:
                return [
                    await self.client.evalsha(
                        operation.sha, len(operation.keys), *operation.keys, *operation.args
                    )
                ]
            except ResponseError as error:  # this command failed, the connection is fine
                return [error]
        pipe = self.client.pipeline(transaction=False)
        for operation in batch:
            pipe.evalsha(operation.sha, len(operation.keys), *operation.keys, *operation.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _one_by_one(self, batch: list[Operation]) -> list[Any]:
        """Cluster: each operation goes to its slot's node (redis-py reloads scripts on NOSCRIPT)."""
        results = await asyncio.gather(
            *(self._scripts[op.sha](keys=op.keys, args=op.args) for op in batch), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ResponseError):
                raise result
        return list(results)

    # -- QuotaStore ------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Decision:
        items = _items(request)
        if not items:
            return Decision(admitted=True)
        lease_id = os.urandom(16).hex()
        keys: list[Any] = []
        args: list[Any] = [
            lease_id,
            request.tokens,
            int(request.lease_seconds * 1_000_000),
            len(items),
            max(0, request.cost),
        ]
        for check in request.checks:
            plan = _plan(request.route, check)
            keys.extend(plan.admit_keys)
            args.extend(plan.admit_args)

        def orphaned(raw: Any) -> None:  # admitted for a caller that went away: release at once
            if raw and int(raw[0]) == 1:
                day, month = int(raw[-2]), int(raw[-1])
                lease = Lease(lease_id, request, request.tokens, day, month)
                self._in_background(self.settle(lease, 0))

        raw = await self._call(self._admit, keys, args, orphaned)
        return _decision(request, items, [int(v) for v in raw], lease_id)

    async def settle(self, lease: Lease, actual_tokens: int, actual_cost: int | None = None) -> None:
        """One attempt (batched with others); the caller retries (``settlement.Settler``)."""
        (outcome,) = await self.settle_many([(lease, actual_tokens, actual_cost)])
        if outcome is not None:
            raise outcome

    async def settle_many(
        self, settlements: Sequence[tuple[Lease, int, int | None] | tuple[Lease, int]]
    ) -> list[Exception | None]:
        """Settle many leases in the same batches (one attempt each): per lease None or its error.

        Queued at once and awaited as plain futures, so a round of the settler costs one pipelined
        round trip per ``MAX_BATCH`` leases and no task per lease.
        """
        outcomes: list[Exception | None] = [None] * len(settlements)
        waiting: list[tuple[int, asyncio.Future[Any]]] = []
        try:
            await self._check_paused()
        except StoreUnavailableError as error:
            return [error] * len(settlements)
        deadline = time.monotonic() + QUEUE_BUDGET_SECONDS
        for index, settlement in enumerate(settlements):
            lease, actual_tokens = settlement[0], settlement[1]
            actual_cost = settlement[2] if len(settlement) > 2 else None
            operation = self._settle_operation(lease, actual_tokens, actual_cost, deadline)
            if operation is not None:
                self._batcher.submit(operation, within=SETTLE_WITHIN_SECONDS)
                waiting.append((index, operation.future))
        results: list[Any] = []
        if len(waiting) == 1:  # a lone settlement (one request at a time): no gather, no extra loop turn
            try:
                results.append(await waiting[0][1])
            except Exception as error:
                results.append(error)
        else:
            results = await asyncio.gather(*(future for _, future in waiting), return_exceptions=True)
        for (index, _), result in zip(waiting, results, strict=True):
            if isinstance(result, Exception):
                outcomes[index] = result
            elif isinstance(result, BaseException):
                raise result
        return outcomes

    def settle_soon(
        self,
        lease: Lease,
        actual_tokens: int,
        actual_cost: int | None,
        done: Callable[[Exception | None], None],
    ) -> bool:
        """Queue one settlement to ride with the next admission (or go alone within 5 ms) and return;
        ``done`` gets None or its error once Redis answered. False while Redis is down (the caller's
        settler then waits out the pause and retries it)."""
        if self.state is StoreState.DOWN:
            return False
        operation = self._settle_operation(
            lease, actual_tokens, actual_cost, time.monotonic() + QUEUE_BUDGET_SECONDS
        )
        if operation is None:
            done(None)
            return True
        operation.future.add_done_callback(partial(_report_outcome, done))
        self._batcher.submit(operation, within=SETTLE_WITHIN_SECONDS)
        return True

    def _settle_operation(
        self, lease: Lease, actual_tokens: int, actual_cost: int | None, deadline: float
    ) -> Operation | None:
        plans = [_plan(lease.request.route, check) for check in lease.request.checks]
        codes = [code for plan in plans for code in plan.settle_codes]
        if not codes:
            return None
        keys = [key for plan in plans for key in plan.settle_keys]
        args: list[Any] = [lease.lease_id, max(0, actual_tokens), len(codes), *codes]
        args.extend((settled_cost(lease, actual_tokens, actual_cost), lease.day, lease.month))
        args.extend(member for plan in plans for member in plan.settle_members)
        script: Any = self._settle
        return Operation(script.sha, script.script, keys, args, deadline)

    async def cancel(self, lease: Lease) -> None:
        """Undo an admission as if it had been rejected (one EVALSHA): for a request that never reached
        an upstream, before any settlement. Request counts, token charges, slots, budget charges and a
        burst token return; cancelling twice does nothing more."""
        keys: list[str] = []
        args: list[Any] = [lease.lease_id, 0, lease.day, lease.month]
        items = _items(lease.request)
        for check, dimension, value in items:
            keys.extend(_keys(lease.request.route, check, dimension))
            member = _member(check) if dimension in BUDGET_DIMENSIONS else ""
            args.extend((DIMENSION_CODES[dimension.value], value, member))
        if items:
            args[1] = len(items)
            await self._call(self._cancel, keys, args)

    # -- live charges: streams outgrowing their reservation ----------------------------------------

    async def charge(self, lease: Lease, tokens_so_far: int, cost_so_far: int | None = None) -> None:
        """One EVALSHA (batched) raising the lease's tokensPerMinute entries to ``tokens_so_far`` and
        its day/month budget charges to ``tokens_so_far`` / ``cost_so_far``."""
        items = _items(lease.request)
        keys = [
            key
            for check, dimension, _ in items
            if dimension is Dimension.TOKENS_PER_MINUTE
            for key in _keys(lease.request.route, check, dimension)
        ]
        tpm_items = len(keys) // 2
        budget_args: list[Any] = []
        for check, dimension, _ in items:
            if dimension in BUDGET_DIMENSIONS:
                keys.extend(_keys(lease.request.route, check, dimension))
                budget_args.extend((DIMENSION_CODES[dimension.value], _member(check)))
        if keys:
            cost = -1 if cost_so_far is None else max(0, cost_so_far)
            args = [lease.lease_id, max(0, tokens_so_far), tpm_items, cost, lease.day, lease.month]
            await self._call(self._charge, keys, [*args, *budget_args])

    async def ping(self) -> bool:
        """True when Redis answers; ends the failure pause so exact limiting resumes at once."""
        sent = time.monotonic()
        try:
            await self._retried(self.client.ping)
        except AnswerTimeout as error:
            if not error.busy_loop and self._last_answer < sent:
                self._failed(error)
            return False
        except Exception as error:
            self._failed(error)
            return False
        self._last_answer = time.monotonic()
        self._succeeded()
        return True

    async def wait_for_capacity(self, timeout: float) -> None:
        # Slots free up in other pods too: poll at a short, bounded interval.
        await asyncio.sleep(min(timeout, 0.02))

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug(
                "background store operation failed", extra={"fields": {"error": repr(task.exception())}}
            )

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self._background:
            await asyncio.wait(set(self._background), timeout=OPERATION_TIMEOUT * 2)
        await self._batcher.close()
        await self._lag.close()
        self._watches.close()
        if self._lean is not None:
            await self._lean.close()
        close = getattr(self.client, "aclose", None) or self.client.close
        with contextlib.suppress(Exception):
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
            with contextlib.suppress(Exception):
                self._replicas = await answered(self.beat(key), OPERATION_TIMEOUT, self._lag)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def beat(self, key: str) -> int:
        """Record this member and count the live ones (one round trip)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(key, {self.member: now})
        pipe.zremrangebyscore(key, "-inf", now - MEMBER_TTL_SECONDS)
        pipe.expire(key, int(MEMBER_TTL_SECONDS * 4))
        pipe.zcard(key)
        results = await pipe.execute()
        return max(1, int(results[-1]))


def _payload(batch: list[Operation]) -> bytes:
    """A batch as one write: ``EVALSHA`` per operation, in RESP."""
    return b"".join([evalsha(op.sha, op.keys, op.args) for op in batch])


def _report_outcome(done: Callable[[Exception | None], None], future: asyncio.Future[Any]) -> None:
    """A queued settlement's outcome to its ``done``: None, or the error (never raised)."""
    if future.cancelled():
        done(StoreUnavailableError("settlement cancelled"))
        return
    error = future.exception()
    done(error if error is None or isinstance(error, Exception) else StoreUnavailableError(repr(error)))


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
        lease = Lease(lease_id, request, request.tokens, raw[-2], raw[-1])
        return Decision(True, lease, None, 0.0, tightest, tuple(states), tuple(shadow))
    rejected, retry = max(failing, key=lambda pair: pair[1])
    return Decision(False, None, rejected, retry, rejected, tuple(states), ())
