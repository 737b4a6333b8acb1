"""Fixtures of the interop suite: real redis-server, LiteLLM proxy, mock upstream and sidecar processes.

The upstreams and the two long-lived stacks (a Redis-backed sidecar in front of each upstream) are
started once per session: the LiteLLM proxy alone takes seconds to boot. Tests that need a route of
their own (tight limits) start a sidecar with the ``sidecars`` fixture of tests/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.stack import LITELLM_ENV, LiteLLMProxy, Stack, start_stack, upstream_of, write_secrets
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import MockUpstream

# The litellm client library reads these at import time: keep it offline in this process too.
for _name, _value in LITELLM_ENV.items():
    os.environ.setdefault(_name, _value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/interop carries the ``interop`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session")
def interop_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def interop_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_secrets(tmp_path_factory.mktemp("interop-secrets"))


@pytest.fixture(scope="session")
def litellm_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiteLLMProxy]:
    proxy = LiteLLMProxy(tmp_path_factory.mktemp("litellm"))
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def interop_mock() -> Iterator[MockUpstream]:
    upstream = MockUpstream("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="session", params=["litellm", "mock"])
def stack(
    request: pytest.FixtureRequest,
    interop_redis: RedisServer,
    interop_secrets: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A sidecar in front of the LiteLLM proxy, then one in front of llmroute's mock upstream."""
    upstream = upstream_of(request.param, request)
    built, sidecar = start_stack(
        upstream, interop_redis, interop_secrets, tmp_path_factory.mktemp(f"stack-{request.param}")
    )
    try:
        yield built
    finally:
        sidecar.stop()


@pytest.fixture(scope="session")
def litellm_stack(
    request: pytest.FixtureRequest,
    interop_redis: RedisServer,
    interop_secrets: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A sidecar in front of the LiteLLM proxy, for tests about LiteLLM's own conventions."""
    upstream = upstream_of("litellm", request)
    built, sidecar = start_stack(
        upstream, interop_redis, interop_secrets, tmp_path_factory.mktemp("stack-ll")
    )
    try:
        yield built
    finally:
        sidecar.stop()
