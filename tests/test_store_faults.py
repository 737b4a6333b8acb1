"""The quota store under bursts and faults, with real redis-server and sidecar processes.

Bursts of up to 1,000 concurrent requests on loopback (aiohttp client, bounded), Redis killed,
restarted idle and under load, paused with SIGSTOP. 5xx answers are counted by origin (the body's
error code): never a sidecar 500, never ``store_unavailable`` while Redis answers PING, and every
lease of 1,000 open streams lives in Redis, not in the local fallback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis import Redis

from llmroute_sidecar.api.spec import Readiness, StoreFailurePolicy
from llmroute_sidecar.health import HealthState, readiness_reasons
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.quota import redis as redis_store
from llmroute_sidecar.quota.base import LimitCheck, StoreState, StoreUnavailableError
from llmroute_sidecar.quota.batching import StoreBusyError
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.quota.redis import OPERATION_TIMEOUT, RedisQuotaStore
from llmroute_sidecar.settlement import Settler
from tests.support.redis_procs import RedisServer, ping
from tests.support.redis_store import record_batches, redis_quota_store  # noqa: F401 (fixture)
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, hold_stream, start, wait_for
from tests.test_quota_redis import request
from tests.test_sidecar_proxy import CHAT, chat_body, write_route

TENANT = "X-Tenant-ID"
PER_TENANT = [
    {"name": "tenant", "key": f"header:{TENANT}", "requestsPerMinute": 100, "concurrentRequests": 4}
]


async def burst(
    url: str, total: int, tenant: str = "t", stream: bool = False, headers: dict[str, str] | None = None
) -> Counter[str]:
    """``total`` concurrent requests, each its own tenant; outcomes as ``status`` or ``status:code``."""
    connector = aiohttp.TCPConnector(limit=total)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int) -> str:
            sent = {TENANT: f"{tenant}-{index}", **(headers or {})}
            async with session.post(url + CHAT, json=chat_body(stream=stream), headers=sent) as response:
                body = await response.read()
                if response.status < 500:
                    return str(response.status)
                try:
                    code = (await response.json(content_type=None))["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = body[:60].decode(errors="replace")
                return f"{response.status}:{code}"

        return Counter(await asyncio.gather(*(one(i) for i in range(total))))


def store_log(sidecar: SidecarProcess) -> list[str]:
    """The sidecar's store state changes and errors, for assertion messages."""
    return [line for line in sidecar.output().splitlines() if "llmroute.quota" in line or "Traceback" in line]


def sidecar_500s(outcomes: Counter[str]) -> int:
    return sum(n for outcome, n in outcomes.items() if outcome.startswith("500"))


def concurrency_slots(client: Redis) -> int:
    return sum(int(client.zcard(key)) for key in client.keys("*:conc"))


def slots_at(url: str) -> int:
    client = Redis.from_url(url)
    try:
        return concurrency_slots(client)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def redis_sidecar(
    tmp_path: Path, mock: MockUpstream, redis: RedisServer, sidecars: list[SidecarProcess], **spec: Any
) -> SidecarProcess:
    route = write_route(tmp_path / "r.yaml", mock.url, **{"limits": PER_TENANT, **spec})
    return start(sidecars, route, "--redis", redis.url)


# -- the store itself -----------------------------------------------------------------------------


async def test_concurrent_admissions_share_round_trips_and_stay_exact(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(store, monkeypatch)
    check = LimitCheck("rpm", "route", requests_per_minute=150)
    decisions = await asyncio.gather(*(store.admit(request(check)) for _ in range(400)))
    assert sum(d.admitted for d in decisions) == 150  # batching changes nothing about exactness
    assert sum(sizes) == 400 and len(sizes) <= 400 // redis_store.MAX_BATCH + redis_store.WORKERS
    assert max(sizes) <= redis_store.MAX_BATCH
    assert store.state is StoreState.UP


async def test_a_dead_pooled_connection_is_retried_once_on_a_fresh_one(
    store: RedisQuotaStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    await asyncio.gather(*(store.admit(request(check)) for _ in range(50)))  # several pooled connections
    redis_server.restart()
    sizes = record_batches(store, monkeypatch)
    assert (await store.admit(request(check))).admitted  # no StoreUnavailableError after the restart
    assert store.state is StoreState.UP
    assert 1 <= len(sizes) <= 2  # at most the one retry


async def test_every_exception_out_of_redis_py_is_a_store_failure(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    async def broken(batch: list[Any]) -> list[Any]:
        attempts.append(len(batch))
        raise AttributeError("'NoneType' object has no attribute 'writelines'")  # what issue 13.2 saw

    monkeypatch.setattr(store, "_evalsha", broken)
    with pytest.raises(StoreUnavailableError):
        await store.admit(request(LimitCheck("rpm", "route", requests_per_minute=5)))
    assert attempts == [1, 1]  # the first attempt and one retry on a fresh connection
    assert store.state is StoreState.DOWN
    with pytest.raises(StoreUnavailableError):  # paused: fails at once, Redis is not asked
        await store.admit(request(LimitCheck("rpm", "route", requests_per_minute=5)))
    assert attempts == [1, 1]


async def test_an_operation_past_its_queue_budget_is_busy_not_down(
    store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "QUEUE_BUDGET_SECONDS", -1.0)  # every operation is already late
    busy: list[bool] = []
    store.watch(lambda state: None, lambda: busy.append(True))
    with pytest.raises(StoreBusyError):
        await store.admit(request(LimitCheck("rpm", "route", requests_per_minute=5)))
    assert store.state is StoreState.BUSY and store.available and busy == [True]
    monkeypatch.setattr(redis_store, "QUEUE_BUDGET_SECONDS", 5.0)
    assert (await store.admit(request(LimitCheck("rpm", "route", requests_per_minute=5)))).admitted
    assert store.state is StoreState.UP


async def test_a_paused_redis_fails_after_one_attempt(
    store: RedisQuotaStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 9.12: no answer → the store gives up after one operation timeout, without a retry."""
    check = LimitCheck("rpm", "route", requests_per_minute=100)
    assert (await store.admit(request(check))).admitted
    sizes = record_batches(store, monkeypatch)
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailableError):
            await store.admit(request(check))
        assert sizes == [1]  # one attempt: a timeout is never retried
        assert store.state is StoreState.DOWN
        assert not await store.ping()
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    assert await store.ping() and store.state is StoreState.UP


async def test_an_admission_whose_caller_went_away_releases_its_slot(
    store: RedisQuotaStore, redis_server: RedisServer
) -> None:
    assert store._lean is not None  # a standalone redis://: the lean transport (quota/resp.py)
    check = LimitCheck("l", "route", requests_per_minute=10, concurrent_requests=5)
    task = asyncio.create_task(store.admit(request(check)))
    while store._batcher.in_flight == 0:  # noqa: ASYNC110 -- the admission is on the wire
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    client = Redis.from_url(redis_server.url)
    try:
        admitted = lambda: sum(int(client.zcard(k)) for k in client.keys("*:rpm")) == 1  # noqa: E731
        await asyncio.to_thread(wait_for, admitted, 5, what="the admission ran in Redis")
        await asyncio.to_thread(wait_for, lambda: concurrency_slots(client) == 0, 5, what="slot released")
    finally:
        client.close()


class FlakyStore(MemoryQuotaStore):
    """A memory store whose first ``failures`` settlements fail like an unreachable Redis."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.settled = 0

    async def settle(self, lease: Any, actual_tokens: int, actual_cost: int | None = None) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailableError("down")
        self.settled += 1
        await super().settle(lease, actual_tokens, actual_cost)


async def admitted_lease(store: MemoryQuotaStore) -> Any:
    decision = await store.admit(request(LimitCheck("conc", "route", concurrent_requests=2)))
    assert decision.lease is not None
    return decision.lease


async def test_the_settler_retries_in_the_background_and_counts_once() -> None:
    metrics = SidecarMetrics()
    settler = Settler(metrics)
    store = FlakyStore(failures=3)
    settler.submit(store, await admitted_lease(store), 0)  # returns at once
    assert store.settled == 0 and settler.pending == 1
    assert await settler.drain(10)
    assert store.settled == 1 and settler.pending == 0
    assert metrics.store_errors_total.labels("ns/r", "settle")._value.get() == 1
    assert metrics.settlements_lost_total.labels("ns/r")._value.get() == 0
    await settler.close()


async def test_the_settler_never_loses_a_settlement_silently() -> None:
    metrics = SidecarMetrics()
    settler = Settler(metrics, give_up_seconds=0.0)
    store = FlakyStore(failures=100)
    settler.submit(store, await admitted_lease(store), 0)
    assert await settler.drain(10)  # given up on after its first failure
    pending = Settler(metrics)
    pending.submit(store, await admitted_lease(store), 0)
    assert not await pending.drain(0.2)  # still retrying
    await pending.close()  # shutdown: what is still pending is counted
    assert metrics.settlements_lost_total.labels("ns/r")._value.get() == 2


def test_only_a_down_store_makes_the_pod_not_ready_under_deny() -> None:
    rules = Readiness()
    busy = HealthState(store_available=False, store_state="busy")
    down = HealthState(store_state="down")
    assert not readiness_reasons(busy, rules, StoreFailurePolicy.DENY)
    assert any("quota store" in r for r in readiness_reasons(down, rules, StoreFailurePolicy.DENY))
    assert not readiness_reasons(down, rules, StoreFailurePolicy.ALLOW)


# -- bursts against a healthy Redis --------------------------------------------------------------


@pytest.mark.slow
async def test_a_burst_of_1000_never_makes_a_healthy_redis_look_down(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    """Issue 13.1: 1,000 concurrent tenants under deny were answered up to 698 ``store_unavailable``."""
    sidecar = redis_sidecar(
        tmp_path, mock, redis_server, sidecars, onStoreFailure="deny", readiness={"maxInFlight": 5000}
    )
    outcomes = await burst(sidecar.url, 1000)
    assert ping(redis_server.port) == "+PONG"
    assert outcomes == Counter({"200": 1000}), outcomes
    assert sidecar.metric("llmroute_store_errors_total") == 0
    assert sidecar.metric("llmroute_store_state") == 0  # up: never busy, never down
    assert sidecar.readyz()[1]["storeState"] == "up"


@pytest.mark.slow
async def test_1000_open_streams_hold_every_lease_in_redis(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    redis_client: Redis,
    sidecars: list[SidecarProcess],
) -> None:
    """Issue 13.1: with 1,000 open streams Redis held 4 leases, the rest lived in the local fallback."""
    limits = [{"name": "fleet", "concurrentRequests": 5000}]
    sidecar = redis_sidecar(
        tmp_path, mock, redis_server, sidecars, limits=limits, onStoreFailure="allow",
        readiness={"maxInFlight": 5000},
    )  # fmt: skip
    connector = aiohttp.TCPConnector(limit=1000)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        streams = await asyncio.gather(*(hold_stream(session, sidecar.url) for _ in range(1000)))
        try:
            assert all(s.status == 200 for s in streams)
            assert concurrency_slots(redis_client) == 1000  # every lease is in Redis
            assert sidecar.metric("llmroute_store_fallback_total") == 0
        finally:
            mock.release()
            bodies = await asyncio.gather(*(s.read() for s in streams))
    assert all(b"[DONE]" in body for body in bodies)
    wait_for(lambda: concurrency_slots(redis_client) == 0, timeout=10, what="every lease settled")
    assert sidecar.metric("llmroute_store_errors_total") == 0


# -- restarts -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_burst_right_after_an_idle_restart_is_admitted(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    """Issue 13.3: the first burst after Redis came back (idle) got 100 of 100 503s."""
    sidecar = redis_sidecar(tmp_path, mock, redis_server, sidecars, onStoreFailure="deny")
    assert await burst(sidecar.url, 100, tenant="warm") == Counter({"200": 100})  # the pool is warm
    for trial in range(3):
        # Idle: every settlement of the last burst has landed.
        await asyncio.to_thread(wait_for, lambda: slots_at(redis_server.url) == 0, 10, what="idle")
        redis_server.restart()  # kill -9 and start again, while the sidecar is idle
        assert ping(redis_server.port) == "+PONG"
        outcomes = await burst(sidecar.url, 100, tenant=f"after-{trial}")
        assert outcomes == Counter({"200": 100}), (trial, outcomes, store_log(sidecar))
    assert sidecar.metric("llmroute_store_errors_total", operation="admit") == 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_restarts_under_load_never_answer_500(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess], policy: str
) -> None:
    """Issue 13.2: disconnecting the shared pool under other requests gave 500 ``internal_error``."""
    sidecar = redis_sidecar(
        tmp_path, mock, redis_server, sidecars, onStoreFailure=policy, readiness={"maxInFlight": 5000}
    )
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load() -> None:
        wave = 0
        while not stop.is_set():
            outcomes.update(await burst(sidecar.url, 150, tenant=f"w{wave}"))
            wave += 1

    loader = asyncio.create_task(load())
    try:
        for _ in range(4):
            await asyncio.sleep(0.3)  # fault injection cadence, not synchronisation
            await asyncio.to_thread(redis_server.restart)
    finally:
        stop.set()
        await loader
    assert sidecar_500s(outcomes) == 0, outcomes
    assert sum(outcomes.values()) >= 300  # several waves ran across the restarts
    allowed = {"200", "429"} if policy == "allow" else {"200", "429", "503:store_unavailable"}
    assert set(outcomes) <= allowed, outcomes
    assert outcomes["200"] > 0
    # Redis answers again: so does every request, exactly limited.
    wait_for(lambda: sidecar.readyz()[1].get("storeState") == "up", timeout=10, what="store up again")
    assert await burst(sidecar.url, 100, tenant="after") == Counter({"200": 100})
    assert "Traceback" not in sidecar.output()


# -- Redis dies or stops answering: bounded detection -----------------------------------------------


async def test_a_request_right_after_redis_dies_is_not_delayed_by_settlement(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    redis_client: Redis,
    sidecars: list[SidecarProcess],
) -> None:
    """Issue 9.12 / 13.4: the next request on a keep-alive connection waited 2.8 s for a settlement.

    Settlement now runs in the background: the next request takes the failure policy after one
    attempt, and the failed settlement is retried until Redis is back (the slot is released).
    """
    limits = [{"name": "fleet", "requestsPerMinute": 1000, "concurrentRequests": 10}]
    sidecar = redis_sidecar(tmp_path, mock, redis_server, sidecars, limits=limits, onStoreFailure="allow")
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for both requests
    async with aiohttp.ClientSession(connector=connector) as session:
        held = await hold_stream(session, sidecar.url)
        assert concurrency_slots(redis_client) == 1
        redis_server.kill()
        mock.release()
        assert b"[DONE]" in await held.read()
        started = time.monotonic()
        async with session.post(sidecar.url + CHAT, json=chat_body()) as response:
            assert response.status == 200
            await response.read()
        took = time.monotonic() - started
    assert took < 1.5, f"the next request took {took:.2f}s"  # was 2.8 s: well under, whatever the load
    wait_for(
        lambda: sidecar.metric("llmroute_store_errors_total", operation="settle") == 1,
        what="the failed settlement counted",
    )
    assert sidecar.metric("llmroute_store_errors_total", operation="admit") == 1  # one attempt, then fallback
    assert sidecar.metric("llmroute_store_fallback_total") == 1
    # The settlement is retried in the background, not lost: the restarted Redis gets it.
    redis_server.start()
    await asyncio.to_thread(
        wait_for, lambda: sidecar.metric("llmroute_store_state") == 0, 10, what="store up again"
    )
    assert sidecar.metric("llmroute_settlements_lost_total") == 0


async def test_a_paused_redis_costs_one_operation_timeout_then_fails_fast(
    tmp_path: Path, mock: MockUpstream, redis_server: RedisServer, sidecars: list[SidecarProcess]
) -> None:
    """SIGSTOP: Redis accepts connections but never answers. One request pays one operation timeout
    (the store gives up after one attempt and the fallback admits it); the pod is down, not busy."""
    sidecar = redis_sidecar(tmp_path, mock, redis_server, sidecars, onStoreFailure="allow")
    async with aiohttp.ClientSession() as session:
        async with session.post(sidecar.url + CHAT, json=chat_body(), headers={TENANT: "a"}) as response:
            assert response.status == 200
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            async with session.post(sidecar.url + CHAT, json=chat_body(), headers={TENANT: "b"}) as response:
                assert response.status == 200
                request_id = response.headers["X-Request-ID"]
            record = await sidecar.record(
                lambda r: r.get("msg") == "access" and r["request_id"] == request_id
            )
            assert sidecar.metric("llmroute_store_errors_total", operation="admit") == 1
            assert sidecar.metric("llmroute_store_fallback_total") == 1
            # No answer for one operation timeout (plus loop-lag grace), then the policy: not seconds.
            assert record["duration_ms"] < OPERATION_TIMEOUT * 3 * 1000
            assert sidecar.metric("llmroute_store_state") == 2
            _, body = sidecar.readyz()
            assert body["storeState"] == "down" and body["storeAvailable"] is False
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
    await asyncio.to_thread(
        wait_for, lambda: sidecar.readyz()[1].get("storeState") == "up", 10, what="store up after SIGCONT"
    )
    assert await burst(sidecar.url, 20, tenant="c") == Counter({"200": 20})
    assert sidecar.metric("llmroute_store_fallback_total") == 1  # exact limiting resumed


async def test_stop_flushes_settlements_queued_while_redis_was_paused(
    tmp_path: Path,
    mock: MockUpstream,
    redis_server: RedisServer,
    redis_client: Redis,
    sidecars: list[SidecarProcess],
) -> None:
    """A settlement that failed in the background is flushed by SIGTERM before the store closes."""
    limits = [{"name": "fleet", "concurrentRequests": 10}]
    sidecar = redis_sidecar(tmp_path, mock, redis_server, sidecars, limits=limits, onStoreFailure="allow")
    async with aiohttp.ClientSession() as session:
        held = await hold_stream(session, sidecar.url)
        assert concurrency_slots(redis_client) == 1
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            mock.release()
            assert b"[DONE]" in await held.read()
            await asyncio.to_thread(
                wait_for,
                lambda: sidecar.metric("llmroute_store_errors_total", operation="settle") == 1,
                10,
                what="the settlement failed once",
            )
            sidecar.signal(signal.SIGTERM)
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
    assert await asyncio.to_thread(sidecar.wait_exit, 15) == 0
    assert concurrency_slots(redis_client) == 0  # released at shutdown, not at lease expiry
    assert "settlements lost" not in sidecar.output()


class ManyStore(MemoryQuotaStore):
    """A store that settles a round's leases together, recording each round's size."""

    def __init__(self, failing: int = 0) -> None:
        super().__init__()
        self.rounds: list[int] = []
        self.failing = failing

    async def settle_many(self, settlements: Any) -> list[Exception | None]:
        self.rounds.append(len(settlements))
        outcomes: list[Exception | None] = []
        for lease, tokens, cost in settlements:
            if self.failing:
                self.failing -= 1
                outcomes.append(StoreUnavailableError("down for this one"))
                continue
            await self.settle(lease, tokens, cost)
            outcomes.append(None)
        return outcomes


async def test_the_settler_coalesces_a_burst_into_one_round() -> None:
    metrics = SidecarMetrics()
    settler = Settler(metrics)
    store = ManyStore(failing=1)
    check = LimitCheck("conc", "route", concurrent_requests=100)
    leases = [(await store.admit(request(check))).lease for _ in range(30)]
    for lease in leases:  # requests ending in the same few milliseconds
        assert lease is not None
        settler.submit(store, lease, 0)
    assert await settler.drain(10)
    assert store.rounds == [30, 1]  # one round for the burst; the failed one retried alone
    assert (await store.admit(request(LimitCheck("conc", "route", concurrent_requests=1)))).admitted
    assert metrics.store_errors_total.labels("ns/r", "settle")._value.get() == 1
    await settler.close()
