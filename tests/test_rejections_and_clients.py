"""Who is limited and who spends: ``/rejections`` on the admin port and ``llmroute_client_tokens_total``.

Real sidecar processes in front of the mock upstream; pure tests of the bounded client label.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp

from llmroute_sidecar.client_tokens import ANONYMOUS, OTHER_CLIENT, ClientTokens
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.recent import RecentRejections
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, http_get, start, wait_for
from tests.test_sidecar_proxy import CHAT, chat_body, write_route

KEYS = {"sk-free-one": "free", "sk-premium": "premium"}


def key_route(tmp_path: Path, mock: MockUpstream) -> tuple[Path, Path]:
    secrets = tmp_path / "secrets"
    keys = secrets / "client-keys"
    keys.mkdir(parents=True)
    for key, tier in KEYS.items():
        (keys / hashlib.sha256(key.encode()).hexdigest()).write_text(tier)
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        identity={"keysSecretRef": {"name": "client-keys"}},
        tiers={
            "free": {"requestsPerMinute": 1, "tokensPerMinute": 100_000},
            "premium": {"requestsPerMinute": 100},
        },
        limits=[{"name": "per-key", "key": "apiKey", "requestsPerMinute": 5, "tokensPerMinute": 100_000}],
    )
    return route, secrets


async def send(session: aiohttp.ClientSession, url: str, key: str, **body: object) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}{CHAT}", json={**chat_body(), **body}, headers=headers) as response:
        await response.read()
        return response.status


async def test_rejections_endpoint_names_limit_client_and_retry(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route, secrets = key_route(tmp_path, mock)
    sidecar = start(sidecars, route, "--secrets-dir", str(secrets))
    async with aiohttp.ClientSession() as session:
        assert await send(session, sidecar.url, "sk-free-one") == 200
        assert await send(session, sidecar.url, "sk-free-one") == 429  # free: 1 a minute
        # A request that can never fit the 100,000 tokens a minute: 400, and remembered as such.
        assert await send(session, sidecar.url, "sk-premium", max_tokens=200_000) == 400
    status, body = http_get(f"{sidecar.admin}/rejections")
    assert status == 200
    answer = json.loads(body)
    assert answer["route"] == "tests/t"
    never, limited = answer["rejections"]  # newest first
    assert (limited["limit"], limited["dimension"], limited["client"], limited["status"]) == (
        "per-key",
        "requestsPerMinute",
        "free",
        429,
    )
    assert 0 < limited["retry_after_seconds"] <= 60 and limited["request_id"]
    assert (never["dimension"], never["client"], never["status"], never["retry_after_seconds"]) == (
        "tokensPerMinute",
        "premium",
        400,
        None,
    )
    assert not any(key in body for key in KEYS)


async def test_tokens_are_counted_per_client(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route, secrets = key_route(tmp_path, mock)
    sidecar = start(sidecars, route, "--secrets-dir", str(secrets))
    async with aiohttp.ClientSession() as session:
        assert [await send(session, sidecar.url, "sk-premium") for _ in range(3)] == [200] * 3
        assert await send(session, sidecar.url, "sk-free-one", stream=True) == 200
    premium = sidecar.metric("llmroute_client_tokens_total", client="premium")
    free = sidecar.metric("llmroute_client_tokens_total", client="free")
    records = wait_for(lambda: len(sidecar.access_records()) >= 4 and sidecar.access_records())
    by_tier: dict[str, int] = {}
    for record in records:
        by_tier[record["client"]] = by_tier.get(record["client"], 0) + (record["tokens_actual"] or 0)
    assert premium == by_tier["premium"] > 0 and free == by_tier["free"] > 0


def test_client_labels_are_bounded_per_route() -> None:
    metrics = SidecarMetrics()
    counter = ClientTokens(metrics, max_clients=2)
    for client in ("a", "b", "c", "d", None):
        counter.count("ns/r", client, 10)
    counter.count("ns/other", "c", 5)  # another route has its own bound
    counter.count("ns/r", "a", 0)  # nothing used: nothing counted

    def value(route: str, client: str) -> float:
        return metrics.client_tokens_total.labels(route, client)._value.get()

    assert [value("ns/r", c) for c in ("a", "b", OTHER_CLIENT, ANONYMOUS)] == [10, 10, 20, 10]
    assert value("ns/other", "c") == 5


def test_the_rejection_ring_keeps_the_newest() -> None:
    ring = RecentRejections(kept=3)
    for n in range(5):
        ring.record(f"r{n}", "l", "requestsPerMinute", "route", None, 429, 1.0)
    assert [entry["request_id"] for entry in ring.newest_first()] == ["r4", "r3", "r2"]
