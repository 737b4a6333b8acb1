"""Shared fixtures: real redis-server processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.redis_procs import RedisCluster, RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on its own port."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[[], RedisServer]]:
    """Start as many servers as a test needs; all are stopped afterwards."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer()
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A local 3-master Redis Cluster."""
    cluster = RedisCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
