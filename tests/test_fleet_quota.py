"""Fleet-wide quotas with real processes: several sidecars, one Redis, limits held together.

Load here is bounded (at most 1,000 requests per test), loopback only, and every process is stopped
by its fixture.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from redis import Redis

from tests.support.redis_procs import RedisCluster, RedisServer, command
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, free_port, hold_stream, wait_for
from tests.test_sidecar_proxy import CHAT, chat_body, write_route

pytestmark = pytest.mark.slow
FLEET = 4
TOTAL = 1000


def start_fleet(
    started: list[SidecarProcess],
    route: Path,
    *extra: str,
    count: int = FLEET,
    env: dict[str, str] | None = None,
) -> list[SidecarProcess]:
    fleet = [SidecarProcess(route, *extra, env=env) for _ in range(count)]
    started.extend(fleet)
    return fleet


async def fire(
    fleet: list[SidecarProcess], total: int, path: str = CHAT, stream: bool = False
) -> Counter[int]:
    """``total`` concurrent requests spread round-robin over the fleet; the status codes seen."""
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> int:
            target = fleet[index % len(fleet)]
            async with session.post(f"{target.url}{path}", json=chat_body(stream=stream)) as response:
                await response.read()
                return response.status

        return Counter(await asyncio.gather(*(one(i) for i in range(total))))


async def test_four_sidecars_share_one_limit_exactly(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "fleet", "requestsPerMinute": 100}])
    fleet = start_fleet(sidecars, route, "--redis", redis_server.url)
    statuses = await fire(fleet, TOTAL)
    assert statuses == Counter({200: 100, 429: TOTAL - 100})


async def test_per_pod_limiting_admits_n_times_the_limit(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    """The baseline the product exists to fix: per-process limiters admit FLEET x the limit."""
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "fleet", "requestsPerMinute": 100}])
    fleet = start_fleet(sidecars, route, "--store", "memory")
    statuses = await fire(fleet, TOTAL)
    assert statuses[200] == 100 * FLEET


@pytest.mark.cluster
async def test_exact_on_a_redis_cluster(
    tmp_path: Path, mock: MockUpstream, redis_cluster: RedisCluster, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        limits=[
            {"name": "fleet", "requestsPerMinute": 100},
            {"name": "tenant", "key": "header:X-Tenant", "requestsPerMinute": 1000, "whenMissing": "shared"},
        ],
    )
    url = redis_cluster.url.replace("redis://", "redis+cluster://", 1)
    fleet = start_fleet(sidecars, route, "--redis", url)
    statuses = await fire(fleet, TOTAL)
    assert statuses == Counter({200: 100, 429: TOTAL - 100})
    keys = [k for node in redis_cluster.nodes for k in command(node.port, "KEYS", "llmr:*").split()]
    slots = {command(redis_cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip() for key in keys}
    assert len(keys) >= 3 and len(slots) == 1  # every key of the route in one slot: atomic admissions


async def test_killed_sidecar_loses_its_leases_after_expiry(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml", mock.url, deadlineSeconds=1, limits=[{"name": "conc", "concurrentRequests": 2}]
    )
    env = {"LLMROUTE_LEASE_MARGIN_SECONDS": "0.5"}
    victim, survivor = start_fleet(sidecars, route, "--redis", redis_server.url, count=2, env=env)
    async with aiohttp.ClientSession() as session:
        held = [await hold_stream(session, victim.url) for _ in range(2)]
        async with session.post(f"{survivor.url}{CHAT}", json=chat_body()) as response:
            assert response.status == 429
        victim.proc.send_signal(signal.SIGKILL)  # no cleanup runs in a killed pod
        victim.wait_exit(10)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with session.post(f"{survivor.url}{CHAT}", json=chat_body()) as response:
                await response.read()
                if response.status == 200:
                    break
            assert asyncio.get_running_loop().time() < deadline, "a dead pod's leases never expired"
            await asyncio.sleep(0.1)
        for response in held:
            response.close()


async def test_aborted_streams_leak_no_slots(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "conc", "concurrentRequests": 1000}])
    fleet = start_fleet(
        sidecars, route, "--redis", redis_server.url, count=2, env={"LLMROUTE_HEARTBEAT_SECONDS": "0.05"}
    )
    connector = aiohttp.TCPConnector(limit=0)
    client = Redis.from_url(redis_server.url)

    def slots_held() -> int:
        return sum(client.zcard(k) for k in client.keys("*conc*"))  # an empty sorted set is no key

    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            first = await hold_stream(session, fleet[0].url)
            assert slots_held() == 1  # a held stream holds its slot in Redis
            first.close()

            async def abort(index: int) -> None:
                response = await hold_stream(session, fleet[index % 2].url)
                response.close()

            for batch in range(5):
                await asyncio.gather(*(abort(batch * 200 + i) for i in range(200)))
        wait_for(lambda: slots_held() == 0, timeout=30, what="every slot released")
    finally:
        client.close()
    for sidecar in fleet:
        assert sidecar.metric("llmroute_client_disconnects_total") > 0


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_redis_killed_mid_load(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    sidecars: list[SidecarProcess],
    policy: str,
) -> None:
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        onStoreFailure=policy,
        limits=[{"name": "l", "requestsPerMinute": 1000}],
    )
    fleet = start_fleet(sidecars, route, "--redis", redis_server.url, count=2, env={"LLMROUTE_REPLICAS": "2"})
    before = await fire(fleet, 100)
    assert before == Counter({200: 100})
    redis_server.kill()
    during = await fire(fleet, 200)
    assert 500 not in during
    if policy == "allow":
        assert during[200] > 0 and set(during) <= {200, 429}
        assert sum(s.metric("llmroute_store_fallback_total") for s in fleet) > 0
    else:
        assert during == Counter({503: 200})
        wait_for(lambda: all(s.readyz()[0] == 503 for s in fleet), what="not ready under deny")
    redis_server.restart()
    wait_for(lambda: all(s.readyz()[0] == 200 for s in fleet), timeout=10, what="ready after Redis returned")
    after = await fire(fleet, 50)
    assert after == Counter({200: 50})
    assert sum(s.metric("llmroute_store_errors_total") for s in fleet) > 0


async def test_cancelled_stream_settles_what_was_streamed(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(tmp_path / "r.yaml", mock.url, limits=[{"name": "tpm", "tokensPerMinute": 100000}])
    (sidecar,) = start_fleet(
        sidecars, route, "--redis", redis_server.url, count=1, env={"LLMROUTE_HEARTBEAT_SECONDS": "0.05"}
    )
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url, max_tokens=500)
        await held.content.readuntil(b"\n\n")
        held.close()
        record = await sidecar.record(lambda r: r.get("msg") == "access" and r.get("client_disconnected"))
    client = Redis.from_url(redis_server.url)
    try:
        (charges,) = [k for k in client.keys("*tpm:c")]
        # Settlement runs in the background, just after the access line: poll for it.
        settled = lambda: int(client.hget(charges, "_total") or 0) == record["tokens_actual"]  # noqa: E731
        wait_for(settled, timeout=5, what="settlement replaced the reservation")
    finally:
        client.close()
    assert record["tokens_reserved"] > 500  # prompt estimate + max_tokens was reserved
    assert 0 < record["tokens_actual"] < 20  # the prompt and the one word streamed


async def test_unreachable_store_under_deny_is_not_ready_from_the_start(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess]
) -> None:
    route = write_route(
        tmp_path / "r.yaml", mock.url, onStoreFailure="deny", limits=[{"name": "l", "requestsPerMinute": 5}]
    )
    (sidecar,) = start_fleet(sidecars, route, "--redis", f"redis://127.0.0.1:{free_port()}/0", count=1)
    _, body = wait_for(lambda: (r := sidecar.readyz())[0] == 503 and r, what="not ready without its store")
    assert body["storeAvailable"] is False and any("quota store" in reason for reason in body["reasons"])
