"""Several upstreams per route, with real processes: two mock upstreams, sidecars, redis-server.

Each test marks its requests with an ``X-Test`` header and counts, on each mock, the requests that
carry its mark: exact counts of what reached which upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis import Redis

from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import (
    MockUpstream,
    SidecarProcess,
    free_port,
    hold_stream,
    http_get,
    start,
    wait_for,
)
from tests.test_sidecar_proxy import CHAT, chat_body


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[MockUpstream, MockUpstream]]:
    """Two mock upstreams, ``a`` and ``b``, without artificial latency."""
    fast = ("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")
    first = MockUpstream(*fast)
    try:
        second = MockUpstream(*fast)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
def pair(mocks: tuple[MockUpstream, MockUpstream]) -> Iterator[tuple[MockUpstream, MockUpstream]]:
    """The two mocks, answering normally again after the test."""
    try:
        yield mocks
    finally:
        for mock in mocks:
            fail(mock, 0)


def control(mock: MockUpstream, path: str, settings: dict[str, Any]) -> None:
    """POST a JSON setting to one of the mock's control endpoints."""
    request = urllib.request.Request(
        f"{mock.url}{path}",
        data=json.dumps(settings).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def fail(mock: MockUpstream, status: int) -> None:
    """Make ``mock`` answer ``status`` to every request (0: answer normally)."""
    control(mock, "/mock/fail", {"status": status})


def received(mock: MockUpstream, mark: str) -> list[dict[str, Any]]:
    """The chat requests ``mock`` received carrying ``X-Test: mark``."""
    _, text = http_get(f"{mock.url}/mock/requests")
    return [r for r in json.loads(text) if r["path"] == CHAT and r["headers"].get("X-Test") == mark]


def write_route(path: Path, upstreams: list[dict[str, Any]], **spec: Any) -> Path:
    manifest = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "t", "namespace": "tests"},
        "spec": {
            "selector": {"matchLabels": {"app": "t"}},
            "upstreams": upstreams,
            "deadlineSeconds": 10,
            "queueTimeoutSeconds": 2,
            **spec,
        },
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def upstream(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "timeoutSeconds": 5, "retries": 0, **fields}


async def post(
    session: aiohttp.ClientSession, sidecar: SidecarProcess, mark: str, **body: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body (a stream's text under "text") and headers of one chat request."""
    url, headers = f"{sidecar.url}{CHAT}", {"X-Test": mark}
    async with session.post(url, json=chat_body(**body), headers=headers) as response:
        if response.content_type == "text/event-stream":
            return response.status, {"text": await response.text()}, dict(response.headers)
        return response.status, await response.json(), dict(response.headers)


def keys(redis_server: RedisServer) -> list[str]:
    client = Redis.from_url(redis_server.url)
    try:
        return [key.decode() for key in client.scan_iter(match="llmr:*")]
    finally:
        client.close()


def concurrency_in_use(redis_server: RedisServer) -> list[str]:
    """The concurrency keys that hold slots (an empty sorted set does not exist in Redis)."""
    return [key for key in keys(redis_server) if key.endswith(":conc")]


async def test_provisioned_quota_first_then_on_demand_across_two_sidecars(
    tmp_path: Path,
    pair: tuple[MockUpstream, MockUpstream],
    redis_server: RedisServer,
    sidecars: list[SidecarProcess],
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [upstream("a", a.url, priority=0), upstream("b", b.url, priority=1)],
        limits=[
            {"name": "route-slots", "key": "route", "concurrentRequests": 4},
            {
                "name": "provisioned",
                "key": "route",
                "upstream": "a",
                "requestsPerMinute": 5,
                "concurrentRequests": 8,
            },
            {"name": "on-demand", "key": "route", "upstream": "b", "concurrentRequests": 8},
        ],
    )
    fleet = [start(sidecars, route, "--redis", redis_server.url) for _ in range(2)]
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, fleet[i % 2], mark))[0] for i in range(12)]
    assert statuses == [200] * 12
    assert (len(received(a, mark)), len(received(b, mark))) == (5, 7)
    fallbacks = sum(
        s.metric("llmroute_upstream_fallbacks_total", upstream="a", reason="quota") for s in fleet
    )
    assert fallbacks == 7
    # Every concurrency slot taken (route, provisioned, on-demand) came back.
    # Every concurrency slot taken (route, provisioned, on-demand) came back: Redis drops a sorted set
    # with its last member, so no concurrency key is left once settlements landed.
    assert any(key.endswith(":provisioned:_:rpm") for key in keys(redis_server))
    wait_for(lambda: not concurrency_in_use(redis_server), what="every concurrency slot released")


async def test_every_candidate_out_of_its_quota_is_a_429_with_the_usual_answer(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [upstream("a", a.url), upstream("b", b.url, priority=1)],
        limits=[
            {"name": "a-rpm", "key": "route", "upstream": "a", "requestsPerMinute": 1},
            {"name": "b-rph", "key": "route", "upstream": "b", "requestsPerHour": 1},
        ],
    )
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        answers = [await post(session, sidecar, mark) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    _, body, headers = answers[2]
    # The answer names the candidate that frees up first (a's minute, not b's hour).
    assert body["error"]["code"] == "requests_per_minute_exceeded" and "'a-rpm'" in body["error"]["message"]
    assert body["error"]["type"] == "rate_limit_error"
    assert 0 < float(headers["Retry-After"]) <= 60
    assert (len(received(a, mark)), len(received(b, mark))) == (1, 1)


@pytest.mark.parametrize("status", [429, 500])
async def test_an_upstream_failing_before_the_first_byte_falls_back(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess], status: int
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [
            upstream("a", a.url, retries=1, circuitBreaker={"consecutiveFailures": 100}),
            upstream("b", b.url, priority=1),
        ],
        limits=[
            {"name": "slots", "key": "route", "concurrentRequests": 1},
            {"name": "a-slots", "key": "route", "upstream": "a", "concurrentRequests": 1},
        ],
    )
    sidecar = start(sidecars, route)
    fail(a, status)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        results = [await post(session, sidecar, mark, stream=i % 2 == 1) for i in range(4)]
    assert [status for status, _, _ in results] == [200] * 4
    assert all("data: [DONE]" in body["text"] for _, body, _ in results[1::2])
    # 429 moves on at once; a 5xx is retried on the same upstream first (retries: 1).
    assert len(received(a, mark)) == (4 if status == 429 else 8)
    assert len(received(b, mark)) == 4
    reason = "http_429" if status == 429 else "http_5xx"
    assert sidecar.metric("llmroute_upstream_fallbacks_total", upstream="a", reason=reason) == 4
    # a's slot was given back after each failed attempt: no request found it taken.
    assert sidecar.metric("llmroute_upstream_fallbacks_total", reason="quota") == 0
    assert sidecar.metric("llmroute_retries_total", upstream="a") == (0 if status == 429 else 4)
    # Failed attempts are counted per upstream: a's eight 5xx answers, nothing on b.
    assert sidecar.metric("llmroute_upstream_errors_total", upstream="b") == 0
    if status == 500:
        assert sidecar.metric("llmroute_upstream_errors_total", upstream="a") == 8


async def test_the_last_candidates_failure_reaches_the_client(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    dead = f"http://127.0.0.1:{free_port()}"
    route = write_route(tmp_path / "r.yaml", [upstream("a", a.url), upstream("b", b.url, priority=1)])
    sidecar = start(sidecars, route)
    fail(a, 500)
    fail(b, 503)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, sidecar, mark)
    assert status == 503 and body["error"]["code"] == "mock_503"  # relayed as the last upstream sent it
    assert (len(received(a, mark)), len(received(b, mark))) == (1, 1)
    route = write_route(tmp_path / "r2.yaml", [upstream("x", dead), upstream("y", dead, priority=1)])
    sidecar = start(sidecars, route)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, sidecar, mark)
    assert status == 502 and body["error"]["code"] == "upstream_error"


async def test_an_open_breaker_sends_traffic_to_the_next_upstream(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    _, b = pair
    dead = f"http://127.0.0.1:{free_port()}"
    breaker = {"consecutiveFailures": 1, "openSeconds": 600}
    route = write_route(
        tmp_path / "r.yaml",
        [
            upstream("a", dead, circuitBreaker=breaker),
            upstream("b", b.url, priority=1, circuitBreaker=breaker),
        ],
    )
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, sidecar, mark))[0] for _ in range(3)]
    assert statuses == [200, 200, 200] and len(received(b, mark)) == 3
    # One connect error opened a's breaker; the next requests never tried it.
    assert sidecar.metric("llmroute_upstream_fallbacks_total", upstream="a", reason="connect_error") == 1
    assert sidecar.metric("llmroute_upstream_duration_seconds_count", upstream="a") == 1
    assert sidecar.metric("llmroute_circuit_breaker_state", upstream="a") == 2
    assert sidecar.metric("llmroute_circuit_breaker_state", upstream="b") == 0
    code, ready = sidecar.readyz()
    assert code == 200 and ready["ready"] is True  # b can still serve
    _, hints = http_get(f"{sidecar.admin}/hints")
    states = {u["name"]: u["breaker"] for u in json.loads(hints)["upstreams"]}
    assert states == {"a": "open", "b": "closed"}


async def test_not_ready_only_when_no_upstream_can_serve(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [upstream("a", a.url), upstream("b", b.url)],
        readiness={"upstreamHealthPath": "/health"},
    )
    sidecar = start(sidecars, route)
    try:
        wait_for(lambda: sidecar.readyz()[0] == 200, what="ready")
        set_health(a, False)
        wait_for(
            lambda: (
                {u["name"]: u["healthy"] for u in sidecar.readyz()[1]["upstreams"]} == {"a": False, "b": True}
            ),
            what="a probed unhealthy",
        )
        assert sidecar.readyz()[0] == 200
        set_health(b, False)
        _, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(sidecar.readyz()), what="not ready")
        assert any("upstream unhealthy" in reason for reason in body["reasons"])
    finally:
        set_health(a, True)
        set_health(b, True)


def set_health(mock: MockUpstream, healthy: bool) -> None:
    control(mock, "/mock/health", {"healthy": healthy})


async def test_models_route_to_their_upstream_with_rewrites_and_v1_models(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [
            upstream("openai", a.url, models=["gpt-4o", "gpt-4o*"]),
            upstream("local", b.url, models=["llama-3"], modelRewrite={"llama-3": "meta-llama-3-8b"}),
        ],
    )
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, sidecar, mark, model="gpt-4o-mini")
        assert status == 200 and body["model"] == "gpt-4o-mini"
        status, body, _ = await post(session, sidecar, mark, model="llama-3")
        assert status == 200 and body["model"] == "meta-llama-3-8b"  # what the upstream answered
        status, body, _ = await post(session, sidecar, mark, model="claude-3")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        async with session.get(f"{sidecar.url}/v1/models") as response:
            assert response.status == 200
            listing = await response.json()
    assert (len(received(a, mark)), len(received(b, mark))) == (1, 1)
    assert listing == {
        "object": "list",
        "data": [
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "openai"},
            {"id": "llama-3", "object": "model", "created": 0, "owned_by": "local"},
        ],
    }


async def test_no_fallback_after_the_first_byte_nor_on_other_4xx(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    route = write_route(tmp_path / "r.yaml", [upstream("a", a.url), upstream("b", b.url, priority=1)])
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        headers = {"X-Test": mark, "X-Mock-Stream-Error-After": "2"}
        async with session.post(
            f"{sidecar.url}{CHAT}", json=chat_body(stream=True), headers=headers
        ) as response:
            assert response.status == 200
            text = await response.text()
        headers = {"X-Test": mark, "X-Mock-Status": "400"}
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "mock_400"  # a's own answer, relayed
    assert '"code":"upstream_error"' in text.replace(" ", "") and "[DONE]" not in text
    assert (len(received(a, mark)), len(received(b, mark))) == (2, 0)
    assert sidecar.metric("llmroute_upstream_fallbacks_total") == 0


async def test_only_the_last_candidate_queues_for_its_own_concurrency_slot(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [upstream("a", a.url), upstream("b", b.url, priority=1)],
        limits=[
            {"name": "a-slot", "key": "route", "upstream": "a", "concurrentRequests": 1},
            {"name": "b-slot", "key": "route", "upstream": "b", "concurrentRequests": 1},
        ],
        queueTimeoutSeconds=5,
    )
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    try:
        async with aiohttp.ClientSession() as session:
            first = await hold_stream(session, sidecar.url)  # holds a's slot
            second = await hold_stream(session, sidecar.url)  # a is full: b's slot
            third = asyncio.create_task(post(session, sidecar, mark))  # a full (moves on), b full: waits
            await wait_async(lambda: sidecar.metric("llmroute_upstream_fallbacks_total", reason="quota") == 2)
            assert not third.done()
            b.release()  # the second stream ends: b's slot frees, the third request takes it
            status, body, _ = await third
            assert status == 200 and body["choices"]
            assert (len(received(a, mark)), len(received(b, mark))) == (0, 1)
            for response in (first, second):
                response.close()
    finally:
        a.release()
        b.release()


async def wait_async(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` without blocking the event loop; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_one_failing_upstream_does_not_make_the_pod_unready_while_another_serves(
    tmp_path: Path, pair: tuple[MockUpstream, MockUpstream], sidecars: list[SidecarProcess]
) -> None:
    _, b = pair
    dead = f"http://127.0.0.1:{free_port()}"
    route = write_route(
        tmp_path / "r.yaml",
        [
            upstream("a", dead, retries=2, circuitBreaker={"consecutiveFailures": 100}),
            upstream("b", b.url, priority=1),
        ],
        readiness={"maxErrorRate": 0.5},
    )
    sidecar = start(sidecars, route)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            status, _, _ = await post(session, sidecar, mark, model="m")
            assert status == 200
    failed = sidecar.metric("llmroute_upstream_duration_seconds_count", upstream="a", outcome="connect_error")
    assert failed == 12  # 3 attempts on a per request, then b answered: 75% of all attempts failed
    code, body = sidecar.readyz()
    assert code == 200, body["reasons"]


async def test_a_request_no_upstream_took_leaves_the_route_limits_untouched(
    tmp_path: Path,
    pair: tuple[MockUpstream, MockUpstream],
    redis_server: RedisServer,
    sidecars: list[SidecarProcess],
) -> None:
    a, b = pair
    route = write_route(
        tmp_path / "r.yaml",
        [upstream("a", a.url), upstream("b", b.url, priority=1)],
        limits=[
            {"name": "route-rpm", "key": "route", "requestsPerMinute": 3, "tokensPerMinute": 100_000},
            {"name": "a-rpm", "key": "route", "upstream": "a", "requestsPerMinute": 1},
            {"name": "b-rpm", "key": "route", "upstream": "b", "requestsPerMinute": 1},
        ],
    )
    sidecar = start(sidecars, route, "--redis", redis_server.url)
    mark = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, sidecar, mark))[0] for _ in range(5)]
    assert statuses == [200, 200, 429, 429, 429]
    # All or nothing across the route's and the upstreams' limits: the three 429s never reached an
    # upstream, so the route's minute holds only the two requests that did (a third still fits).
    client = Redis(port=redis_server.port)
    try:
        route_keys = [key for key in keys(redis_server) if ":route-rpm:_:" in key]
        counts = {key.rsplit(":", 1)[1]: client.zcard(key) for key in route_keys if not key.endswith(":c")}
        assert counts == {"rpm": 2, "tpm": 2}
    finally:
        client.close()
    assert (len(received(a, mark)), len(received(b, mark))) == (1, 1)
