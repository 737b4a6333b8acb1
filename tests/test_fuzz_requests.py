"""Hypothesis fuzzing of request bodies and headers through a real sidecar: never a 5xx.

Raw sockets, so malformed framing and headers reach the server as sent; the mock upstream answers
2xx/4xx for anything it gets, so any 5xx would be the sidecar's (or a request it forwarded badly).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.sidecar_procs import MockUpstream, SidecarProcess
from tests.test_sidecar_proxy import write_route

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/x"]
HEADER_NAMES = [
    "Content-Type",
    "Content-Encoding",
    "Authorization",
    "X-Request-ID",
    "traceparent",
    "Transfer-Encoding",
    "Expect",
    "Connection",
    "X-Forwarded-For",
    "Accept-Encoding",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just("m"),
        "messages": json_values | st.just([{"role": "user", "content": "hi"}]),
        "stream": json_values,
        "max_tokens": json_values,
        "stream_options": json_values,
        "input": json_values,
        "prompt": json_values,
    },
)
bodies = st.one_of(
    chat_like.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=300),
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@pytest.fixture(scope="module")
def fuzz_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    upstream = MockUpstream("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")
    route = write_route(
        tmp_path_factory.mktemp("fuzz") / "r.yaml",
        upstream.url,
        upstream={"retries": 0, "timeoutSeconds": 5},
        maxRequestBytes=4096,
    )
    sidecar = SidecarProcess(route, env={"LLMROUTE_HEADER_TIMEOUT_SECONDS": "5"})
    try:
        yield sidecar
    finally:
        sidecar.stop()
        upstream.stop()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
    path=st.sampled_from(PATHS),
    headers=st.lists(
        st.tuples(st.sampled_from(HEADER_NAMES), header_values)
        | st.tuples(st.just("Content-Encoding"), st.sampled_from(["gzip", "deflate", "br", "identity"])),
        max_size=5,
    ),
    body=bodies,
    chunked=st.booleans(),
)
def test_fuzzed_requests_never_get_a_sidecar_5xx(
    fuzz_sidecar: SidecarProcess,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    chunked: bool,
) -> None:
    lines = [f"{method} {path} HTTP/1.1", "Host: fuzz", "Connection: close"]
    lines += [
        f"{name}: {value}" for name, value in headers if name not in ("Transfer-Encoding", "Connection")
    ]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    answer = _exchange(fuzz_sidecar.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    assert answer.startswith(b"HTTP/1."), answer[:200]
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:600]  # the mock upstream answers 2xx/4xx: any 5xx is the sidecar's
