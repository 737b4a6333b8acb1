"""The relay's read watchdog: heartbeats on a silent SSE stream, the idle timeout, other cancellations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from llmroute_sidecar import errors
from llmroute_sidecar.config import HostPort, Settings
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.openai.sse import heartbeat
from llmroute_sidecar.relay import Relay


class Content:
    """An upstream body: chunks put on a queue, b"" for its end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def readany(self) -> bytes:
        return await self.queue.get()


class Upstream:
    def __init__(self) -> None:
        self.content = Content()


class Response:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)


def relay(beat: float) -> Relay:
    here = HostPort("127.0.0.1", 0)
    settings = Settings(Path("route.json"), here, here, heartbeat_seconds=beat)
    return Relay(settings, SidecarMetrics(CollectorRegistry()))


async def collect(beat: float, timeout: float, script: list[tuple[float, bytes]], is_sse: bool = True) -> Any:
    upstream, response = Upstream(), Response()

    async def feed() -> None:
        for pause, chunk in script:
            await asyncio.sleep(pause)
            upstream.content.queue.put_nowait(chunk)

    feeder = asyncio.create_task(feed())
    got: list[bytes] = []
    try:
        chunks = relay(beat)._chunks(
            cast(aiohttp.ClientResponse, upstream),
            cast(web.StreamResponse, response),
            timeout,
            None,
            is_sse,
        )
        async for chunk in chunks:
            got.append(chunk)
    finally:
        feeder.cancel()
    return got, response.written


async def test_chunks_pass_and_heartbeats_fill_the_silences() -> None:
    got, written = await collect(0.05, 5, [(0, b"a"), (0.18, b"b"), (0.01, b"c"), (0, b"")])
    assert got == [b"a", b"b", b"c"]
    assert 2 <= written.count(heartbeat()) <= 4 and set(written) == {heartbeat()}


async def test_a_flowing_stream_gets_no_heartbeat() -> None:
    got, written = await collect(0.2, 5, [(0.02, b"x")] * 15 + [(0, b"")])
    assert got == [b"x"] * 15 and written == []


async def test_silence_past_the_timeout_ends_the_stream_whatever_the_heartbeats() -> None:
    with pytest.raises(errors.ProxyError) as raised:
        await collect(0.05, 0.3, [(0, b"a"), (5, b"")])
    assert raised.value.code == "upstream_timeout"


async def test_a_json_body_gets_the_timeout_and_no_heartbeat() -> None:
    with pytest.raises(errors.ProxyError):
        await collect(0.05, 0.2, [(0, b"{"), (5, b"")], is_sse=False)
    got, written = await collect(0.05, 1, [(0, b"{"), (0.15, b"}"), (0, b"")], is_sse=False)
    assert got == [b"{", b"}"] and written == []


async def test_an_outer_cancellation_is_not_swallowed() -> None:
    with pytest.raises(TimeoutError):  # the request's deadline, heartbeats or not
        async with asyncio.timeout(0.12):
            await collect(0.03, 5, [(0, b"a"), (5, b"")])
    with pytest.raises(TimeoutError):  # the deadline and the watchdog in the same turn
        async with asyncio.timeout(0.05):
            await collect(0.05, 5, [(0, b"a"), (5, b"")])
