"""How the relay's bytes leave: few sends, and never a stream held back.

An in-process sidecar in front of a raw upstream server that writes whole responses byte-exact: the
writes on the sidecar's client connection are counted (each ``transport.write`` is one ``send(2)``
when the socket is writable, so on loopback each costs the receiver's work too).

- a stream whose body is all in when its head arrives leaves as one write (head, events, end);
- a stream whose events come later opens at once: the client has the head before the first event;
- the last bytes of a body leave with its end (no write of its own for the final empty chunk).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from llmroute_sidecar.api.manifest import load_route
from llmroute_sidecar.app import Sidecar
from llmroute_sidecar.config import HostPort, Settings

EVENTS = [
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{}}],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n',
    b"data: [DONE]\n\n",
]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event], Any]


async def whole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, go: asyncio.Event) -> None:
    """The whole response in one write."""
    writer.write(HEAD + b"".join(chunk(event) for event in EVENTS) + b"0\r\n\r\n")


async def later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, go: asyncio.Event) -> None:
    """The head at once, the events when the test says so."""
    writer.write(HEAD)
    await writer.drain()
    await go.wait()
    writer.write(b"".join(chunk(event) for event in EVENTS) + b"0\r\n\r\n")


@asynccontextmanager
async def upstream(script: Script, go: asyncio.Event) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                await script(reader, writer, go)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def sidecar(tmp_path: Path, upstream_port: int) -> AsyncIterator[Sidecar]:
    route = tmp_path / "route.json"
    route.write_text(
        json.dumps(
            {
                "apiVersion": "llmroute.dev/v1alpha1",
                "kind": "LLMRoute",
                "metadata": {"name": "writes", "namespace": "t"},
                "spec": {
                    "selector": {"matchLabels": {"app": "t"}},
                    "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "retries": 0},
                    "limits": [{"name": "r", "key": "route", "requestsPerMinute": 1000}],
                },
            }
        )
    )
    here = HostPort("127.0.0.1", 0)
    settings = Settings(route, here, here, store="memory", secrets_dir=tmp_path, heartbeat_seconds=3600)
    running = Sidecar(settings, load_route(route))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


class Writes:
    """Counts ``write`` calls on the transports whose local port is ``port``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, port: int) -> None:
        self.count = 0
        from asyncio import selector_events

        original = selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]
        counter = self

        def write(transport: Any, data: Any) -> None:
            if transport.get_extra_info("sockname")[1] == port:
                counter.count += 1
            original(transport, data)

        monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", write)  # type: ignore[attr-defined]


async def open_request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    return reader, writer


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += data[:-2]


async def test_a_stream_all_in_at_its_head_leaves_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = asyncio.Event()
    async with upstream(whole, go) as port, sidecar(tmp_path, port) as running:
        assert running.traffic_address is not None
        writes = Writes(monkeypatch, running.traffic_address.port)
        reader, writer = await open_request(running.traffic_address.port)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(read_chunked(reader), 10) == b"".join(EVENTS)
        writer.close()
        assert writes.count == 1


async def test_a_stream_opens_before_its_first_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    go = asyncio.Event()
    async with upstream(later, go) as port, sidecar(tmp_path, port) as running:
        assert running.traffic_address is not None
        writes = Writes(monkeypatch, running.traffic_address.port)
        reader, writer = await open_request(running.traffic_address.port)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # before any event exists
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        go.set()
        assert await asyncio.wait_for(read_chunked(reader), 10) == b"".join(EVENTS)
        writer.close()
        assert writes.count == 2  # the head, then the events with the end of the body
