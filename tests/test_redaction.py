"""No client credential in any log line or error body: canary keys sent in malformed requests."""

from __future__ import annotations

import io
import json
import logging
import socket
from pathlib import Path

from llmroute_sidecar.accesslog import configure_logging, redact
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, start
from tests.test_sidecar_proxy import write_route

CANARY = "sk-canary0123456789abcdef"


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def test_redact_masks_header_values_bearer_tokens_and_sk_keys() -> None:
    for text in (
        f"b'Authorization: Bearer {CANARY}\\x00zz'",
        f"x-api-key: {CANARY}",
        f"Cookie: session={CANARY}",
        f'{{"authorization": "Bearer {CANARY}"}}',
        f"token {CANARY} here",
    ):
        assert CANARY not in redact(text) and "canary" not in redact(text), text
    assert redact("GET /v1/models HTTP/1.1") == "GET /v1/models HTTP/1.1"


def test_root_handler_redacts_library_records_and_exception_text() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        raise ValueError(f"Authorization: Bearer {CANARY}")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("bad line %s", f"api-key: {CANARY}")
    configure_logging("INFO")
    out = stream.getvalue()
    assert "[REDACTED]" in out and CANARY not in out
    assert json.loads(out.splitlines()[-1])["logger"] == "aiohttp.server"


def test_malformed_requests_never_echo_or_log_the_key(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    sidecar = start(sidecars, write_route(tmp_path / "r.yaml", mock.url))
    attempts = [
        b"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + CANARY.encode() + b"\x00zz\r\n\r\n",
        b"GET /x HTTP/1.1\nHost: x\nAuthorization: Bearer " + CANARY.encode() + b"\n\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nx-api-key: " + CANARY.encode() + b"\x01\r\n\r\n",
        b"GET /x\x00 HTTP/1.1\r\nAuthorization: Bearer " + CANARY.encode() + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nCookie: "
        + CANARY.encode()
        + b"\r\nAuthorization: Bearer "
        + CANARY.encode()
        + b"\r\nConnection: close\r\n\r\n{bad}",
    ]
    for data in attempts:
        answer = raw_exchange(sidecar.port, data)
        assert answer.startswith(b"HTTP/1."), answer
        assert CANARY.encode() not in answer and b"canary" not in answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"application/json" in head
        assert json.loads(body)["error"]["code"]
    sidecar.wait_record(lambda r: r.get("msg") == "unparsable request")
    sidecar.stop()
    assert "canary" not in sidecar.output()
