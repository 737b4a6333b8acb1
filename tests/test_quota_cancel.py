"""``QuotaStore.cancel``: an admission undone as if it had been rejected (a request every candidate
upstream's own quota turned away never reached an upstream), on the memory store and on Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llmroute_sidecar.quota.base import AdmissionRequest, Decision, Dimension, LimitCheck
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.quota.redis import RedisQuotaStore
from tests.support.redis_procs import RedisServer

ROUTE = "tests/cancel"
EVERYTHING = LimitCheck(
    "all",
    "route",
    requests_per_minute=2,
    requests_per_hour=2,
    tokens_per_minute=300,
    concurrent_requests=1,
    burst=1,
    tokens_per_day=300,
    cost_per_day=1_000,
)
KEYED = LimitCheck("per-key", "apiKey", subject="ab" * 16, requests_per_minute=2, cost_per_month=1_000)


def request(cancellable: bool = True) -> AdmissionRequest:
    return AdmissionRequest(ROUTE, (EVERYTHING, KEYED), 200, 30.0, cost=600, cancellable=cancellable)


def remaining(decision: Decision) -> dict[tuple[str, Dimension], int]:
    return {(state.limit, state.dimension): state.remaining for state in decision.states}


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryQuotaStore | RedisQuotaStore]:
    if request.param == "memory":
        yield MemoryQuotaStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisQuotaStore.from_url(server.url)
    try:
        yield redis_store
    finally:
        await redis_store.close()


async def test_a_cancelled_admission_leaves_every_dimension_as_it_was(
    store: MemoryQuotaStore | RedisQuotaStore,
) -> None:
    first = await store.admit(request())
    assert first.admitted and first.lease is not None
    # Everything is taken: a second request fails (one concurrency slot, a burst of one, ...).
    assert not (await store.admit(request())).admitted
    await store.cancel(first.lease)
    again = await store.admit(request())
    assert again.admitted and again.lease is not None
    assert remaining(again) == remaining(first)  # the same room as the first admission had
    await store.cancel(again.lease)
    await store.cancel(again.lease)  # twice changes nothing
    third = await store.admit(request())
    assert third.admitted and remaining(third) == remaining(first)
    assert third.lease is not None
    await store.settle(third.lease, 200, 600)
    # Settled, not cancelled: the request counts, its tokens and cost too.
    after = await store.admit(request())
    assert not after.admitted and after.rejected is not None
    assert after.rejected.dimension is not Dimension.CONCURRENT_REQUESTS  # its slot was released
