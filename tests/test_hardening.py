"""Bad input from one client hurts no other: encodings, bodies, methods, targets, slow connections."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import time
import zlib
from pathlib import Path

import aiohttp
import pytest

from tests.support.sidecar_procs import (
    MockUpstream,
    SidecarProcess,
    hold_stream,
    http_get,
    start,
    wait_for,
)
from tests.test_redaction import raw_exchange
from tests.test_sidecar_proxy import CHAT, chat_body, mock_requests, write_route

BREAKER = {"retries": 0, "circuitBreaker": {"consecutiveFailures": 2, "openSeconds": 30}}


def _route(tmp_path: Path, mock: MockUpstream, **spec: object) -> Path:
    return write_route(tmp_path / "r.yaml", mock.url, upstream=BREAKER, maxRequestBytes=20_000, **spec)


async def test_gzip_and_deflate_bodies_are_decoded_and_forwarded_plain(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock))
    plain = json.dumps(chat_body()).encode()
    async with aiohttp.ClientSession() as session:
        for coding, data in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))):
            headers = {"Content-Encoding": coding, "Content-Type": "application/json", "X-Mock-Key": coding}
            async with session.post(f"{sidecar.url}{CHAT}", data=data, headers=headers) as response:
                assert response.status == 200, await response.text()
            seen = mock_requests(mock, coding)
            assert seen and "Content-Encoding" not in seen[0]["headers"]
        # A pass-through path streams the decoded body too.
        headers = {"Content-Encoding": "gzip", "X-Mock-Key": "pt-gzip"}
        async with session.post(f"{sidecar.url}/v1/other", data=gzip.compress(b"x" * 5000), headers=headers):
            pass
        seen = mock_requests(mock, "pt-gzip")
        assert seen[0]["body_length"] == 5000 and "Content-Encoding" not in seen[0]["headers"]


async def test_bad_encodings_are_4xx_and_never_open_the_breaker(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock))
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # 50 MB decoded, ~50 kB on the wire
    cases = [
        (CHAT, {"Content-Encoding": "gzip"}, bomb, 413, "request_too_large"),
        ("/v1/other", {"Content-Encoding": "gzip"}, bomb, 413, "request_too_large"),
        (CHAT, {"Content-Encoding": "br"}, b"\x00\x01", 415, "unsupported_encoding"),
        (CHAT, {"Content-Encoding": "gzip"}, b"not gzip at all", 400, "invalid_encoding"),
        (CHAT, {"Content-Encoding": "gzip"}, gzip.compress(b"{}")[:-6], 400, "invalid_encoding"),
    ]
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # twice: the breaker's threshold
            for path, headers, data, status, code in cases:
                async with session.post(f"{sidecar.url}{path}", data=data, headers=headers) as response:
                    body = await response.json()
                assert (response.status, body["error"]["code"]) == (status, code), (path, headers)
        async with session.post(f"{sidecar.url}{CHAT}", json=chat_body()) as response:
            assert response.status == 200
    status, ready = sidecar.readyz()
    assert status == 200 and ready["breaker"] == "closed"


def _chunked(path: str, payload: bytes, extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[i : i + 8192] for i in range(0, len(payload), 8192))
    )
    return head.encode() + extra + b"\r\n" + body + b"0\r\n\r\n"


def test_oversized_chunked_pass_through_is_413_not_counted_against_the_breaker(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock))
    for _ in range(3):
        answer = raw_exchange(sidecar.port, _chunked("/v1/upload", b"x" * 50_000))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        gz = gzip.compress(b"y" * 200_000)
        answer = raw_exchange(sidecar.port, _chunked("/v1/upload", gz, b"Content-Encoding: gzip\r\n"))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sidecar.metric("llmroute_upstream_errors_total") == 0
    assert sidecar.readyz()[1]["breaker"] == "closed"


def test_absolute_form_target_is_400_before_quota(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = _route(tmp_path, mock, limits=[{"name": "rpm", "key": "route", "requestsPerMinute": 1}])
    sidecar = start(sidecars, route)
    for _ in range(3):
        answer = raw_exchange(
            sidecar.port, b"GET http://example.invalid/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400") and b"invalid_request_target" in answer
    status, _ = http_get(f"{sidecar.url}/v1/models")
    assert status == 200  # the one request of the minute is still there


async def test_openai_endpoints_answer_405_to_other_methods(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock))
    async with aiohttp.ClientSession() as session:
        for path in (CHAT, "/v1/completions", "/v1/embeddings", "/v1/responses"):
            for method in ("GET", "PUT", "DELETE"):
                async with session.request(method, f"{sidecar.url}{path}") as response:
                    body = await response.json()
                assert response.status == 405 and response.headers["Allow"] == "POST"
                assert body["error"]["code"] == "method_not_allowed" and body["request_id"]
        async with session.get(f"{sidecar.url}/v1/models") as response:
            assert response.status == 200  # pass-through keeps every method


async def test_hints_report_the_live_inflight_count(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock))
    async with aiohttp.ClientSession() as session:
        held = [await hold_stream(session, sidecar.url) for _ in range(3)]
        _, text = http_get(f"{sidecar.admin}/hints")
        assert json.loads(text)["inflight"] == 3
        mock.release()
        for response in held:
            await response.read()
            response.close()
    wait_for(lambda: json.loads(http_get(f"{sidecar.admin}/hints")[1])["inflight"] == 0, what="idle")


async def test_streams_cut_at_the_end_of_the_drain_get_a_draining_event(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock), env={"LLMROUTE_DRAIN_SECONDS": "0.5"})
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        sidecar.signal(signal.SIGTERM)
        rest = await held.read()
    assert b'"code":"draining"' in rest.replace(b" ", b"")
    assert sidecar.wait_exit(30) == 0


def _slow_connections(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        socks.append(sock)
    return socks


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    if data:
        sock.settimeout(2)
        while data := sock.recv(65536):
            pass
    return True


def test_slow_header_connections_are_closed_while_normal_clients_are_served(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock), "--header-timeout", "1")
    slow = _slow_connections(sidecar.port, 100)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # served while the slow ones hang
            assert http_get(f"{sidecar.url}/v1/models")[0] == 200
        wait_for(lambda: all(_closed(s) for s in slow), timeout=15, what="slow connections closed")
        assert sidecar.metric("llmroute_connections_rejected_total", reason="header_timeout") >= 100
        assert http_get(f"{sidecar.url}/v1/models")[0] == 200
    finally:
        for sock in slow:
            sock.close()


def _read_response(sock: socket.socket) -> bytes:
    """One response to a GET (Content-Length framed) from a kept-alive socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b""
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(v)
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
        if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_a_kept_alive_connection_outlives_its_header_timeout_and_still_gets_one(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    """One header timer per connection, kept armed across its requests: requests on one connection
    for longer than the timeout are all served; the next request's headers, left unfinished, still
    get the 408 once the timeout passes."""
    sidecar = start(sidecars, _route(tmp_path, mock), "--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        started = time.monotonic()
        served = 0
        while time.monotonic() - started < 2.5:  # paced requests, each well within the timeout
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200")
            served += 1
            time.sleep(0.2)  # pacing: the traffic under test, not synchronisation
        assert served >= 8
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        sock.settimeout(10)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.1 408") and b"header_timeout" in rest
    assert sidecar.metric("llmroute_connections_rejected_total", reason="header_timeout") == 1


async def test_connections_beyond_the_cap_are_refused_while_open_ones_work(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, _route(tmp_path, mock), env={"LLMROUTE_MAX_CONNECTIONS": "5"})
    connector = aiohttp.TCPConnector(limit=5)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.get(f"{sidecar.url}/v1/models") as response:
                await response.read()
                return response.status

        assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5  # 5 kept-alive connections
        wait_for(lambda: sidecar.metric("llmroute_connections_open", listener="traffic") == 5, what="5 open")
        refused = raw_exchange(sidecar.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503") and b"too_many_connections" in refused
        assert await asyncio.gather(*(one() for _ in range(10))) == [200] * 10
    assert sidecar.metric("llmroute_connections_rejected_total", reason="max_connections") >= 1


async def test_first_readyz_after_the_open_period_agrees_with_the_breaker(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    upstream = {"retries": 0, "circuitBreaker": {"consecutiveFailures": 2, "openSeconds": 0.5}}
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, upstream=upstream))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            headers = {"X-Mock-Status": "500"}
            async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
                assert response.status == 500
    status, body = sidecar.readyz()
    assert body["breaker"] == "open" and any("circuit breaker" in r for r in body["reasons"])
    status, body = wait_for(lambda: (r := sidecar.readyz())[1]["breaker"] != "open" and r, what="half-open")
    assert body["breaker"] == "half_open"
    assert not any("circuit breaker" in r for r in body["reasons"]) and status == 200


async def test_mid_stream_upstream_timeout_is_counted(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    upstream = {"retries": 0, "timeoutSeconds": 0.5}
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url, upstream=upstream))
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        rest = await held.read()
    assert b"upstream_timeout" in rest
    assert sidecar.metric("llmroute_timeouts_total", layer="stream") == 1
    assert sidecar.metric("llmroute_upstream_errors_total", type="stream_timeout") == 1


def test_decoder_handles_raw_deflate_and_multi_member_gzip_within_its_budget() -> None:
    from llmroute_sidecar.request_body import _Decoder

    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw.compress(b"abc" * 100) + raw.flush()
    decoder = _Decoder("deflate")
    assert decoder.feed(raw_deflate, 1000) == b"abc" * 100
    decoder.finish()
    decoder = _Decoder("gzip")
    assert decoder.feed(gzip.compress(b"one ") + gzip.compress(b"two"), 1000) == b"one two"
    decoder = _Decoder("gzip")
    with pytest.raises(OverflowError):
        decoder.feed(gzip.compress(b"x" * 10_000), 100)
