"""Count the batches a Redis quota store sends (one per attempt), whichever path sends them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmroute_sidecar.quota.redis import RedisQuotaStore


def record_batches(store: RedisQuotaStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch ``store`` sends from now on: written from the submitting task
    (``_start``) or by a worker (``_pipeline``: one attempt, a NOSCRIPT resend included)."""
    sizes: list[int] = []
    pipeline, start = store._pipeline, store._batcher._start
    assert start is not None

    async def counted(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return await pipeline(batch)

    def started(batch: list[Any]) -> asyncio.Future[None] | None:
        done = start(batch)
        if done is not None:
            sizes.append(len(batch))
        return done

    monkeypatch.setattr(store, "_pipeline", counted)
    monkeypatch.setattr(store._batcher, "_start", started)
    return sizes
