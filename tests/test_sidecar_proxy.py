"""The sidecar as a real process: proxying, streaming, retries, breaker, deadlines, readiness, lifecycle.

Every test starts a real ``llmroute-sidecar`` process against a real upstream over loopback: the
built-in mock upstream process, or a tiny scripted upstream inside the test when the exact bytes
and their timing matter. Nothing waits on a fixed sleep: tests poll with deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.support.sidecar_procs import (
    MockUpstream,
    SidecarProcess,
    free_port,
    hold_stream,
    http_get,
    start,
    wait_for,
)

CHAT = "/v1/chat/completions"


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream, **extra}


def write_route(path: Path, upstream_url: str, **spec: Any) -> Path:
    """An LLMRoute manifest with sensible test defaults, overridden by ``spec``."""
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "t"}},
        "upstream": {"url": upstream_url, "timeoutSeconds": 5, "retries": 2},
        "deadlineSeconds": 10,
        "queueTimeoutSeconds": 0,
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    manifest = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "t", "namespace": "tests"},
        "spec": base,
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def mock_requests(mock: MockUpstream, key: str) -> list[dict[str, Any]]:
    _, body = http_get(f"{mock.url}/mock/requests")
    return [r for r in json.loads(body) if r["headers"].get("X-Mock-Key") == key]


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    text = (await response.read()).decode()
    return [block for block in text.split("\n\n") if block]


# -- plain proxying ------------------------------------------------------------------------------


async def test_json_request_is_proxied_with_ids_and_trace(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"X-Request-ID": "req-123", "traceparent": trace, "X-Mock-Key": "ids"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            body = await response.json()
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "req-123"
        assert body["usage"]["total_tokens"] > 0
    (seen,) = mock_requests(mock, "ids")
    assert seen["headers"]["X-Request-ID"] == "req-123"
    sent = seen["headers"]["traceparent"].split("-")
    assert sent[1] == "0af7651916cd43dd8448eb211c80319c" and sent[2] != "b7ad6b7169203331"
    record = sidecar.wait_record(lambda r: r.get("msg") == "access" and r.get("request_id") == "req-123")
    assert record["status"] == 200 and record["tokens_actual"] == body["usage"]["total_tokens"]
    assert record["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


async def test_any_path_and_method_pass_through_and_hop_headers_dropped(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{sidecar.url}/some/where?x=1",
            data=b"payload",
            headers={"X-Custom": "kept", "Proxy-Authorization": "secret", "X-Mock-Key": "pt"},
        ) as response,
    ):
        echoed = await response.json()
        assert response.status == 200
        assert response.headers.get("X-Request-ID")
    assert echoed["method"] == "PUT" and echoed["path"] == "/some/where?x=1" and echoed["body_length"] == 7
    assert echoed["headers"]["X-Custom"] == "kept"
    assert "Proxy-Authorization" not in echoed["headers"]


async def test_vendor_key_replaces_the_client_key(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "vendor").mkdir(parents=True)
    (secrets / "vendor" / "api-key").write_text("sk-vendor-123\n")
    route = write_route(
        tmp_path / "r.yaml", mock.url, upstream={"apiKeySecretRef": {"name": "vendor", "key": "api-key"}}
    )
    sidecar = start(sidecars, route, "--secrets-dir", str(secrets))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{sidecar.url}/echo", headers={"Authorization": "Bearer sk-client", "X-Mock-Key": "vk"}
        ) as response,
    ):
        echoed = await response.json()
    assert echoed["headers"]["Authorization"] == "Bearer sk-vendor-123"
    assert "sk-client" not in json.dumps(echoed)
    assert "sk-client" not in sidecar.output() and "sk-vendor-123" not in sidecar.output()


# -- validation and errors -----------------------------------------------------------------------


async def test_malformed_bodies_get_json_errors_with_request_ids(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, maxRequestBytes=2048))
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (
            json.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "invalid_request",
            "messages[0].role",
        ),
        (
            json.dumps(chat_body(messages=[{"role": "user", "content": "a\u0000b"}])).encode(),
            400,
            "null_byte",
            "messages[0].content",
        ),
        (json.dumps(chat_body(padding="x" * 4096)).encode(), 413, "request_too_large", None),
    ]
    async with aiohttp.ClientSession() as session:
        for raw, status, code, param in cases:
            async with session.post(
                f"{sidecar.url}{CHAT}", data=raw, headers={"Content-Type": "application/json"}
            ) as response:
                body = await response.json()
            assert response.status == status, body
            # OpenAI's shape: type, code and param (null when no single field is at fault)
            assert body["error"]["type"] == "invalid_request_error"
            assert (body["error"]["code"], body["error"]["param"]) == (code, param)
            assert body["error"]["message"].startswith(param or "")
            assert body["request_id"] == response.headers["X-Request-ID"]
    assert mock_requests(mock, "") == [] or all(r["path"] != CHAT for r in mock_requests(mock, ""))


def test_invalid_route_file_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    route = write_route(tmp_path / "r.yaml", "http://127.0.0.1:9", limits=[{"name": "a", "key": "ip"}])
    process = SidecarProcess(route, wait_ready=False)
    try:
        assert process.wait_exit(30) == 2
        assert "spec.limits[0].key" in process.output() and "'route', 'apiKey'" in process.output()
    finally:
        process.stop()


# -- retries, deadline, breaker ------------------------------------------------------------------


async def test_retry_on_503_then_success(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    headers = {"X-Mock-Fail-First": "2", "X-Mock-Key": "retry-503"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            assert response.status == 200
    assert len(mock_requests(mock, "retry-503")) == 3
    assert sidecar.metric("llmroute_retries_total") == 2
    record = sidecar.wait_record(lambda r: r.get("msg") == "access" and r.get("status") == 200)
    assert record["attempts"] == 3


async def test_no_retry_on_4xx(tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    headers = {"X-Mock-Status": "400", "X-Mock-Key": "no-retry-400"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "mock_400"  # the upstream's own error
    assert len(mock_requests(mock, "no-retry-400")) == 1


async def test_5xx_after_all_retries_is_relayed_and_counted(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, upstream={"retries": 1}))
    headers = {"X-Mock-Status": "503", "X-Mock-Key": "always-503"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            assert response.status == 503
    assert len(mock_requests(mock, "always-503")) == 2


async def test_connect_failure_after_retries_is_502(tmp_path: Path, sidecars: list[SidecarProcess]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", dead, upstream={"retries": 2}))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            body = await response.json()
    assert response.status == 502 and body["error"]["code"] == "upstream_error"
    assert "3 attempt(s)" in body["error"]["message"]


async def test_no_retry_after_the_first_byte(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    headers = {"X-Mock-Stream-Error-After": "2", "X-Mock-Key": "mid-stream"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.url}{CHAT}", json=chat_body(stream=True), headers=headers) as response,
    ):
        assert response.status == 200
        events = await sse_events(response)
    assert len(mock_requests(mock, "mid-stream")) == 1
    error = json.loads(events[-1].removeprefix("data: "))
    assert error["error"]["code"] == "upstream_error" and error["request_id"]
    assert not any(e == "data: [DONE]" for e in events)


async def test_deadline_answers_504(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, deadlineSeconds=0.5))
    headers = {"X-Mock-Latency": "3", "X-Mock-Key": "slow"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            body = await response.json()
    assert response.status == 504 and body["error"]["code"] == "deadline_exceeded"
    assert sidecar.metric("llmroute_timeouts_total", layer="deadline") == 1


async def test_breaker_opens_then_recovers_through_half_open(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        upstream={"retries": 0, "circuitBreaker": {"consecutiveFailures": 2, "openSeconds": 0.5}},
    )
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                f"{sidecar.url}{CHAT}",
                json=chat_body(),
                headers={"X-Mock-Status": "500", "X-Mock-Key": "brk"},
            ) as response:
                assert response.status == 500
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            body = await response.json()
        assert response.status == 503 and body["error"]["code"] == "circuit_open"
        status, ready = sidecar.readyz()
        assert status == 503 and any("circuit breaker" in r for r in ready["reasons"])

        async def healthy_again() -> bool:
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                return response.status == 200

        deadline = asyncio.get_running_loop().time() + 10
        while not await healthy_again():
            assert asyncio.get_running_loop().time() < deadline, "breaker never closed"
            await asyncio.sleep(0.05)
    assert sidecar.readyz()[1]["breaker"] == "closed"
    assert len(mock_requests(mock, "brk")) == 2  # no request reached the upstream while open


# -- quota at the edge -------------------------------------------------------------------------


async def test_429_carries_retry_after_and_rate_limit_headers(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "tiny", "requestsPerMinute": 2}])
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(3):
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                statuses.append(response.status)
                last = response
                body = await response.json()
    assert statuses == [200, 200, 429]
    assert 55 <= int(last.headers["Retry-After"]) <= 60
    assert last.headers["X-RateLimit-Limit"] == "2" and last.headers["X-RateLimit-Remaining"] == "0"
    assert "tiny" in last.headers["RateLimit-Policy"] and "q=2" in last.headers["RateLimit-Policy"]
    assert body["error"]["type"] == "rate_limit_error" and "'tiny'" in body["error"]["message"]
    assert sidecar.metric("llmroute_quota_rejections_total", limit="tiny") == 1


async def test_route_file_edit_changes_the_limit_live(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    path = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "l", "requestsPerMinute": 1}])
    sidecar = start(sidecars, path)
    async with aiohttp.ClientSession() as session:

        async def status() -> int:
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                return response.status

        assert [await status(), await status()] == [200, 429]
        write_route(
            path, mock.url, limits=[{"name": "l", "requestsPerMinute": 1, "key": "header:X-Broken Name"}]
        )
        sidecar.wait_record(lambda r: r.get("msg", "").startswith("route file rejected"))
        assert await status() == 429  # the invalid edit left the running limit in force
        write_route(path, mock.url, limits=[{"name": "l", "requestsPerMinute": 50}])
        sidecar.wait_record(lambda r: r.get("msg") == "configuration reloaded")
        assert await status() == 200
    assert sidecar.metric("llmroute_config_reloads_total", result="ok") == 1


# -- streaming -----------------------------------------------------------------------------------


class ScriptedUpstream:
    """An upstream inside the test: sends exact SSE bytes in chunks, can hold after the first one."""

    def __init__(self, chunks: list[bytes], hold_after_first: bool = False) -> None:
        self.chunks = chunks
        self.hold = asyncio.Event()
        if not hold_after_first:
            self.hold.set()
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, chunk in enumerate(self.chunks):
            await response.write(chunk)
            if index == 0:
                await self.hold.wait()
        await response.write_eof()
        return response

    async def __aenter__(self) -> ScriptedUpstream:
        app = web.Application()
        app.router.add_post(CHAT, self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.hold.set()
        assert self.runner is not None
        await self.runner.cleanup()


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


STREAM = [
    _event({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    _event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hello"}}]})[:20],
    _event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hello"}}]})[20:]
    + b": comment\r\n\r\n",
    _event({"id": "c1", "choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": "stop"}]}),
]
USAGE = _event(
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}
)
DONE = b"data: [DONE]\n\n"


async def _read_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_any():
        yield chunk


async def test_sse_is_byte_exact_and_delivered_incrementally(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    sent = [*STREAM, USAGE, DONE]
    async with ScriptedUpstream(sent, hold_after_first=True) as upstream:
        sidecar = start(sidecars, write_route(tmp_path / "r.yaml", upstream.url))
        body = chat_body(stream=True, stream_options={"include_usage": True})
        received = b""
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sidecar.url}{CHAT}", json=body) as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                async for chunk in _read_chunks(response):
                    received += chunk
                    # The upstream holds after its first event: seeing it here proves no buffering.
                    if received == sent[0]:
                        upstream.hold.set()
        assert received == b"".join(sent)
        assert upstream.bodies[0]["stream_options"] == {"include_usage": True}
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert record["tokens_actual"] == 9 and record["stream"] is True


async def test_sidecar_asks_for_stream_usage_and_strips_it(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    sent = [*STREAM, USAGE, DONE]
    async with ScriptedUpstream(sent) as upstream:
        sidecar = start(sidecars, write_route(tmp_path / "r.yaml", upstream.url))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(stream=True)) as response:
                received = await response.read()
        assert upstream.bodies[0]["stream_options"] == {"include_usage": True}
        assert received == b"".join([*STREAM, DONE])
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    assert record["tokens_actual"] == 9
    assert sidecar.metric("llmroute_tokens_total", kind="completion") == 2


async def test_stream_without_usage_chunk_is_estimated(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    headers = {"X-Mock-No-Usage": "1", "X-Mock-Tokens": "8", "X-Mock-Key": "no-usage"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{sidecar.url}{CHAT}", json=chat_body(stream=True), headers=headers) as response,
    ):
        text = (await response.read()).decode()
    streamed = "".join(
        (json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        for line in text.splitlines()
        if line.startswith("data: {")
    )
    record = sidecar.wait_record(lambda r: r.get("msg") == "access")
    prompt = record["tokens_actual"] - -(-len(streamed) // 4)
    assert prompt > 0 and record["tokens_actual"] < record["tokens_reserved"]


# -- disconnects, readiness, lifecycle -----------------------------------------------------------


async def test_client_disconnect_mid_stream_releases_the_slot(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "one", "concurrentRequests": 1}])
    sidecar = start(sidecars, route, env={"LLMROUTE_HEARTBEAT_SECONDS": "0.1"})
    try:
        async with aiohttp.ClientSession() as session:
            held = await hold_stream(session, sidecar.url)
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                assert response.status == 429  # the held stream owns the only slot
            held.close()  # the client goes away mid-stream
            record = await sidecar.record(lambda r: r.get("msg") == "access" and r.get("client_disconnected"))
            assert record["outcome"] == "client_disconnected"
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
                assert response.status == 200
                await response.read()
        assert sidecar.metric("llmroute_client_disconnects_total") == 1
    finally:
        mock.release()


async def test_readiness_flips_when_saturated(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, readiness={"maxInFlight": 1}))
    assert sidecar.readyz()[0] == 200
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        status, body = sidecar.readyz()
        assert status == 503 and any(reason.startswith("saturated") for reason in body["reasons"])
        mock.release()
        assert (await held.read()).endswith(b"data: [DONE]\n\n")
        held.close()
    wait_for(lambda: sidecar.readyz()[0] == 200, what="ready again")


async def test_readiness_follows_upstream_health(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, readiness={"upstreamHealthPath": "/health"})
    sidecar = start(sidecars, route)
    wait_for(lambda: sidecar.readyz()[1].get("upstreamHealthy") is True, what="upstream probed healthy")
    try:
        _post_json(f"{mock.url}/mock/health", {"healthy": False})
        _status, body = wait_for(
            lambda: (r := sidecar.readyz())[0] == 503 and r, what="not ready while the upstream is unhealthy"
        )
        assert any("upstream unhealthy" in reason for reason in body["reasons"])
    finally:
        _post_json(f"{mock.url}/mock/health", {"healthy": True})
    wait_for(lambda: sidecar.readyz()[0] == 200, what="ready again")


def _post_json(url: str, body: dict[str, Any]) -> None:
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=5).read()


async def test_sigterm_drains_in_flight_streams_then_exits_zero(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        sidecar.signal(signal.SIGTERM)
        _status, body = wait_for(lambda: (r := sidecar.readyz())[0] == 503 and r, what="draining")
        assert any(reason.startswith("draining") for reason in body["reasons"])
        assert sidecar.alive
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            refused = await response.json()
        assert response.status == 503 and refused["error"]["code"] == "draining"
        mock.release()
        assert (await held.read()).endswith(b"data: [DONE]\n\n")
        held.close()
    assert sidecar.wait_exit(30) == 0
    assert sidecar.wait_record(lambda r: r.get("msg") == "shutting down")["drained"] is True


async def test_client_keys_and_tiers_apply_and_rotate_without_restart(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    keys = tmp_path / "secrets" / "client-keys"
    keys.mkdir(parents=True)
    (keys / hashlib.sha256(b"sk-free").hexdigest()).write_text("free")
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        identity={"keysSecretRef": {"name": "client-keys"}},
        tiers={"free": {"requestsPerMinute": 1}, "premium": {"requestsPerMinute": 100}},
        limits=[{"name": "per-key", "key": "apiKey", "requestsPerMinute": 5}],
    )
    sidecar = start(sidecars, route, "--secrets-dir", str(tmp_path / "secrets"))
    async with aiohttp.ClientSession() as session:

        async def status(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
                await response.read()
                return response.status

        assert [await status("sk-free"), await status("sk-free")] == [200, 429]  # the free tier's 1/min
        assert await status("sk-new") == 401
        (keys / hashlib.sha256(b"sk-new").hexdigest()).write_text("premium")
        await sidecar.record(lambda r: r.get("msg") == "configuration reloaded")
        assert [await status("sk-new") for _ in range(3)] == [200, 200, 200]
    assert "sk-new" not in sidecar.output() and "sk-free" not in sidecar.output()


async def test_requests_queue_for_a_concurrency_slot_until_queue_timeout(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        queueTimeoutSeconds=30,
        limits=[{"name": "one", "concurrentRequests": 1}],
    )
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        queued = asyncio.create_task(session.post(f"{sidecar.url}{CHAT}", json=chat_body()))
        done, _ = await asyncio.wait({queued}, timeout=0.5)
        assert not done, "the second request must wait for the slot, not be answered"
        mock.release()  # the held stream finishes and frees the slot
        await held.read()
        held.close()
        response = await asyncio.wait_for(queued, 20)
        assert response.status == 200
        await response.read()
    record = await sidecar.record(
        lambda r: r.get("msg") == "access" and r.get("queue_wait_ms", 0) > 0 and r["status"] == 200
    )
    assert record["limit"] is None


async def test_queue_timeout_rejects_with_429(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        queueTimeoutSeconds=0.3,
        limits=[{"name": "one", "concurrentRequests": 1}],
    )
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            body = await response.json()
        assert response.status == 429 and body["error"]["code"] == "concurrent_requests_exceeded"
        assert response.headers["Retry-After"] == "1"
        held.close()
    record = await sidecar.record(lambda r: r.get("msg") == "access" and r.get("status") == 429)
    assert record["queue_wait_ms"] >= 300
    assert sidecar.metric("llmroute_timeouts_total", layer="queue") == 1
