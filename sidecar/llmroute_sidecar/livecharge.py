"""Live charging of streams: a stream that outgrows its token reservation is charged while it streams.

The relay reports the stream's usage so far after every chunk (``observe``, O(1)); a ``Cadence``
decides when the store should hear about it: only above the reservation (below it the reservation
already counts), then every ``streamChargeIntervalTokens`` of growth or ``streamChargeIntervalMs``,
whichever comes first — never per chunk. The charge itself runs in a background task, at most one in
flight per stream, so a slow or failing store never delays a chunk or breaks the stream; a failure is
reported to ``on_error`` and the next charge (or the settlement) carries on. Day and month budgets
are raised by the same charge (cost budgets at the model's ``price``, cached tokens not known yet).
``aclose`` waits for the charge in flight, so the settlement that follows is the last write to the lease.

With ``cutOverReservation`` the stream is cut (``observe`` raises the ProxyError the proxy turns into
a final SSE error event) once its completion passes ``CUT_MARGIN`` times the completion it reserved:
the sidecar's estimate of streamed text runs up to ~40 % high for plain English, so the margin keeps
honest streams whole while bounding one that ignores its maximum.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmroute_sidecar.api.spec import ModelPrice, TokenAccounting
from llmroute_sidecar.cost import cost_micros
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.quota.base import Lease, QuotaStore

#: A stream is cut when its completion estimate passes this multiple of its completion reservation.
CUT_MARGIN = 1.5


@dataclass
class Cadence:
    """When a stream's usage should be charged; pure (time is passed in)."""

    charged: int
    """What the store holds for the lease: the reservation, then the last charge sent."""
    every_tokens: int
    every_seconds: float
    last_at: float

    def due(self, tokens: int, now: float) -> bool:
        """True when ``tokens`` exceeds the charge by ``every_tokens``, or ``every_seconds`` passed."""
        if tokens <= self.charged:
            return False
        return tokens - self.charged >= self.every_tokens or now - self.last_at >= self.every_seconds

    def mark(self, tokens: int, now: float) -> None:
        """Record that ``tokens`` was sent to the store at ``now``."""
        self.charged = max(self.charged, tokens)
        self.last_at = now


def reservation_exceeded(reserved_completion: int) -> ProxyError:
    """The error that ends a stream which outgrew its reservation (``cutOverReservation``)."""
    return ProxyError(
        400,
        "token_reservation_exceeded",
        f"the completion outgrew the {reserved_completion} completion tokens reserved for it "
        "(spec.tokens.defaultReservation or the request's max_tokens); set max_tokens to reserve more",
        "invalid_request_error",
        "reservation_exceeded",
    )


class LiveCharge:
    """One stream's live charging; ``observe`` per chunk, ``aclose`` before settlement."""

    def __init__(
        self,
        store: QuotaStore,
        lease: Lease,
        tokens: TokenAccounting,
        prompt_estimate: int,
        on_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        price: ModelPrice | None = None,
        also: Sequence[tuple[QuotaStore, Lease]] = (),
    ) -> None:
        self.store = store
        self.price = price
        """The model's price when the lease reserved a cost: cost budgets are charged live too."""
        self.lease = lease
        self.also = tuple(also)
        """Further leases of the same request charged alongside (limits attached to its upstream)."""
        self.cut = tokens.cut_over_reservation
        self.reserved_completion = max(0, lease.reserved_tokens - prompt_estimate)
        self.cadence = Cadence(
            lease.reserved_tokens,
            tokens.stream_charge_interval_tokens,
            tokens.stream_charge_interval_ms / 1000,
            clock(),
        )
        self.charges = 0
        """Charges started (for tests and metrics)."""
        self._on_error = on_error
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def observe(self, tokens_so_far: int, completion_so_far: int) -> None:
        """The stream's usage after a chunk; may start a charge; raises when the stream must be cut."""
        if self._closed:
            return
        if self.cut and completion_so_far > self.reserved_completion * CUT_MARGIN:
            raise reservation_exceeded(self.reserved_completion)
        if tokens_so_far <= self.cadence.charged:
            return  # within what the store holds (``Cadence.due`` says no): the usual chunk, no clock read
        if self._task is not None and not self._task.done():
            return  # one charge in flight per stream; the next chunk looks again
        now = self._clock()
        if self.cadence.due(tokens_so_far, now):
            self.cadence.mark(tokens_so_far, now)
            self.charges += 1
            self._task = asyncio.create_task(self._send(tokens_so_far, completion_so_far), name="live-charge")

    async def _send(self, tokens: int, completion: int) -> None:
        if not self.also:
            await self._charge(self.store, self.lease, tokens, completion)
            return
        leases = ((self.store, self.lease), *self.also)
        await asyncio.gather(*(self._charge(store, lease, tokens, completion) for store, lease in leases))

    async def _charge(self, store: QuotaStore, lease: Lease, tokens: int, completion: int) -> None:
        cost = None
        if self.price is not None and lease.request.cost > 0:
            cost = cost_micros(tokens - completion, completion, self.price)
        try:
            await store.charge(lease, tokens, cost)
        except Exception as error:  # never the stream's problem: settlement charges the final usage
            if self._on_error is not None:
                self._on_error(error)

    async def aclose(self) -> None:
        """Stop charging and wait for the charge in flight (bounded by the store's own timeout)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
