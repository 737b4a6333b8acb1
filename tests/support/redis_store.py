"""A Redis quota store for tests: the ``store`` fixture on a private redis-server, and a count of
the batches it sends (one per attempt), whichever path sends them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from llmroute_sidecar.quota.redis import RedisQuotaStore
from tests.support.redis_procs import RedisServer


@pytest.fixture(name="store")
async def redis_quota_store(redis_server: RedisServer) -> AsyncIterator[RedisQuotaStore]:
    """``store``: a Redis quota store on the test's redis-server, closed afterwards. Import it into a
    test module (``from tests.support.redis_store import redis_quota_store``) to use it there."""
    quota = RedisQuotaStore.from_url(redis_server.url)
    try:
        yield quota
    finally:
        await quota.close()


def record_batches(store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch ``store`` sends from now on: written from the submitting task
    (``_start``) or by a worker (``_pipeline``: one attempt, a NOSCRIPT resend included)."""
    sizes: list[int] = []
    pipeline, start = store._pipeline, store._batcher._start
    assert start is not None

    async def counted(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return await pipeline(batch)

    def started(batch: list[Any], landed: Callable[[], None]) -> bool:
        sent = start(batch, landed)
        if sent:
            sizes.append(len(batch))
        return sent

    monkeypatch.setattr(store, "_pipeline", counted)
    monkeypatch.setattr(store._batcher, "_start", started)
    return sizes
