"""A lean Redis transport for the quota store's script calls (standalone Redis over TCP only).

redis-py spends most of a small ``EVALSHA`` on its own machinery: a pooled connection checked out
and back in, per-argument encoding, a retry wrapper, a task for every socket write under a timeout,
and a stream reader. Here a batch of commands is one ``write`` of RESP bytes on a plain asyncio
protocol, the replies are parsed by hiredis (redis-py's own optional parser) straight from
``data_received``, and one future per batch resolves when its last reply is in: a lone admission
costs one loop turn to send and one to answer.

Connections are not shared between batches in flight: a batch takes an idle connection (or opens
one), and gives it back once every reply is in. A batch cancelled before its replies arrived (the
store's operation timeout) closes its connection, as redis-py drops a half-read one; a connection
that fails fails every batch waiting on it with ``redis.exceptions.ConnectionError``. Error replies
come back in place as ``ResponseError`` (``NoScriptError`` for ``NOSCRIPT``), like a redis-py
pipeline with ``raise_on_error=False``; ``LOADING`` (a restarting Redis) fails the batch like a lost
connection. Cluster, Sentinel, TLS and Unix sockets stay on redis-py (``RedisQuotaStore``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
from redis.exceptions import BusyLoadingError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

Arg = bytes | str | int


def command(*args: Arg) -> bytes:
    """One command in RESP: an array of bulk strings (str as UTF-8, int in decimal), packed by hiredis
    in C (about a third of the cost of building it in Python)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


def evalsha(sha: str, keys: list[Any], args: list[Any]) -> bytes:
    """``EVALSHA sha numkeys keys... args...`` in RESP."""
    return command(b"EVALSHA", sha, len(keys), *keys, *args)


def _reply(value: Any) -> Any:
    """An error reply as redis-py's exception (not raised): ``NoScriptError`` for NOSCRIPT."""
    if isinstance(value, ResponseError):
        text = str(value)
        if text.startswith("NOSCRIPT"):
            return NoScriptError(text)
        if text.startswith("LOADING"):
            raise BusyLoadingError(text)
    return value


#: Called with a batch's replies, or with the error that failed it, where they are read.
OnReplies = Callable[[list[Any], BaseException | None], None]


class _Replies:
    """The replies one batch waits for, in order, and who gets them."""

    __slots__ = ("count", "items", "on_done")

    def __init__(self, count: int, on_done: OnReplies) -> None:
        self.count = count
        self.items: list[Any] = []
        self.on_done = on_done


def _into_future(future: asyncio.Future[list[Any]], items: list[Any], error: BaseException | None) -> None:
    """``send``'s delivery: the replies, or the failure, into the batch's future."""
    if future.done():  # the awaiting batch is gone (cancelled)
        return
    if error is None:
        future.set_result(items)
    else:
        future.set_exception(error)
        future.exception()  # the awaiting batch may go away before reading it: never "not retrieved"


class RespConnection(asyncio.Protocol):
    """One TCP connection: pipelined writes, replies matched to their batches in order."""

    def __init__(self) -> None:
        self._parser = hiredis.Reader(replyError=ResponseError)
        self._waiting: deque[_Replies] = deque()
        self._transport: asyncio.Transport | None = None
        self.broken: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write ``count`` commands (already RESP); the future resolves to their ``count`` replies."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.send_then(payload, count, partial(_into_future, future))
        return future

    def send_then(self, payload: bytes, count: int, on_done: OnReplies) -> None:
        """Write ``count`` commands; ``on_done`` gets their replies in ``data_received`` itself (no
        future, no loop turn between reading the replies and acting on them) or the failure."""
        if self.broken is not None or self._transport is None:
            on_done([], self.broken or RedisConnectionError("redis connection not open"))
            return
        self._waiting.append(_Replies(count, on_done))
        self._transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while True:
            try:
                reply = self._parser.gets()
            except hiredis.ProtocolError as error:
                self.fail(RedisConnectionError(f"redis protocol error: {error}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self.fail(RedisConnectionError("redis sent a reply nobody asked for"))
                return
            replies = self._waiting[0]
            try:
                replies.items.append(_reply(reply))
            except BusyLoadingError as error:
                self.fail(error)
                return
            if len(replies.items) == replies.count:
                self._waiting.popleft()
                replies.on_done(replies.items, None)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        self.fail(RedisConnectionError(f"redis connection lost{reason}"))

    def fail(self, error: BaseException) -> None:
        """Close the connection and fail every batch still waiting on it."""
        if self.broken is None:
            self.broken = error
        if self._transport is not None:
            self._transport.close()
        while self._waiting:
            replies = self._waiting.popleft()
            replies.on_done(replies.items, error)

    @property
    def waiting(self) -> int:
        """Batches whose replies are not all in yet."""
        return len(self._waiting)


class RespPool:
    """Connections to one standalone Redis, one per batch in flight, reused when idle."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self._handshake = b""
        self._handshake_count = 0
        if password:
            auth = (b"AUTH", username, password) if username else (b"AUTH", password)
            self._handshake += command(*auth)
            self._handshake_count += 1
        if db:
            self._handshake += command(b"SELECT", db)
            self._handshake_count += 1
        self._idle: list[RespConnection] = []
        self._open: set[RespConnection] = set()

    def take_idle(self) -> RespConnection | None:
        """An open idle connection, now the caller's (``give_back`` or ``drop`` it); None if none."""
        while self._idle:
            connection = self._idle.pop()
            if connection.broken is None:
                return connection
            self._open.discard(connection)
        return None

    def give_back(self, connection: RespConnection) -> None:
        """Return a connection whose replies are all in."""
        self._idle.append(connection)

    def drop(self, connection: RespConnection, error: BaseException) -> None:
        """Close a connection that failed or was given up on (its replies are not all in)."""
        connection.fail(error)
        self._open.discard(connection)

    async def execute(self, payload: bytes, count: int) -> list[Any]:
        """Send ``count`` pipelined commands on one connection; their replies, in order."""
        connection = self.take_idle()
        if connection is None:
            connection = await self._connect()
        try:
            replies = await connection.send(payload, count)
        except BaseException as error:  # cancelled (a timeout), or the connection failed
            self.drop(
                connection, error if isinstance(error, Exception) else RedisConnectionError("cancelled")
            )
            raise
        self.give_back(connection)
        return replies

    async def _connect(self) -> RespConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(RespConnection, self.host, self.port)
        except TimeoutError:
            raise RedisConnectionError(f"timeout connecting to redis at {self.host}:{self.port}") from None
        except OSError as error:
            where = f"{self.host}:{self.port}"
            raise RedisConnectionError(f"cannot connect to redis at {where}: {error}") from None
        self._open.add(connection)
        if self._handshake_count:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    replies = await connection.send(self._handshake, self._handshake_count)
            except BaseException:
                connection.fail(RedisConnectionError("redis handshake failed"))
                self._open.discard(connection)
                raise
            for reply in replies:
                if isinstance(reply, ResponseError):
                    connection.fail(RedisConnectionError(f"redis handshake failed: {reply}"))
                    self._open.discard(connection)
                    raise RedisConnectionError(f"redis handshake failed: {reply}")
        return connection

    def forget_idle(self) -> None:
        """Close the idle connections (they may all belong to a Redis that just restarted)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.fail(RedisConnectionError("redis connection dropped"))
            self._open.discard(connection)

    @property
    def connections(self) -> int:
        """Open connections, idle or carrying a batch."""
        return len(self._open)

    async def close(self) -> None:
        self.forget_idle()
        for connection in list(self._open):
            connection.fail(RedisConnectionError("quota store closed"))
        self._open.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)  # let the transports close
