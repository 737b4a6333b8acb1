"""Live charging of streams: the cadence (pure, fake clock) and the charger beside a stream."""

from __future__ import annotations

import asyncio

import pytest

from llmroute_sidecar.api.spec import ModelPrice, TokenAccounting
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.livecharge import Cadence, LiveCharge
from llmroute_sidecar.quota.base import AdmissionRequest, Dimension, Lease, LimitCheck, StoreUnavailableError
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from tests.support.clock import FakeClock

TPM = LimitCheck("tpm", "route", tokens_per_minute=10_000)


def test_nothing_is_due_at_or_below_the_charge() -> None:
    cadence = Cadence(charged=100, every_tokens=50, every_seconds=0.5, last_at=0.0)
    assert not cadence.due(100, now=99.0)
    assert not cadence.due(10, now=99.0)


def test_due_after_enough_tokens_or_enough_time() -> None:
    cadence = Cadence(charged=100, every_tokens=50, every_seconds=0.5, last_at=0.0)
    assert cadence.due(101, now=0.5)  # first excess, the interval already passed
    cadence.mark(101, now=0.5)
    assert not cadence.due(140, now=0.6)  # 39 tokens, 0.1 s: wait
    assert cadence.due(151, now=0.6)  # 50 tokens of growth
    assert cadence.due(102, now=1.0)  # 0.5 s and still growing
    cadence.mark(151, now=0.6)
    cadence.mark(120, now=0.7)  # a lower value never lowers what the store holds
    assert cadence.charged == 151 and not cadence.due(151, now=5.0)


class RecordingStore(MemoryQuotaStore):
    """The memory store, recording charges; can be made to fail or to block."""

    def __init__(self) -> None:
        super().__init__()
        self.charged: list[int] = []
        self.costs: list[int | None] = []
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def charge(self, lease: Lease, tokens_so_far: int, cost_so_far: int | None = None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise StoreUnavailableError("down")
        self.charged.append(tokens_so_far)
        self.costs.append(cost_so_far)
        await super().charge(lease, tokens_so_far, cost_so_far)


async def _lease(store: MemoryQuotaStore, tokens: int = 110) -> Lease:
    decision = await store.admit(AdmissionRequest("ns/r", (TPM,), tokens, 60.0))
    assert decision.lease is not None
    return decision.lease


def _live(store: RecordingStore, lease: Lease, clock: FakeClock, **tokens: object) -> LiveCharge:
    settings = TokenAccounting.model_validate({"streamChargeIntervalTokens": 100, **tokens})
    return LiveCharge(store, lease, settings, prompt_estimate=10, clock=clock)


async def test_charges_at_the_cadence_not_per_chunk() -> None:
    store, clock = RecordingStore(), FakeClock()
    live = _live(store, await _lease(store), clock, streamChargeIntervalMs=1000)
    for tokens in range(1, 600):  # one token per chunk, no time passing
        live.observe(tokens, tokens - 10)
        await asyncio.sleep(0)  # let a started charge run
    await live.aclose()
    assert store.charged == [210, 310, 410, 510]  # every 100 tokens past the reservation of 110
    state = (await store.admit(AdmissionRequest("ns/r", (TPM,), 0, 60.0))).states[0]
    assert state.remaining == 10_000 - 510


async def test_one_charge_in_flight_and_close_waits_for_it() -> None:
    store, clock = RecordingStore(), FakeClock()
    store.gate = asyncio.Event()
    live = _live(store, await _lease(store), clock)
    live.observe(300, 290)
    await asyncio.sleep(0)
    live.observe(900, 890)  # the first charge still in flight: no second one
    assert live.charges == 1
    closing = asyncio.create_task(live.aclose())
    await asyncio.sleep(0)
    assert not closing.done()
    store.gate.set()
    await closing
    live.observe(5000, 4990)  # closed: the settlement is the last write
    assert store.charged == [300] and live.charges == 1


async def test_store_failure_is_reported_never_raised() -> None:
    store, clock = RecordingStore(), FakeClock()
    store.fail = True
    errors: list[BaseException] = []
    settings = TokenAccounting(stream_charge_interval_tokens=100)
    live = LiveCharge(store, await _lease(store), settings, 10, errors.append, clock)
    live.observe(500, 490)
    await live.aclose()
    assert [type(e) for e in errors] == [StoreUnavailableError]


async def test_cut_only_when_asked_and_past_the_margin() -> None:
    store, clock = RecordingStore(), FakeClock()
    lease = await _lease(store)  # 10 prompt + 100 completion reserved
    keep = _live(store, lease, clock)
    keep.observe(10_000, 9_990)  # not asked to cut
    await keep.aclose()
    cut = _live(store, lease, clock, cutOverReservation=True)
    cut.observe(160, 150)  # 1.5x the completion reserved: still within the margin
    with pytest.raises(ProxyError) as caught:
        cut.observe(161, 151)
    assert (
        caught.value.code == "token_reservation_exceeded" and "100 completion tokens" in caught.value.message
    )
    await cut.aclose()


async def test_a_stream_outgrowing_its_reservation_is_charged_to_budgets_at_its_price() -> None:
    store, clock = RecordingStore(), FakeClock()
    budgets = LimitCheck("b", "route", tokens_per_day=100_000, cost_per_day=10_000_000)
    # 10 prompt + 100 completion tokens reserved at 1 (input) and 2 (output) per million: 210 micro-units
    decision = await store.admit(AdmissionRequest("ns/r", (budgets,), 110, 60.0, cost=210))
    assert decision.lease is not None
    price = ModelPrice(model="m", input_per_million=1, output_per_million=2)
    settings = TokenAccounting.model_validate({"streamChargeIntervalTokens": 100})
    live = LiveCharge(store, decision.lease, settings, prompt_estimate=10, clock=clock, price=price)
    live.observe(310, 300)
    await live.aclose()
    assert store.costs == [10 + 2 * 300]
    states = {
        s.dimension: s.remaining
        for s in (await store.admit(AdmissionRequest("ns/r", (budgets,), 0, 60.0))).states
    }
    assert states == {Dimension.TOKENS_PER_DAY: 100_000 - 310, Dimension.COST_PER_DAY: 10_000_000 - 610}


async def test_leases_of_an_upstreams_own_limits_are_charged_alongside() -> None:
    store, upstream_store, clock = RecordingStore(), RecordingStore(), FakeClock()
    settings = TokenAccounting.model_validate(
        {"streamChargeIntervalTokens": 100, "streamChargeIntervalMs": 1000}
    )
    extra = await _lease(upstream_store)
    live = LiveCharge(store, await _lease(store), settings, 10, clock=clock, also=[(upstream_store, extra)])
    for tokens in range(1, 320):
        live.observe(tokens, tokens - 10)
        await asyncio.sleep(0)
    await live.aclose()
    assert store.charged == upstream_store.charged == [210, 310]
