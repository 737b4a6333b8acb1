"""The Redis fixtures are real: data round-trips, kill -9 crashes, restart reuses the port, clusters form."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import RedisCluster as ClusterClient

from tests.support.redis_procs import RedisCluster, RedisServer, command, require_redis_server


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_server_round_trip_kill_and_restart(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
        port, pid = redis_server.port, redis_server.pid
        assert pid is not None
        redis_server.kill()
        assert not redis_server.is_running
        assert_gone(pid)
        with pytest.raises(redis.ConnectionError):
            client.get("k")
        redis_server.restart()
        assert redis_server.is_running
        assert redis_server.port == port and redis_server.pid != pid
        assert client.get("k") is None  # no persistence: a restarted server starts empty
    finally:
        client.close()


async def test_async_client_round_trip(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert await client.incrby("n", 5) == 5
    finally:
        await client.aclose()


def test_stop_leaves_no_process(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    assert pid is not None
    with pytest.raises(RuntimeError, match="already running"):
        redis_server.start()  # would orphan the running process
    redis_server.stop()
    assert not redis_server.is_running
    assert_gone(pid)
    redis_server.stop()  # idempotent


def test_context_manager_cleans_up() -> None:
    with RedisServer() as server:
        assert redis.Redis(port=server.port).ping()
        pid, directory = server.pid, server.dir
    assert pid is not None
    assert_gone(pid)
    assert not directory.exists()


def test_factory_gives_distinct_servers(redis_server_factory: Callable[[], RedisServer]) -> None:
    first, second = redis_server_factory(), redis_server_factory()
    assert first.port != second.port and first.dir != second.dir
    with redis.Redis(port=first.port) as one, redis.Redis(port=second.port) as two:
        one.set("only-here", 1)
        assert two.get("only-here") is None


@pytest.fixture
def impostor() -> Iterator[int]:
    """A port held by a listener that answers +PONG to anything: not a redis-server of ours."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        thread.join(5)
        listener.close()


def test_foreign_listener_is_not_mistaken_for_the_server(impostor: int) -> None:
    server = RedisServer(port=impostor, start_seconds=1.0)
    try:
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
        assert not server.is_running
    finally:
        server.cleanup()


def test_missing_binary_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server not found on PATH"):
        require_redis_server()


@pytest.mark.cluster
def test_cluster_forms_and_spreads_keys(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.startup_nodes == [("127.0.0.1", node.port) for node in redis_cluster.nodes]
    for node in redis_cluster.nodes:
        info = command(node.port, "CLUSTER", "INFO")
        assert "cluster_state:ok" in info and "cluster_known_nodes:3" in info
    masters = [line for line in command(redis_cluster.nodes[0].port, "CLUSTER", "NODES").splitlines()]
    assert len(masters) == 3 and all("master" in line.split()[2] for line in masters)
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        for index in range(100):
            client.set(f"key-{index}", index)
        assert [int(client.get(f"key-{i}")) for i in range(100)] == list(range(100))
        owners = {client.get_node_from_key(f"key-{i}").port for i in range(100)}
        assert owners == {node.port for node in redis_cluster.nodes}
        assert len(client.get_primaries()) == 3
    finally:
        client.close()
    slots = {
        command(redis_cluster.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip() for key in ("{t}:a", "{t}:b")
    }
    assert len(slots) == 1


@pytest.mark.cluster
async def test_async_cluster_client_from_url(redis_cluster: RedisCluster) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        for index in range(100):
            await client.set(f"async-{index}", index)
        assert [int(await client.get(f"async-{i}")) for i in range(100)] == list(range(100))
        assert len(client.get_primaries()) == 3
    finally:
        await client.aclose()
