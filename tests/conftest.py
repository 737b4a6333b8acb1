"""Shared fixtures: real redis-server, mock-upstream and sidecar processes, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.redis_procs import RedisCluster, RedisServer
from tests.support.sidecar_procs import MockUpstream, SidecarProcess


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


@pytest.fixture(scope="module")
def mock_process() -> Iterator[MockUpstream]:
    """The built-in mock OpenAI upstream as a process, without artificial latency."""
    upstream = MockUpstream("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def mock(mock_process: MockUpstream) -> Iterator[MockUpstream]:
    """The shared mock upstream; streams a test held are released when it ends."""
    try:
        yield mock_process
    finally:
        mock_process.release()


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    """Sidecar processes a test starts (``sidecar_procs.start``); all stopped afterwards."""
    started: list[SidecarProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()
