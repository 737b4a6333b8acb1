"""The lean Redis transport (quota/resp.py) against real redis-server processes.

Pipelined replies come back to their own batch in order, error replies in place; a restarted Redis
costs at most one failed batch; a cancelled batch never lets its late replies reach another one; and
the store built on it still releases the lease of an admission whose caller went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from llmroute_sidecar.quota import redis as redis_store
from llmroute_sidecar.quota.base import LimitCheck
from llmroute_sidecar.quota.redis import RedisQuotaStore, connect, lean_pool
from llmroute_sidecar.quota.resp import RespPool, command
from tests.support.redis_procs import RedisServer
from tests.test_quota_redis import request


@pytest.fixture
async def pool(redis_server: RedisServer) -> AsyncIterator[RespPool]:
    lean = RespPool("127.0.0.1", redis_server.port, connect_timeout=2.0)
    try:
        yield lean
    finally:
        await lean.close()


def test_command_is_resp() -> None:
    assert command(b"SET", "k", 12) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert command("GET", "é") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"


async def test_pipelined_replies_come_back_in_order(pool: RespPool) -> None:
    payload = b"".join(command(b"INCR", b"n") for _ in range(50)) + command(b"GET", b"n")
    replies = await pool.execute(payload, 51)
    assert replies == [*range(1, 51), b"50"]
    assert pool.connections == 1  # given back and reused below


async def test_concurrent_batches_each_get_their_own_replies(pool: RespPool) -> None:
    async def batch(name: str, size: int) -> list[object]:
        payload = b"".join(command(b"RPUSH", name, i) for i in range(size))
        return await pool.execute(payload + command(b"LRANGE", name, 0, -1), size + 1)

    results = await asyncio.gather(*(batch(f"list{n}", 5 + n) for n in range(8)))
    for n, replies in enumerate(results):
        size = 5 + n
        assert replies[:size] == list(range(1, size + 1))
        assert replies[size] == [b"%d" % i for i in range(size)]
    assert pool.connections <= 8


async def test_error_replies_stay_in_place(pool: RespPool) -> None:
    payload = (
        command(b"SET", b"s", b"text")
        + command(b"INCR", b"s")  # wrong type: an error for this command only
        + command(b"EVALSHA", b"0" * 40, 0)
        + command(b"GET", b"s")
    )
    ok, wrong, missing, value = await pool.execute(payload, 4)
    assert ok == b"OK" and value == b"text"
    assert isinstance(wrong, ResponseError) and not isinstance(wrong, NoScriptError)
    assert isinstance(missing, NoScriptError)
    assert (await pool.execute(command(b"PING"), 1)) == [b"PONG"]  # the connection is still fine


async def test_a_restarted_redis_costs_at_most_one_failed_batch(
    pool: RespPool, redis_server: RedisServer
) -> None:
    assert await pool.execute(command(b"SET", b"k", b"1"), 1) == [b"OK"]
    redis_server.restart()
    failures = 0
    for _ in range(2):
        try:
            assert await pool.execute(command(b"PING"), 1) == [b"PONG"]
            break
        except RedisConnectionError:
            failures += 1
            pool.forget_idle()
    assert failures <= 1
    assert await pool.execute(command(b"GET", b"k"), 1) == [None]  # a new server (no persistence)


async def test_a_killed_redis_fails_with_a_connection_error(
    pool: RespPool, redis_server: RedisServer
) -> None:
    await pool.execute(command(b"PING"), 1)
    redis_server.kill()
    with pytest.raises(RedisConnectionError):
        await pool.execute(command(b"PING"), 1)
    assert pool.connections == 0


async def test_a_cancelled_batch_closes_its_connection(pool: RespPool) -> None:
    """Its late reply never reaches the next batch: that one runs on a fresh connection."""
    slow = asyncio.create_task(pool.execute(command(b"BLPOP", b"never", 1), 1))
    while pool.connections == 0:  # noqa: ASYNC110 -- the command is on the wire
        await asyncio.sleep(0)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert pool.connections == 0
    assert await pool.execute(command(b"ECHO", b"mine"), 1) == [b"mine"]


async def test_password_and_database_are_sent_on_connect() -> None:
    server = RedisServer(extra_args=("--requirepass", "s3cret"))
    try:
        server.start()
        lean = RespPool("127.0.0.1", server.port, 2.0, password="s3cret", db=3)
        try:
            await lean.execute(command(b"SET", b"k", b"v"), 1)
        finally:
            await lean.close()
        client = Redis(port=server.port, password="s3cret", db=3)
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()
        wrong = RespPool("127.0.0.1", server.port, 2.0, password="nope")
        with pytest.raises(RedisConnectionError):
            await wrong.execute(command(b"PING"), 1)
        await wrong.close()
    finally:
        server.cleanup()


def test_only_a_standalone_tcp_redis_gets_the_lean_transport() -> None:
    assert lean_pool(connect("redis://127.0.0.1:6379/2")) is not None
    assert lean_pool(connect("rediss://127.0.0.1:6379")) is None
    assert lean_pool(RedisCluster.from_url("redis://127.0.0.1:6379")) is None


async def test_the_store_reloads_scripts_a_restarted_redis_lost(redis_server: RedisServer) -> None:
    store = RedisQuotaStore.from_url(redis_server.url)
    try:
        check = LimitCheck("rpm", "route", requests_per_minute=100)
        assert (await store.admit(request(check))).admitted
        redis_server.restart()  # no scripts, no keys
        assert (await store.admit(request(check))).admitted
        assert (await store.admit(request(check))).admitted
        assert store._lean is not None and store._lean.connections <= redis_store.WORKERS
    finally:
        await store.close()
