"""The admission webhooks: ``/inject`` (Pod CREATE) and ``/validate`` (LLMRoute CREATE/UPDATE).

Decisions are pure (``render.plan_injection``, ``status.validate_route``); these handlers only read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import jsonpatch
import kopf

from llmroute_operator import kube, metrics, render
from llmroute_operator import status as state
from llmroute_operator.runtime import INDEX, api, runtime
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger("llmroute.operator")

ROUTES_LIST_TIMEOUT = 3.0

# -- admission ------------------------------------------------------------------------------------


@kopf.on.mutate(
    "v1",
    "pods",
    id="inject",
    operations=["CREATE"],
    side_effects=False,
    ignore_failures=OperatorSettings.from_env().webhook_failure_policy == "Ignore",
)
async def inject(*, body: kopf.Body, patch: kopf.Patch, warnings: list[str], **kwargs: Any) -> None:
    """Add the sidecar to a pod its namespace's route selects (pure decision in render)."""
    with metrics.observe_webhook("inject") as outcome:
        namespace = (body.get("metadata") or {}).get("namespace")
        routes = state.valid_routes(await _routes_in(namespace, kwargs[INDEX])) if namespace else []
        plan = render.plan_injection(body, routes, runtime().settings)
        outcome[0] = "injected" if plan.patch else plan.reason.lower() or "skipped"
        if plan.reason == "Conflict":
            warnings.append(
                f"llmroute: no sidecar injected, routes {', '.join(plan.conflicts)} all select this pod"
            )
        warnings.extend(plan.notes)
        if plan.patch:
            ops = plan.patch
            patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
            metrics.PODS_INJECTED.inc()


async def _routes_in(namespace: str, index: Any) -> list[Mapping[str, Any]]:
    """The namespace's routes from the API server, falling back to the index when it is unreachable.

    Not the index first: kopf pauses watches in a standby replica (peering), so its index is stale,
    yet the webhook Service sends reviews to every replica.
    """
    try:
        found = await asyncio.wait_for(asyncio.to_thread(api().list_routes, namespace), ROUTES_LIST_TIMEOUT)
    except (kube.ApiError, OSError, TimeoutError, ValueError) as error:
        log.warning("listing LLMRoutes in %s failed (%s); deciding from the index", namespace, error)
        return list(index.get(namespace, []))
    return list(found)


@kopf.on.validate(API_GROUP, API_VERSION, PLURAL, id="validate", operations=["CREATE", "UPDATE"])
def validate(*, body: kopf.Body, **_: Any) -> None:
    """Reject semantically invalid routes with messages naming the field."""
    with metrics.observe_webhook("validate"):
        problems = state.validate_route(body)
        if problems:
            raise kopf.AdmissionError("invalid LLMRoute: " + "; ".join(problems), code=422)
