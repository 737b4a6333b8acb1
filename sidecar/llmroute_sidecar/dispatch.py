"""Fallback across a request's candidate upstreams: each one's own quota, its attempts, the next one.

One retry layer: every attempt on every candidate shares the request's deadline; an upstream's own
``retries`` apply to it. A candidate is left for the next one when its breaker refuses, its attached
limits (``limit.upstream``) reject (only the last candidate queues for a concurrency slot), or it
fails before anything was relayed (429, 5xx after its retries, connect errors, timeouts). Never
after the first byte reached the client (the relay owns the response by then), never on another 4xx.

Quota of a candidate left after its attempt: its lease is settled at once with zero tokens; the
request stays counted against its request rates (the upstream did receive it), its tokens are not
charged, its concurrency slot is freed. The lease of the upstream that answers is settled with the
request's actual tokens, like the route's.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from llmroute_sidecar.admission import Admission
from llmroute_sidecar.exchange import Exchange
from llmroute_sidecar.finish import Finisher
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.policy import ClientIdentity, RoutePolicy, UpstreamTarget, build_checks
from llmroute_sidecar.quota.base import Decision
from llmroute_sidecar.routing import upstream_model, with_model
from llmroute_sidecar.upstream import Body, CandidateFailed, Upstream, breaker_open
from llmroute_sidecar.upstream_client import RelayedResponse
from llmroute_sidecar.upstream_state import UpstreamStates


class Dispatcher:
    """Sends one request to the first candidate upstream that serves it."""

    def __init__(
        self,
        upstream: Upstream,
        admission: Admission,
        finisher: Finisher,
        states: UpstreamStates,
        metrics: SidecarMetrics,
    ) -> None:
        self.upstream = upstream
        self.admission = admission
        self.finisher = finisher
        self.states = states
        self.metrics = metrics

    async def dispatch(
        self,
        request: web.Request,
        policy: RoutePolicy,
        ex: Exchange,
        body: Body,
        candidates: list[UpstreamTarget],
        identity: ClientIdentity,
        headers: Mapping[str, str],
    ) -> RelayedResponse:
        """The response of the first candidate that gives one; raises the error of the last failure
        (502/503), or the 429 of the attached quotas when they rejected every candidate."""
        if not (body is None or isinstance(body, bytes)):
            candidates = candidates[:1]  # a streamed body is consumed by the first upstream it goes to
        failure: CandidateFailed | None = None
        rejection: Decision | None = None
        for index, target in enumerate(candidates):
            leased, last = len(ex.upstream_leases), index == len(candidates) - 1
            if target.name in policy.limited_upstreams:
                checks = build_checks(policy, identity, headers, ex.model, upstream=target.name)
                decision = await self.admission.admit_upstream(policy, checks, ex, ex.tokens_reserved, last)
                if not decision.admitted:
                    if rejection is None or decision.retry_after < rejection.retry_after:
                        rejection = decision  # the 429 says when the first candidate frees up
                    self.metrics.upstream_fallbacks_total.labels(policy.name, target.name, "quota").inc()
                    continue
            try:
                response = await self.upstream.forward(
                    request,
                    policy,
                    ex,
                    _body_for(target, body, ex.model),
                    target,
                    self.states.breaker(target.name),
                    last,
                )
            except CandidateFailed as error:
                failure = error
                self.metrics.upstream_fallbacks_total.labels(policy.name, target.name, error.kind).inc()
                await self._release(ex, leased)
                continue
            ex.upstream, ex.upstream_timeout = target.name, target.spec.timeout_seconds
            if ex.telemetry is not None:
                ex.telemetry.upstream = target.url  # server.address of the span and GenAI metrics
            return response
        if failure is not None:
            raise failure.error
        if rejection is not None:  # no upstream was asked: the route's admission is undone
            await self._cancel_route_lease(ex)
            raise self.admission.rejected(policy, ex, rejection, ex.tokens_reserved)
        raise breaker_open()

    async def _cancel_route_lease(self, ex: Exchange) -> None:
        """Undo the route's admission of a request no upstream got, as if the route had rejected it
        (all or nothing across the route's and the upstreams' limits). Where a store cannot cancel,
        or fails to, the lease is settled at zero tokens instead (only its request count remains)."""
        lease, store = ex.lease, ex.lease_store or self.finisher.store
        if lease is None:
            return
        ex.lease = None
        cancel = getattr(store, "cancel", None)
        try:
            if cancel is None:
                raise NotImplementedError("the store cannot cancel an admission")
            await cancel(lease)
        except Exception:
            await self.finisher.settle_lease(store, lease, 0, ex)

    async def _release(self, ex: Exchange, keep: int) -> None:
        """Settle the leases a failed candidate took (beyond the first ``keep``): zero tokens."""
        extra, ex.upstream_leases = ex.upstream_leases[keep:], ex.upstream_leases[:keep]
        for store, lease in extra:
            await self.finisher.settle_lease(store, lease, 0, ex)


def _body_for(target: UpstreamTarget, body: Body, model: str | None) -> Body:
    """The body as ``target`` gets it: its ``modelRewrite`` applied to a JSON body."""
    rewritten = upstream_model(target.spec, model)
    if rewritten is None or not isinstance(body, bytes):
        return body
    return with_model(body, rewritten)
