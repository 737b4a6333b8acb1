"""A client sees what it would see without the sidecar: real sidecar processes, real upstreams.

Usage the sidecar asked for is stripped whatever its shape; completed streams are ``ok`` even when the
client closes right after the terminal event (as the openai SDK does); never-fitting requests get a
non-retryable 400; rate-limit headers (OpenAI's and IETF's) are sent on success and on 429 and agree.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, start
from tests.test_sidecar_proxy import CHAT, chat_body, write_route

HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
DONE = b"data: [DONE]\n\n"


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def content(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {"content": text} if not finish else {}
    return {**HEAD, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


class Upstream:
    """An upstream inside the test sending exact SSE bytes; ``trailer`` keeps writing after them."""

    def __init__(self, events: list[bytes], trailer: bool = False, cut: bool = False) -> None:
        self.events = events
        self.trailer = trailer
        self.cut = cut
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for raw in self.events:
            await response.write(raw)
        if self.cut:  # the connection breaks: no terminating chunk
            assert request.transport is not None
            request.transport.close()
            return response
        deadline = asyncio.get_running_loop().time() + 5
        while self.trailer and asyncio.get_running_loop().time() < deadline:
            # Comments after [DONE] until the sidecar lets go: each is a write to a client that left.
            try:
                await response.write(b": trailing\n\n")
            except ConnectionResetError:
                return response
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_post(CHAT, self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def without_usage(raw: bytes) -> bytes:
    document = json.loads(raw.removeprefix(b"data: "))
    document.pop("usage", None)
    return event(document)


# -- usage the client did not ask for ------------------------------------------------------------

SHAPES = {
    # OpenAI: "usage": null on every chunk, then a choices: [] usage chunk
    "openai": [
        event(content("Hello", usage=None)),
        event(content(" world", usage=None)),
        event(content("", "stop", usage=None)),
        event({**HEAD, "choices": [], "usage": USAGE}),
    ],
    # LiteLLM: no usage key on content chunks; the usage chunk has an empty-delta choice
    "litellm": [
        event(content("Hello")),
        event(content(" world")),
        event(content("", "stop")),
        event({**HEAD, "choices": [{"index": 0, "delta": {}}], "usage": USAGE}),
    ],
    # usage on the finish chunk itself: the chunk stays, without usage
    "final": [event(content("Hello")), event(content(" world")), event(content("", "stop", usage=USAGE))],
}


@pytest.mark.parametrize("options", [None, {"include_usage": False}])
@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_injected_usage_is_stripped_whatever_its_shape(
    tmp_path: Path, sidecars: list[SidecarProcess], shape: str, options: dict[str, Any] | None
) -> None:
    sent = SHAPES[shape]
    async with Upstream([*sent, DONE]) as upstream:
        sidecar = start(sidecars, write_route(tmp_path / "r.yaml", upstream.url))
        body = chat_body(stream=True, **({"stream_options": options} if options else {}))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sidecar.url}{CHAT}", json=body) as response:
                received = await response.read()
        assert upstream.bodies[0]["stream_options"]["include_usage"] is True
    assert b"usage" not in received
    # chunks without usage byte-exact, chunks with usage:null or usage on content without the key,
    # the usage-only chunk gone
    expected = [raw if b'"usage"' not in raw else without_usage(raw) for raw in sent]
    if shape != "final":
        expected = expected[:-1]
    assert received == b"".join([*expected, DONE])
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert record["tokens_actual"] == 9 and record["outcome"] == "ok"


async def test_client_that_asked_for_usage_gets_every_byte(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    sent = [*SHAPES["litellm"], DONE]
    async with Upstream(sent) as upstream:
        sidecar = start(sidecars, write_route(tmp_path / "r.yaml", upstream.url))
        body = chat_body(stream=True, stream_options={"include_usage": True})
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sidecar.url}{CHAT}", json=body) as response:
                assert await response.read() == b"".join(sent)


async def test_mock_upstream_litellm_shape_through_the_sidecar(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    headers = {"X-Mock-Usage-Shape": "litellm", "X-Mock-Tokens": "3"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{sidecar.url}{CHAT}", json=chat_body(stream=True), headers=headers
        ) as response:
            text = (await response.read()).decode()
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert len(chunks) == 5 and all("usage" not in c for c in chunks)  # role, 3 words, finish
    assert text.endswith("data: [DONE]\n\n")
    sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert sidecar.metric("llmroute_tokens_total", kind="completion") == 3  # read from the stripped usage


# -- completed streams are ok --------------------------------------------------------------------


async def test_client_closing_after_done_is_ok_not_a_disconnect(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    sent = [event(content("Hello")), event(content("", "stop")), DONE]
    async with Upstream(sent, trailer=True) as upstream:
        sidecar = start(
            sidecars,
            write_route(tmp_path / "r.yaml", upstream.url),
            env={"LLMROUTE_HEARTBEAT_SECONDS": "0.05"},
        )
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"{sidecar.url}{CHAT}", json=chat_body(stream=True))
            received = b""
            while DONE not in received:
                chunk = await asyncio.wait_for(response.content.readany(), 10)
                assert chunk, received
                received += chunk
            response.close()  # as the openai SDK does once it read [DONE]
            record = await sidecar.record(lambda r: r.get("msg") == "access")
    assert record["outcome"] == "ok" and record["client_disconnected"] is False
    assert sidecar.metric("llmroute_client_disconnects_total") == 0
    assert sidecar.metric("llmroute_requests_total", outcome="ok") == 1


async def test_upstream_breaking_after_done_changes_nothing_for_the_client(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    sent = [event(content("Hello")), event(content("", "stop")), DONE]
    async with Upstream(sent, cut=True) as upstream:
        sidecar = start(sidecars, write_route(tmp_path / "r.yaml", upstream.url))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(stream=True)) as response:
                received = await response.read()  # a complete chunked body, no error event
    assert received == b"".join(sent)
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert record["outcome"] == "ok" and record["status"] == 200


async def test_openai_sdk_streams_are_ok(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="sk-test", max_retries=0)
    try:
        for _ in range(10):
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
            assert chunks and all(chunk.usage is None for chunk in chunks)
    finally:
        await client.close()
    records = [r for r in sidecar.records() if r.get("msg") == "access"]
    deadline = asyncio.get_running_loop().time() + 10
    while len(records) < 10 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        records = [r for r in sidecar.records() if r.get("msg") == "access"]
    assert [r["outcome"] for r in records] == ["ok"] * 10
    assert sidecar.metric("llmroute_client_disconnects_total") == 0


# -- never-fitting requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "words"),
    [
        ({"name": "tpm", "tokensPerMinute": 100}, "reserves"),
        ({"name": "zero", "requestsPerMinute": 0}, "allows 0 requests per minute"),
    ],
)
async def test_request_that_can_never_fit_is_not_retried(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess], limit: dict[str, Any], words: str
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, limits=[limit]))
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="sk-test", max_retries=2)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=500
            )
    finally:
        await client.close()
    error = caught.value
    assert error.code == "request_too_large_for_limit" and words in error.message
    assert f"'{limit['name']}'" in error.message
    headers = error.response.headers
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"
    record = await sidecar.record(lambda r: r.get("msg") == "access")
    assert record["status"] == 400 and record["limit"] == limit["name"]
    assert len([r for r in sidecar.records() if r.get("msg") == "access"]) == 1  # the SDK did not retry
    assert sidecar.metric("llmroute_quota_rejections_total", limit=limit["name"]) == 1


async def test_concurrency_limit_of_zero_does_not_queue(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    limits = [{"name": "off", "concurrentRequests": 0}]
    route = write_route(tmp_path / "r.yaml", mock.url, limits=limits, queueTimeoutSeconds=5)
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "request_too_large_for_limit"
    assert "allows 0 concurrent requests" in body["error"]["message"]
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert record["queue_wait_ms"] < 4000  # answered at once, not after the 5 s queue timeout
    assert sidecar.metric("llmroute_timeouts_total", layer="queue") == 0


async def test_never_fitting_request_through_redis(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "tpm", "tokensPerMinute": 100}])
    sidecar = start(sidecars, route, "--redis", redis_server.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(max_tokens=500)) as response:
            body = await response.json()
        assert response.status == 400 and body["error"]["code"] == "request_too_large_for_limit"
        assert "Retry-After" not in response.headers and "RateLimit" not in response.headers
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(max_tokens=10)) as response:
            assert response.status == 200  # a request that fits still passes: nothing was consumed
            assert response.headers["x-ratelimit-limit-tokens"] == "100"


# -- rate-limit headers --------------------------------------------------------------------------


def _seconds(go: str) -> float:
    if go.endswith("ms"):
        return int(go[:-2]) / 1000
    minutes, _, seconds = go.rpartition("m")
    return int(minutes or 0) * 60 + float(seconds.rstrip("s"))


async def test_rate_limit_headers_on_success_and_429(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    limits = [
        {"name": "rpm", "requestsPerMinute": 2, "tokensPerMinute": 100_000},
        {"name": "slots", "concurrentRequests": 5},
        {"name": "watch", "requestsPerMinute": 1, "mode": "shadow"},
    ]
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, limits=limits))
    answers = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(max_tokens=10)) as response:
                await response.read()
                answers.append(response)
    ok, _, limited = answers
    assert [a.status for a in answers] == [200, 200, 429]
    for response in answers:
        headers = response.headers
        assert "watch" not in headers["RateLimit-Policy"] + headers["RateLimit"]
        assert '"slots-concurrentRequests"' in headers["RateLimit"]
        assert (
            headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-limit-tokens"] == "100000"
        )
    # success: the nearest rate limit, with a real reset
    assert ok.headers["X-RateLimit-Scope"] == "rpm/requestsPerMinute"
    assert ok.headers["x-ratelimit-remaining-requests"] == ok.headers["X-RateLimit-Remaining"] == "1"
    assert int(ok.headers["X-RateLimit-Reset"]) == math.ceil(
        _seconds(ok.headers["x-ratelimit-reset-requests"])
    )
    assert int(ok.headers["X-RateLimit-Reset"]) > 0
    # 429: every header names the same moment
    headers = limited.headers
    retry = int(headers["Retry-After"])
    assert 55 <= retry <= 60 and headers["X-RateLimit-Reset"] == str(retry)
    assert math.ceil(int(headers["retry-after-ms"]) / 1000) == retry
    assert _seconds(headers["x-ratelimit-reset-requests"]) * 1000 == int(headers["retry-after-ms"])
    assert headers["RateLimit"].startswith(f'"rpm-requestsPerMinute";r=0;t={retry}')
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_burst_429_retry_after_agrees_with_reset(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    limits = [{"name": "b", "requestsPerMinute": 6, "burst": 1}]  # one token back every 10 s
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, limits=limits))
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(2):
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                await response.read()
                statuses.append(response.status)
    assert statuses == [200, 429]
    headers = response.headers
    retry = headers["Retry-After"]
    assert headers["X-RateLimit-Scope"] == "b/burst" and 9 <= int(retry) <= 10
    assert headers["X-RateLimit-Reset"] == retry and math.ceil(int(headers["retry-after-ms"]) / 1000) == int(
        retry
    )
    assert headers["RateLimit"].startswith(f'"b-burst";r=0;t={retry}')
