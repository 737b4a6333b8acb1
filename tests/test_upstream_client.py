"""The lean upstream client (upstream_client, upstream_http) against real loopback servers.

An aiohttp server for ordinary responses, a raw ``asyncio.start_server`` for byte-exact ones (and
broken ones). Every wait is bounded; nothing is synchronised by sleeping.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from llmroute_operator import certs
from llmroute_sidecar.health import HealthState
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.upstream import Upstream, UpstreamAttemptError
from llmroute_sidecar.upstream_client import (
    HIGH_WATER,
    InvalidRequestError,
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamPayloadError,
    UpstreamResponse,
)
from llmroute_sidecar.upstream_http import (
    CHUNKED,
    UNTIL_CLOSE,
    ChunkedDecoder,
    ProtocolError,
    encode_request,
    parse_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
WAIT = 10.0


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (Content-Length framed); b"", b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b"", b""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


class RawServer:
    """A loopback server answering with a handler per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()  # handlers still waiting: they end quietly (see _serve)
        await asyncio.gather(*self._tasks)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler returns: asyncio 3.11 logs an error for a cancelled one
        finally:
            writer.close()
            self._tasks.discard(task)


def answer_each(*responses: bytes) -> Handler:
    """A handler answering each request of a connection with the next response (then closing)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            head, _ = await read_request(reader)
            if not head:
                return
            writer.write(response)
            await writer.drain()

    return handler


def keep_answering(response: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if not head:
                return
            writer.write(response)
            await writer.drain()

    return handler


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    lean = UpstreamClient()
    try:
        yield lean
    finally:
        await lean.close()


async def get(
    client: UpstreamClient, url: str, method: str = "GET", body: bytes | None = None
) -> tuple[UpstreamResponse, bytes]:
    """A whole response: the response (released) and its body."""
    async with asyncio.timeout(WAIT):
        response = await client.request(method, url, CIMultiDict(), body)
        try:
            return response, await read_all(response)
        finally:
            response.release()


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.content.readany():
        parts.append(chunk)
    return b"".join(parts)


def lost(client: UpstreamClient) -> asyncio.Future[None]:
    """Resolves when the (only) idle pooled connection is closed."""
    (origin,) = client._pools
    (conn,) = origin.idle
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    original = conn.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        original(exc)
        done.set_result(None)

    conn.connection_lost = connection_lost  # type: ignore[method-assign]
    return done


# -- the pure part ------------------------------------------------------------------------------


def test_request_bytes_keep_the_callers_headers_in_order() -> None:
    headers = CIMultiDict([("B", "2"), ("a", "1"), ("B", "3")])
    payload = encode_request("POST", "/v1/x?y=1", "up:8080", headers, b'{"k": 1}')
    assert payload == (
        b"POST /v1/x?y=1 HTTP/1.1\r\nB: 2\r\na: 1\r\nB: 3\r\nHost: up:8080\r\n"
        b'Content-Length: 8\r\n\r\n{"k": 1}'
    )
    assert encode_request("POST", "/", "up", CIMultiDict(), None).endswith(b"Content-Length: 0\r\n\r\n")
    assert b"Content-Length" not in encode_request("GET", "/", "up", CIMultiDict(), None)
    framing = CIMultiDict([("Content-Length", "99"), ("Transfer-Encoding", "chunked"), ("Host", "h")])
    assert encode_request("PUT", "/", "up", framing, b"ab") == (
        b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab"
    )


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/", [("X", "a\r\nInjected: 1")]),
        ("GET", "/", [("X", "a\nb")]),
        ("GET", "/", [("X", "a\rb")]),
        ("GET", "/", [("X\r\nY", "a")]),
        ("GET", "/ HTTP/1.1\r\nX: y", []),
        ("GET", "/a b", []),
        ("GET /", "/", []),
    ],
)
def test_request_smuggling_vectors_are_refused(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(InvalidRequestError):
        encode_request(method, target, "up", CIMultiDict(headers), None)


def test_head_parsing() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nX-A: 1\r\nx-a:  2 \r\n"
    status, reason, headers, ctype, length, framing, keep_alive = parse_head(
        head + b"Content-Length: 5", False
    )
    assert (status, reason, ctype, length, framing, keep_alive) == (
        200,
        "OK",
        "text/event-stream",
        5,
        5,
        True,
    )
    assert headers.getall("X-A") == ["1", "2"]
    _, reason, _, ctype, length, framing, keep_alive = parse_head(b"HTTP/1.0 204", False)
    assert (reason, ctype, length, framing, keep_alive) == ("", "application/octet-stream", None, 0, False)
    assert parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0", False)[6] is True
    assert parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0", False)[6] is False
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False)[5] == CHUNKED
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", True)[5] == 0  # HEAD
    assert parse_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", False)[4:6] == (9, 0)
    assert parse_head(b"HTTP/1.1 200 OK", False)[5:] == (UNTIL_CLOSE, False)
    assert parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", False)[5:] == (UNTIL_CLOSE, False)
    both = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked", False)
    assert both[5:] == (CHUNKED, False)  # chunked wins; the connection is never reused
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3", False)[5] == 3


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 \xd9\xa2\xd9\xa0\xd9\xa0 OK",  # Arabic-Indic digits
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\r\nNo colon here",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",
        b"HTTP/1.1 200 OK\r\nX-A : 1",
        b"HTTP/1.1 200 OK\r\n: 1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4",
        b"HTTP/1.1 200 OK\r\nContent-Length: +3",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10",
    ],
)
def test_malformed_heads_are_protocol_errors(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(head, False)


def test_chunked_decoding_byte_by_byte() -> None:
    wire = b"5;ext=1\r\nhello\r\n1A \r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n"
    for step in (1, 2, 3, 7, len(wire)):
        decoder, out, total = ChunkedDecoder(), list[bytes](), 0
        for start in range(0, len(wire), step):
            total += decoder.feed(wire[start : start + step], out)
        assert decoder.done and not decoder.extra
        assert b"".join(out) == b"hello" + b"x" * 26 and total == 31


@pytest.mark.parametrize(
    "wire",
    [b"g\r\n", b"\r\n", b"0x5\r\nhello\r\n", b"-1\r\n", b"5\r\nhelloXX\r\n", b"+5\r\n", b"5" * 9000],
)
def test_malformed_chunks_are_protocol_errors(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(wire, [])


# -- against servers ----------------------------------------------------------------------------


@pytest.fixture
async def web_server() -> AsyncIterator[tuple[str, set[object]]]:
    """An aiohttp server: its URL and the set of transports (connections) that sent requests."""
    transports: set[object] = set()

    async def echo(request: web.Request) -> web.Response:
        transports.add(request.transport)
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "body": body.decode(),
                "headers": dict(request.headers),
            }
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        transports.add(request.transport)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(5):
            await response.write(b"data: %d\n\n" % index)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", transports
    finally:
        await runner.cleanup()


async def test_json_response_with_content_length(
    client: UpstreamClient, web_server: tuple[str, set[object]]
) -> None:
    url, _ = web_server
    headers = CIMultiDict([("X-One", "1"), ("Authorization", "Bearer k")])
    async with asyncio.timeout(WAIT):
        response = await client.request("POST", f"{url}/echo?q=1", headers, b'{"a": 1}')
        body = await read_all(response)
        response.release()
    assert response.status == 200 and response.reason == "OK"
    assert response.content_type == "application/json"
    assert response.content_length == len(body)
    echoed = json.loads(body)
    assert echoed["method"] == "POST" and echoed["path"] == "/echo?q=1" and echoed["body"] == '{"a": 1}'
    assert echoed["headers"]["X-One"] == "1" and echoed["headers"]["Authorization"] == "Bearer k"
    assert echoed["headers"]["Host"] == url.removeprefix("http://")
    assert client.idle_count() == 1


async def test_twenty_sequential_requests_share_one_connection(
    client: UpstreamClient, web_server: tuple[str, set[object]]
) -> None:
    url, transports = web_server
    for index in range(20):
        response, _ = await get(client, f"{url}/echo" if index % 2 else f"{url}/stream")
        assert response.status == 200
    assert len(transports) == 1
    assert client.idle_count() == 1


async def test_concurrent_requests_open_connections_that_all_return_to_the_pool(
    client: UpstreamClient, web_server: tuple[str, set[object]]
) -> None:
    url, transports = web_server
    results = await asyncio.gather(*(get(client, f"{url}/echo") for _ in range(5)))
    assert all(response.status == 200 for response, _ in results)
    assert client.idle_count() == len(transports) >= 2


async def test_sse_arrives_event_by_event() -> None:
    next_event = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for index in range(3):
            event = b"data: %d\n\n" % index
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await next_event.wait()  # the client has read this event: the response is not over
            next_event.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server, UpstreamClient() as client:
        async with asyncio.timeout(WAIT):
            response = await client.request("GET", server.url + "/", CIMultiDict(), None)
            assert response.content_type == "text/event-stream"
            for index in range(3):
                assert await response.content.readany() == b"data: %d\n\n" % index
                next_event.set()
            assert await response.content.readany() == b""
            response.release()
        assert client.idle_count() == 1


async def test_chunked_with_extensions_trailers_and_split_chunks(client: UpstreamClient) -> None:
    pieces = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=val",
        b"ue\r\nhel",
        b"lo\r\n6\r",
        b"\n world\r\n0\r\nX-Trailer: 1\r\n",
        b"\r\n",
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await read_request(reader))[0]:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()

    async with RawServer(handler) as server:
        for _ in range(2):
            response, body = await get(client, server.url + "/")
            assert body == b"hello world" and response.content_length is None
        assert server.connections == 1


async def test_a_response_trickled_byte_by_byte(client: UpstreamClient) -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n0\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await read_request(reader))[0]:
            for index in range(len(wire)):
                writer.write(wire[index : index + 1])
                await writer.drain()

    async with RawServer(handler) as server:
        for _ in range(2):
            response, body = await get(client, server.url + "/")
            assert (response.headers["X-A"], body) == ("1", b"abc")
        assert server.connections == 1


async def test_a_cancelled_read_leaves_the_body_readable(client: UpstreamClient) -> None:
    """The relay's watchdog cancels a pending ``readany`` (a heartbeat is due); reading goes on."""
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        await go_on.wait()
        writer.write(b"after")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server:
        async with asyncio.timeout(WAIT):
            response = await client.request("GET", server.url + "/", CIMultiDict(), None)
            assert await response.content.readany() == b"first"
            read = asyncio.create_task(response.content.readany())
            await asyncio.sleep(0)  # one loop turn: the read starts waiting
            assert response._waiter is not None
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            go_on.set()
            assert await read_all(response) == b"after"
            response.release()
        assert client.idle_count() == 1


async def test_read_until_close(client: UpstreamClient) -> None:
    async with RawServer(
        answer_each(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
    ) as server:
        response, body = await get(client, server.url + "/")
        assert body == b"all of it" and response.content_type == "text/plain"
        assert client.idle_count() == 0


async def test_head_and_204_have_no_body_and_keep_the_connection(client: UpstreamClient) -> None:
    handler = answer_each(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: application/json\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    async with RawServer(handler) as server:
        response, body = await get(client, server.url + "/", "HEAD")
        assert (response.status, body, response.content_length) == (200, b"", 1000)
        response, body = await get(client, server.url + "/", "DELETE")
        assert (response.status, body) == (204, b"")
        response, body = await get(client, server.url + "/")
        assert body == b"ok"
        assert server.connections == 1


async def test_interim_responses_are_skipped(client: UpstreamClient) -> None:
    handler = answer_each(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
    )
    async with RawServer(handler) as server:
        response, body = await get(client, server.url + "/", "POST", b"x")
        assert (response.status, body) == (201, b"done")
        assert "Link" not in response.headers


async def test_connection_close_is_not_reused(client: UpstreamClient) -> None:
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(keep_answering(response)) as server:
        for _ in range(3):
            assert (await get(client, server.url + "/"))[1] == b"ok"
        assert server.connections == 3
        assert client.idle_count() == 0


async def test_http10_without_keep_alive_is_not_reused(client: UpstreamClient) -> None:
    async with RawServer(keep_answering(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server:
        for _ in range(2):
            assert (await get(client, server.url + "/"))[1] == b"ok"
        assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_never_used(client: UpstreamClient) -> None:
    async with RawServer(answer_each(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server:
        assert (await get(client, server.url + "/"))[1] == b"ok"
        async with asyncio.timeout(WAIT):
            await lost(client)  # the server closed it after one response
        assert client.idle_count() == 0
        assert (await get(client, server.url + "/"))[1] == b"ok"
        assert server.connections == 2


async def test_a_reused_connection_closed_before_answering_is_retried_once(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:  # the keep-alive race: closes right after the 2nd request arrives
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
            await read_request(reader)
            return
        await keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")(reader, writer)

    async with RawServer(handler) as server:
        assert (await get(client, server.url + "/"))[1] == b"first"
        assert (await get(client, server.url + "/", "POST", b"{}"))[1] == b"second"
        assert server.connections == 2


async def test_a_new_connection_closed_before_answering_is_not_retried(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with RawServer(handler) as server:
        with pytest.raises(UpstreamConnectionError, match="before answering"):
            await get(client, server.url + "/")
        assert server.connections == 1


async def test_connection_refused(client: UpstreamClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamConnectionError, match="cannot connect"):
        await get(client, f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nonly\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nonly\r\nzz\r\n",
    ],
)
async def test_a_body_cut_short_is_a_payload_error(client: UpstreamClient, wire: bytes) -> None:
    async with RawServer(answer_each(wire)) as server:
        async with asyncio.timeout(WAIT):
            response = await client.request("GET", server.url + "/", CIMultiDict(), None)
            with pytest.raises(UpstreamPayloadError):
                while await response.content.readany():
                    pass
            response.release()
        assert client.idle_count() == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tfolded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Len",  # then closed mid-head
    ],
)
async def test_malformed_or_cut_heads_are_connection_errors(client: UpstreamClient, wire: bytes) -> None:
    async with RawServer(answer_each(wire)) as server:
        with pytest.raises(UpstreamConnectionError) as caught:
            await get(client, server.url + "/")
        assert not isinstance(caught.value, UpstreamPayloadError)
        assert server.connections == 1  # not retried: the upstream did answer something


async def test_crlf_in_a_header_is_refused_before_anything_is_written(client: UpstreamClient) -> None:
    async with RawServer(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as server:
        with pytest.raises(InvalidRequestError):
            await client.request("GET", server.url + "/", CIMultiDict([("X", "a\r\nEvil: 1")]), None)
        assert (await get(client, server.url + "/"))[0].status == 200
        assert server.connections == 1 and client.idle_count() == 1


async def test_cancelled_while_awaiting_the_head_closes_the_connection(client: UpstreamClient) -> None:
    arrived, closed = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if server.connections == 1:
            await read_request(reader)
            arrived.set()
            assert await reader.read() == b""  # the client closed the connection
            closed.set()
            return
        await keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(reader, writer)

    async with RawServer(handler) as server:
        task = asyncio.create_task(client.request("GET", server.url + "/", CIMultiDict(), None))
        async with asyncio.timeout(WAIT):
            await arrived.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await closed.wait()
        assert client.idle_count() == 0
        assert (await get(client, server.url + "/"))[1] == b"ok"
        assert server.connections == 2


async def test_an_unread_body_closes_the_connection_on_release(client: UpstreamClient) -> None:
    response_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"  # the body never comes
    async with RawServer(keep_answering(response_bytes)) as server:
        async with asyncio.timeout(WAIT):
            response = await client.request("GET", server.url + "/", CIMultiDict(), None)
        response.release()
        response.release()  # idempotent
        assert client.idle_count() == 0


async def test_slow_reader_pauses_and_resumes_reading(client: UpstreamClient) -> None:
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload)
    async with RawServer(keep_answering(head + payload)) as server:
        async with asyncio.timeout(WAIT):
            response = await client.request("GET", server.url + "/", CIMultiDict(), None)
            (conn,) = client._open
            paused, resumed = asyncio.Event(), asyncio.Event()
            pause, resume = conn.transport.pause_reading, conn.transport.resume_reading

            def pause_reading() -> None:
                paused.set()
                pause()

            def resume_reading() -> None:
                resumed.set()
                resume()

            conn.transport.pause_reading = pause_reading  # type: ignore[method-assign]
            conn.transport.resume_reading = resume_reading  # type: ignore[method-assign]
            await paused.wait()  # nobody reads: the connection stops reading past the high-water mark
            assert HIGH_WATER < response._size < HIGH_WATER + 1024 * 1024
            parts = []
            while chunk := await response.content.readany():
                parts.append(chunk)
                assert len(chunk) < 2 * 1024 * 1024
            response.release()
        assert resumed.is_set()
        assert b"".join(parts) == payload
        assert client.idle_count() == 1


async def test_idle_connections_close_after_the_idle_timeout() -> None:
    async with RawServer(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as server:
        async with UpstreamClient(idle_timeout=0.05) as client:
            await get(client, server.url + "/")
            async with asyncio.timeout(WAIT):
                await lost(client)
            assert client.idle_count() == 0 and client._sweeper is None


async def test_close_fails_requests_in_flight_and_later_ones() -> None:
    arrived = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()

    async with RawServer(handler) as server:
        client = UpstreamClient()
        task = asyncio.create_task(client.request("GET", server.url + "/", CIMultiDict(), None))
        async with asyncio.timeout(WAIT):
            await arrived.wait()
            await client.close()
            with pytest.raises(UpstreamConnectionError):
                await task
        with pytest.raises(UpstreamConnectionError):
            await client.request("GET", server.url + "/", CIMultiDict(), None)


# -- wired into the sidecar's upstream attempts -----------------------------------------------


async def test_attempts_use_the_lean_client_unless_the_body_is_streamed(
    web_server: tuple[str, set[object]],
) -> None:
    url, _ = web_server
    upstream = Upstream(SidecarMetrics(), HealthState())
    await upstream.start()

    async def streamed() -> AsyncIterator[bytes]:
        yield b'{"a": '
        yield b"1}"

    try:
        for body in (b'{"a": 1}', None):
            response = await upstream._attempt("POST", f"{url}/echo", CIMultiDict(), body, 5.0)
            assert isinstance(response, UpstreamResponse) and response.status == 200
            await read_all(response)
            response.release()
        response_other = await upstream._attempt("POST", f"{url}/echo", CIMultiDict(), streamed(), 5.0)
        assert not isinstance(response_other, UpstreamResponse)
        assert isinstance(response_other, aiohttp.ClientResponse)
        assert json.loads(await response_other.read())["body"] == '{"a": 1}'
        response_other.release()
    finally:
        await upstream.close()


async def test_attempt_errors_of_the_lean_client_are_mapped() -> None:
    upstream = Upstream(SidecarMetrics(), HealthState())
    await upstream.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/"

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    try:
        async with RawServer(silent) as server:
            with pytest.raises(UpstreamAttemptError) as caught:
                await upstream._attempt("POST", refused, CIMultiDict(), b"{}", 5.0)
            assert caught.value.kind == "connect_error"
            with pytest.raises(UpstreamAttemptError) as caught:
                await upstream._attempt("GET", server.url + "/", CIMultiDict([("X", "a\nb")]), None, 5.0)
            assert caught.value.kind == "connect_error"
            with pytest.raises(UpstreamAttemptError) as caught:
                await upstream._attempt("GET", server.url + "/", CIMultiDict(), None, 0.1)
            assert caught.value.kind == "timeout"
    finally:
        await upstream.close()


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = certs.new_ca(now, datetime.timedelta(days=1))
    cert, key = certs.issue(ca, ca_key, ["localhost", "127.0.0.1"], now, datetime.timedelta(days=1))
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(certs.cert_pem(ca))
    paths[1].write_bytes(certs.cert_pem(cert))
    paths[2].write_bytes(key)
    return paths


async def test_https_with_a_trusted_private_ca(tls_files: tuple[Path, Path, Path]) -> None:
    ca, cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    response_bytes = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    server = RawServer(keep_answering(response_bytes))
    tls_server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_context)
    port = tls_server.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(ca))
        async with UpstreamClient(ssl_context=trusting) as client:
            for host in ("localhost", "127.0.0.1", "localhost"):
                response, body = await get(client, f"https://{host}:{port}/v1/x")
                assert (response.status, body) == (200, b"{}")
            assert server.connections == 2  # one per origin, reused
        async with UpstreamClient() as default_trust:
            with pytest.raises(UpstreamConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await get(default_trust, f"https://localhost:{port}/")
    finally:
        tls_server.close()


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_chunked_decoding_any_split(chunks: list[bytes], cuts: list[int]) -> None:
    """Whatever the chunks (CR and LF inside them too) and wherever the reads split the wire, the
    body comes out whole and the end is seen exactly at the last chunk."""
    wire = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    points = sorted({min(cut, len(wire)) for cut in cuts} | {0, len(wire)})
    decoder, out, total = ChunkedDecoder(), list[bytes](), 0
    for start, stop in itertools.pairwise(points):
        total += decoder.feed(wire[start:stop], out)
    assert decoder.done and not decoder.extra
    assert b"".join(out) == b"".join(chunks) and total == sum(map(len, chunks))
