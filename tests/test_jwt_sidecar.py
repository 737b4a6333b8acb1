"""identity.jwt with real processes: sidecars, a real redis-server, the mock upstream and a JWKS served
on loopback; tokens signed here with keys generated here. Key rotation without a restart, tiers from a
claim, a claim-keyed limit exact across two sidecars, and no raw token or claim value in Redis or logs.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.jwks_server import JwksServer
from tests.support.jwt_keys import AUDIENCE, ISSUER, SigningKey, jwks
from tests.support.redis_procs import RedisServer, command
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, start
from tests.test_docs_commands import ROOT, Command, Session, shell_blocks
from tests.test_sidecar_proxy import CHAT, chat_body, write_route

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    return SigningKey("key-1", "ES256")


@pytest.fixture
def jwks_server(signing_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(jwks(signing_key)).start()
    try:
        yield server
    finally:
        server.stop()


def jwt_route(tmp_path: Path, upstream: str, jwks_url: str, **jwt: Any) -> Path:
    return write_route(
        tmp_path / "route.yaml",
        upstream,
        identity={
            "jwt": {
                "issuer": ISSUER,
                "audience": [AUDIENCE],
                "jwksUrl": jwks_url,
                "tierClaim": "plan",
                "jwksMinRefreshSeconds": 1,
                **jwt,
            },
            "defaultTier": "free",
        },
        tiers={"free": {"requestsPerMinute": 3}, "pro": {"requestsPerMinute": 8}},
        limits=[
            {"name": "per-client", "key": "apiKey"},
            {"name": "per-org", "key": "claim:org_id", "requestsPerMinute": 10, "whenMissing": "shared"},
        ],
    )


async def send(
    session: aiohttp.ClientSession, sidecar: SidecarProcess, token: str | None
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with session.post(f"{sidecar.url}{CHAT}", json=chat_body(), headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_rotation_is_picked_up_without_a_restart(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    jwks_server: JwksServer,
    signing_key: SigningKey,
    sidecars: list[SidecarProcess],
) -> None:
    route = jwt_route(tmp_path, mock.url, jwks_server.url)
    sidecar = start(sidecars, route, "--redis", redis_server.url)
    old_token = signing_key.token(plan="pro", org_id="o1")
    rotated = SigningKey("key-2", "RS256")
    async with aiohttp.ClientSession() as session:
        status, body, _ = await send(session, sidecar, old_token)
        assert status == 200, body
        jwks_server.publish(jwks(rotated))  # the provider rotates: key-2 published, key-1 removed
        deadline = time.monotonic() + 15
        while True:  # key-2 is unknown until a (rate-limited, 1 s) refresh fetches the new set
            status, body, _ = await send(session, sidecar, rotated.token(plan="pro", org_id="o1"))
            if status == 200 or time.monotonic() > deadline:
                break
            assert body["error"]["code"] == "unknown_key_id", body
            await asyncio.sleep(0.1)
        assert status == 200, body
        status, body, headers = await send(session, sidecar, old_token)
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        401,
        "unknown_key_id",
        "authentication_error",
    )
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert sidecar.alive
    loads = [r for r in sidecar.records() if r.get("msg") == "jwks loaded"]
    assert [r["kids"] for r in loads][-1] == ["key-2"] and loads[-1]["reason"] == "unknown_kid"


async def test_error_codes_end_to_end_and_tiers_from_the_claim(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    jwks_server: JwksServer,
    signing_key: SigningKey,
    sidecars: list[SidecarProcess],
) -> None:
    route = jwt_route(tmp_path, mock.url, jwks_server.url)
    sidecar = start(sidecars, route, "--redis", redis_server.url)
    cases = {
        "token_expired": signing_key.token(lifetime=-300),
        "invalid_issuer": signing_key.token(iss="https://other.test/"),
        "invalid_audience": signing_key.token(aud="other"),
        "invalid_signature": SigningKey("key-1", "ES256").token(),
        "malformed_token": "not-a-jwt-and-no-key-secret",
        "missing_api_key": None,
    }
    async with aiohttp.ClientSession() as session:
        for code, token in cases.items():
            status, body, _ = await send(session, sidecar, token)
            assert (status, body["error"]["code"]) == (401, code), body
            assert set(body) == {"error", "request_id"} and body["error"]["param"] is None
        free = [
            await send(session, sidecar, signing_key.token(sub="f", plan="free", org_id="o1"))
            for _ in range(5)
        ]
        pro = [
            await send(session, sidecar, signing_key.token(sub="p", plan="pro", org_id="o2"))
            for _ in range(10)
        ]
    assert [s for s, _, _ in free] == [200] * 3 + [429] * 2  # the free tier's 3 per minute
    assert [s for s, _, _ in pro] == [200] * 8 + [429] * 2  # the pro tier's 8 per minute
    assert free[3][1]["error"]["code"] == "requests_per_minute_exceeded"
    assert free[3][2]["X-RateLimit-Scope"] == "per-client/requestsPerMinute"


async def test_a_claim_keyed_limit_is_exact_across_two_sidecars_and_nothing_raw_leaks(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    jwks_server: JwksServer,
    signing_key: SigningKey,
    sidecars: list[SidecarProcess],
) -> None:
    route = jwt_route(tmp_path, mock.url, jwks_server.url)
    fleet = [start(sidecars, route, "--redis", redis_server.url) for _ in range(2)]
    # 30 clients of org acme (each within its own tier limit), 5 of org globex, all concurrent
    acme = [signing_key.token(sub=f"acme-user-{i}", plan="pro", org_id="acme-org") for i in range(30)]
    globex = [signing_key.token(sub=f"globex-user-{i}", plan="pro", org_id="globex-org") for i in range(5)]
    async with aiohttp.ClientSession() as session:

        async def one(index: int, token: str) -> int:
            status, _, _ = await send(session, fleet[index % 2], token)
            return status

        acme_seen, globex_seen = await asyncio.gather(
            asyncio.gather(*(one(i, t) for i, t in enumerate(acme))),
            asyncio.gather(*(one(i, t) for i, t in enumerate(globex))),
        )
    assert Counter(acme_seen) == {200: 10, 429: 20}  # per-org: 10 per minute for the whole fleet
    assert Counter(globex_seen) == {200: 5}
    assert all(sidecar.alive for sidecar in fleet)
    keys = command(redis_server.port, "KEYS", "*")
    assert "per-org" in keys and "per-client" in keys
    logs = "\n".join(sidecar.output() for sidecar in fleet)
    for raw in ("acme-org", "acme-user-1", acme[0].split(".")[1], acme[0]):
        assert raw not in keys and raw not in logs


def test_the_worked_example_in_the_docs_runs_as_written(tmp_path: Path, mock: MockUpstream) -> None:
    """docs/sidecar.md's JWT worked example: its Python mints a key and token, its commands use them."""
    doc = (ROOT / "docs" / "sidecar.md").read_text(encoding="utf-8")
    section = doc[doc.index("### Worked example: a JWT route by hand") :]
    mint = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert mint is not None
    done = subprocess.run(
        [sys.executable, "-c", mint.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    token = (tmp_path / "jwt-demo" / "token").read_text()
    (commands,) = [cs for _, cs in shell_blocks() if any("jwt-demo" in c.text for c in cs)]
    session = Session()
    session.ports["8000"] = mock.url.rsplit(":", 1)[1]
    try:
        sidecar, curl = commands
        session.run(Command(sidecar.source, sidecar.text.replace("jwt-demo", str(tmp_path / "jwt-demo"))))
        answers = {
            credential: json.loads(
                session.run(Command(curl.source, curl.text.replace("$(cat jwt-demo/token)", credential)))
                or "{}"
            )
            for credential in (token, "demo-batch-key", SigningKey("demo-1", "ES256").token())
        }
    finally:
        session.stop()
    assert answers[token]["choices"] and answers["demo-batch-key"]["choices"]
    forged = list(answers.values())[2]
    assert forged["error"]["code"] == "invalid_signature"  # another key reusing the kid
