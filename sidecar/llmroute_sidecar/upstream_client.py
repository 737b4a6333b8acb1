"""A lean HTTP/1.1 client for upstream attempts: keep-alive pools on a plain ``asyncio.Protocol``.

aiohttp's client spends a large share of a proxied request on its own machinery (request and
response objects, the connector, a stream reader and its callbacks). Here a request is one
``transport.write`` of pre-built bytes; ``data_received`` parses the response head (one future per
head) and hands body bytes straight to the response, which ``readany`` returns as they come.

Pools: one per origin (scheme, host, port), unlimited, reused last-in first-out; a connection idle
for ``idle_timeout`` seconds is closed by one timer per client. A connection goes back to its pool
only after a complete response that allowed keep-alive; anything else (a cancelled request, an
unread or broken body) closes it. No proxies, no decompression, no redirects. Request bodies are
``bytes``: streamed bodies stay on aiohttp (``upstream``). Timeouts are the caller's
(``asyncio.timeout`` around ``request``, the relay's watchdog around ``readany``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from llmroute_sidecar.upstream_http import (
    CHUNKED,
    MAX_HEAD,
    UNTIL_CLOSE,
    ChunkedDecoder,
    InvalidRequestError,
    ProtocolError,
    encode_request,
    parse_head,
)

__all__ = [
    "InvalidRequestError",
    "RelayedResponse",
    "UpstreamClient",
    "UpstreamConnectionError",
    "UpstreamPayloadError",
    "UpstreamResponse",
]

#: Unread body bytes above which the connection stops reading (until the reader catches up).
HIGH_WATER = 256 * 1024


class UpstreamConnectionError(Exception):
    """No response: connecting failed (refused, DNS, TLS), the upstream closed the connection before
    or during the response head, or the head was not valid HTTP."""


class UpstreamPayloadError(UpstreamConnectionError):
    """The response body broke off or was malformed (EOF before its length or last chunk)."""


class _Stale(UpstreamConnectionError):
    """The connection closed before any byte of the response: on a reused one, the server had
    closed it while idle (the request is retried once on a new connection)."""


class BodyReader(Protocol):
    async def readany(self) -> bytes: ...
    def at_eof(self) -> bool: ...


class RelayedResponse(Protocol):
    """What the relay uses of an upstream response: aiohttp's ``ClientResponse`` or ``UpstreamResponse``."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...
    @property
    def content(self) -> BodyReader: ...
    def release(self) -> object: ...


# Connection states.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _CLOSED = range(7)


class UpstreamResponse:
    """A response whose head is in; its body arrives through ``content.readany()`` (``content`` is
    the response itself). ``release()`` gives the connection back, or closes it."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_error",
        "_keep_alive",
        "_paused",
        "_size",
        "_waiter",
        "content_length",
        "content_type",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content_type: str,
        content_length: int | None,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_type = content_type
        self.content_length = content_length
        self._conn: _Connection | None = conn
        self._keep_alive = keep_alive
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: UpstreamPayloadError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    @property
    def content(self) -> UpstreamResponse:
        """The body reader: the response itself (a property, not an attribute: no reference cycle)."""
        return self

    async def readany(self) -> bytes:
        """The body bytes buffered, waiting for some if none; ``b""`` at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            if self._conn is None:
                raise UpstreamPayloadError("the response was released")
            self._waiter = waiter = self._conn.loop.create_future()
            await waiter
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._paused:
            self._paused = False
            if self._conn is not None and not self._conn.dead:
                self._conn.transport.resume_reading()
        return data

    def ready(self) -> bool:
        """``readany`` would return at once (body bytes, the end or an error are in)."""
        return bool(self._chunks) or self._eof or self._error is not None

    def at_eof(self) -> bool:
        """The whole body is in and has been read (as aiohttp's ``StreamReader.at_eof``)."""
        return self._eof and not self._chunks and self._error is None

    @property
    def buffered(self) -> int:
        """Body bytes received and not read yet."""
        return sum(len(chunk) for chunk in self._chunks) if self._chunks else 0

    def release(self) -> None:
        """Back to the pool after a complete keep-alive response; else the connection is closed."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if self._eof and self._keep_alive and self._error is None and not conn.dead:
            conn.client._put(conn)
        else:
            conn.close()

    close = release

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _Origin:
    """One scheme, host and port: how to connect, its ``Host`` header, its idle connections."""

    __slots__ = ("host", "host_header", "idle", "name", "port", "ssl")

    def __init__(self, url: URL, ssl_context: ssl.SSLContext | None) -> None:
        if url.scheme not in ("http", "https") or not url.raw_host or url.port is None:
            raise InvalidRequestError(f"not an http(s) URL: {url}")
        self.host: str = url.raw_host
        self.port: int = url.port
        self.host_header = url.host_port_subcomponent or self.host
        self.ssl = ssl_context if url.scheme == "https" else None
        self.name = f"{url.scheme}://{self.host_header}"
        self.idle: list[_Connection] = []


class _Connection(asyncio.Protocol):
    """One connection: a request written, its response parsed as it arrives."""

    def __init__(self, client: UpstreamClient, origin: _Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # until connection_made
        self.state = _IDLE
        self.dead = False
        self.pooled = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None
        self._head_request = False
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._pending = bytearray()
        self._received = False
        self._remaining = 0
        self._decoder: ChunkedDecoder | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.client._open.add(self)

    def send(self, payload: bytes, head_request: bool) -> asyncio.Future[UpstreamResponse]:
        """Write one request; the future resolves once its response head is in."""
        self._head_waiter = waiter = self.loop.create_future()
        if self.dead:
            waiter.set_exception(_Stale("the connection closed before the request was sent"))
            return waiter
        self.state = _HEAD
        self._head_request = head_request
        self._received = False
        self.response = None
        self.transport.write(payload)
        return waiter

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _CHUNKED:
            response = self.response
            decoder = self._decoder
            assert response is not None and decoder is not None
            try:
                added = decoder.feed(data, response._chunks)
            except ProtocolError as error:
                self._fail_body(f"malformed chunked body: {error}")
                return
            if decoder.done:
                if decoder.extra:
                    self.dead = True
                self._finish(response)
            elif added:
                self._buffered(response, added)
        elif state == _LENGTH:
            response = self.response
            assert response is not None
            size = len(data)
            remaining = self._remaining - size
            if remaining > 0:
                self._remaining = remaining
                response._chunks.append(data)
                self._buffered(response, size)
                return
            if remaining < 0:  # more than the Content-Length: never reuse the connection
                self.dead = True
                data = data[: self._remaining]
            self._remaining = 0
            response._chunks.append(data)
            self._finish(response)
        elif state == _HEAD:
            self._head_data(data)
        elif state == _UNTIL_CLOSE:
            response = self.response
            assert response is not None
            response._chunks.append(data)
            self._buffered(response, len(data))
        else:  # bytes nobody asked for
            self.close()

    def _head_data(self, data: bytes) -> None:
        self._received = True
        pending = self._pending
        if pending:  # a head in pieces: gathered in place, each byte searched about once
            searched = len(pending) - 3
            pending += data
            if pending.find(b"\r\n\r\n", searched if searched > 0 else 0) < 0:
                if len(pending) > MAX_HEAD:
                    self._fail_head("the response head is larger than 64 KiB")
                return
            data = bytes(pending)
            self._pending = bytearray()
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if end > MAX_HEAD or len(data) > MAX_HEAD:
                    self._fail_head("the response head is larger than 64 KiB")
                else:
                    self._pending = bytearray(data)
                return
            try:
                status, reason, headers, ctype, length, framing, keep_alive = parse_head(
                    data[:end], self._head_request
                )
            except ProtocolError as error:
                self._fail_head(f"malformed response: {error}")
                return
            data = data[end + 4 :]
            if status >= 200:
                break
            if status == 101:
                self._fail_head("the upstream switched protocols")
                return
        response = self.response = UpstreamResponse(self, status, reason, headers, ctype, length, keep_alive)
        if framing == 0:
            response._eof = True
            self.state = _DONE
            if data:
                self.dead = True
        else:
            if framing == CHUNKED:
                self.state = _CHUNKED
                self._decoder = ChunkedDecoder()
            elif framing == UNTIL_CLOSE:
                self.state = _UNTIL_CLOSE
            else:
                self.state = _LENGTH
                self._remaining = framing
            if data:
                self.data_received(data)
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _buffered(self, response: UpstreamResponse, size: int) -> None:
        """``size`` more body bytes are in ``response._chunks``: wake its reader, pause if it lags."""
        response._size += size
        waiter = response._waiter
        if waiter is not None:
            response._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if response._size > HIGH_WATER and not response._paused:
            response._paused = True
            self.transport.pause_reading()

    def _finish(self, response: UpstreamResponse) -> None:
        """The body is complete."""
        self.state = _DONE
        self._decoder = None
        response._eof = True
        waiter = response._waiter
        if waiter is not None:
            response._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if response._paused:
            response._paused = False
            if not self.dead:
                self.transport.resume_reading()

    def _fail_head(self, message: str) -> None:
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamConnectionError(message))
        self.close()

    def _fail_body(self, message: str) -> None:
        response = self.response
        if response is not None and not response._eof and response._error is None:
            response._error = UpstreamPayloadError(message)
            response._wake()
        self.close()

    def eof_received(self) -> None:
        self._closed("the upstream closed the connection", True)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._closed("the upstream closed the connection", True)
        else:
            self._closed(f"the upstream connection broke: {type(exc).__name__}: {exc}", False)
        self.client._open.discard(self)
        if self.pooled:
            self.pooled = False
            self.origin.idle.remove(self)

    def _closed(self, why: str, clean: bool) -> None:
        """The connection closed (``clean``: an orderly close by the upstream): fail whatever still
        waits on it; a body read until close ends here."""
        self.dead = True
        state, self.state = self.state, _CLOSED
        if state == _HEAD:
            waiter = self._head_waiter
            self._head_waiter = None
            if waiter is not None and not waiter.done():
                stale = not self._received
                error = (
                    _Stale(f"{why} before answering") if stale else UpstreamConnectionError(f"{why} mid-head")
                )
                waiter.set_exception(error)
        elif state == _UNTIL_CLOSE and clean and self.response is not None:
            self._finish(self.response)
        elif state in (_LENGTH, _CHUNKED, _UNTIL_CLOSE):
            self._fail_body(f"{why} mid-body")

    def close(self) -> None:
        """Close the connection (never reused); whatever still waits on it fails."""
        if self.state != _CLOSED:
            self._closed("the connection was closed", False)
        self.transport.close()


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to upstreams, pooled per origin."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, idle_timeout: float = 30.0) -> None:
        self._ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self._origins: dict[tuple[str, str], _Origin] = {}  # by (scheme, authority), as spelled
        self._pools: list[_Origin] = []  # each origin once
        self._open: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: str | URL,
        headers: CIMultiDict[str],
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; returns once the response head is in (read the body, then ``release``).

        Raises ``InvalidRequestError`` (a ``ValueError``) before writing anything when the request
        cannot be written safely, ``UpstreamConnectionError`` when no response head arrives.
        Cancelled at any point, the connection is closed (never reused half-way). A reused connection
        that closes before any byte of the response (the server closed it while idle, and nothing was
        answered) is retried once on a new connection.
        """
        if self._closed:
            raise UpstreamConnectionError("the upstream client is closed")
        text = url if isinstance(url, str) else str(url)
        scheme, _, rest = text.partition("://")
        authority, slash, path = rest.partition("/")
        origin = self._origins.get((scheme, authority))
        if origin is None:
            origin, target = self._origin_of(text, (scheme, authority))
        else:
            target = slash + path if slash else "/"
            if "#" in target:
                target = target.partition("#")[0]
        payload = encode_request(method, target, origin.host_header, headers, body)
        head_request = method == "HEAD"
        conn: _Connection | None = None
        idle = origin.idle
        while idle:
            candidate = idle.pop()
            candidate.pooled = False
            if not candidate.dead and not candidate.transport.is_closing():
                conn = candidate
                break
            candidate.close()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(origin)
            try:
                return await conn.send(payload, head_request)
            except _Stale:
                conn.close()
                if not reused:
                    raise
                reused, conn = False, None
            except BaseException:  # cancelled (the caller's timeout) or failed: never reused
                conn.close()
                raise

    def _origin_of(self, url: str, key: tuple[str, str]) -> tuple[_Origin, str]:
        """The origin of ``url`` (created on first use, found again by ``key``) and its target."""
        parsed = URL(url, encoded=True)
        origin_key = (parsed.scheme, parsed.raw_authority)
        origin = self._origins.get(origin_key)
        if origin is None:
            context = self._ssl_context
            if parsed.scheme == "https" and context is None:
                context = self._ssl_context = ssl.create_default_context()
            origin = self._origins[origin_key] = _Origin(parsed, context)
            self._pools.append(origin)
        if not any(c in key[1] for c in "?#@") and len(self._origins) < 1024:
            self._origins[key] = origin  # the URL's own spelling: found without parsing next time
        return origin, parsed.raw_path_qs

    async def _connect(self, origin: _Origin) -> _Connection:
        if self._closed:
            raise UpstreamConnectionError("the upstream client is closed")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self, origin, loop),
                origin.host,
                origin.port,
                ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl is not None else None,
            )
        except OSError as error:
            if isinstance(error, TimeoutError) and error.errno is None:
                raise  # asyncio's own timeout, not the OS's
            detail = str(error) or type(error).__name__
            raise UpstreamConnectionError(f"cannot connect to {origin.name}: {detail}") from None
        if self._closed:
            conn.close()
            raise UpstreamConnectionError("the upstream client is closed")
        return conn

    def _put(self, conn: _Connection) -> None:
        """An idle connection back into its pool."""
        if self._closed:
            conn.close()
            return
        conn.state = _IDLE
        conn.response = None
        conn.pooled = True
        conn.idle_since = time.monotonic()
        conn.origin.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``; again when the next one would be."""
        self._sweeper = None
        now = time.monotonic()
        expired = now - self.idle_timeout
        oldest: float | None = None
        for origin in self._pools:
            idle = origin.idle
            while idle and idle[0].idle_since <= expired:  # oldest first: LIFO reuse keeps them in order
                conn = idle.pop(0)
                conn.pooled = False
                conn.close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(oldest + self.idle_timeout - now, self._sweep)

    def idle_count(self) -> int:
        """Idle pooled connections (all origins)."""
        return sum(len(origin.idle) for origin in self._pools)

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection, idle or in use; later requests fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._pools:
            for conn in origin.idle:
                conn.pooled = False
            origin.idle.clear()
        for conn in list(self._open):
            conn.close()
