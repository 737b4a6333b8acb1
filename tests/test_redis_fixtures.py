"""The Redis fixtures are real: data round-trips, kill -9 crashes, restart reuses the port, clusters form."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient

from tests.support.redis_procs import RedisCluster, RedisServer, command


def test_server_round_trip_kill_and_restart(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    client.set("k", "v")
    assert client.get("k") == b"v"
    port, pid = redis_server.port, redis_server.pid
    redis_server.kill()
    assert not redis_server.is_running
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    redis_server.restart()
    assert redis_server.port == port and redis_server.pid != pid
    assert client.get("k") is None  # no persistence: a restarted server starts empty
    client.close()


def test_stop_leaves_no_process(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_factory_gives_distinct_servers(redis_server_factory: Callable[[], RedisServer]) -> None:
    first, second = redis_server_factory(), redis_server_factory()
    assert first.port != second.port
    redis.Redis(port=first.port).set("only-here", 1)
    assert redis.Redis(port=second.port).get("only-here") is None


@pytest.mark.cluster
def test_cluster_forms_and_spreads_keys(redis_cluster: RedisCluster) -> None:
    for node in redis_cluster.nodes:
        info = command(node.port, "CLUSTER", "INFO")
        assert "cluster_state:ok" in info and "cluster_known_nodes:3" in info
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        for index in range(100):
            client.set(f"key-{index}", index)
        assert [int(client.get(f"key-{i}")) for i in range(100)] == list(range(100))
        owners = {client.get_node_from_key(f"key-{i}").port for i in range(100)}
        assert len(owners) == 3
        assert client.keyslot("{t}:a") == client.keyslot("{t}:b")
        assert len(client.get_primaries()) == 3
    finally:
        client.close()
