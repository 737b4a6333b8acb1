"""Validation and status of a route, computed without I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmroute_operator.render import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_ROUTE,
    config_hash,
    has_sidecar,
    opted_out,
    pod_annotations,
    pod_labels,
    selector_matches,
)
from llmroute_sidecar.api import LLMRoute, ManifestError, parse_route

READY = "Ready"
DEGRADED = "Degraded"


def parse_body(body: Mapping[str, Any]) -> LLMRoute:
    """Parse an LLMRoute object as stored by the API server (status and server metadata ignored)."""
    document = {key: value for key, value in body.items() if key != "status"}
    return parse_route(document)


def valid_routes(bodies: Iterable[Mapping[str, Any]]) -> list[LLMRoute]:
    """The routes among these bodies that parse and are not being deleted (invalid ones are skipped:
    they are reported in their own status, and select nothing)."""
    routes = []
    for body in bodies:
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        try:
            routes.append(parse_body(body))
        except ManifestError:
            continue
    return routes


def validate_route(body: Mapping[str, Any]) -> list[str]:
    """Semantic problems of a route, one message per problem, naming the field; empty when valid."""
    try:
        parse_body(body)
    except ManifestError as error:
        lines = str(error).splitlines()
        return [line.strip() for line in lines[1:] if line.strip()] or [str(error)]
    return []


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def live(pod: Mapping[str, Any]) -> bool:
    """Not being deleted and not finished."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def matched_pods(route: LLMRoute, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Live pods of the route's namespace that its selector selects."""
    return [
        pod
        for pod in pods
        if live(pod)
        and (pod.get("metadata") or {}).get("namespace", route.metadata.namespace) == route.metadata.namespace
        and selector_matches(route.spec.selector, pod_labels(pod))
    ]


def is_current(pod: Mapping[str, Any], route: LLMRoute, current_sidecar_hash: str) -> bool:
    """The pod carries this route's sidecar as currently rendered."""
    annotations = pod_annotations(pod)
    return (
        has_sidecar(pod)
        and annotations.get(ANNOTATION_ROUTE) == route.metadata.name
        and annotations.get(ANNOTATION_CONFIG_HASH) == current_sidecar_hash
    )


def pods_needing_rollout(
    route: LLMRoute, pods: Sequence[Mapping[str, Any]], current_sidecar_hash: str
) -> list[Mapping[str, Any]]:
    """Matched pods (not opted out) without the current sidecar."""
    return [
        pod
        for pod in matched_pods(route, pods)
        if not opted_out(pod) and not is_current(pod, route, current_sidecar_hash)
    ]


def find_conflicts(
    route: LLMRoute, others: Sequence[LLMRoute], pods: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Names of other routes of the namespace that select a pod this route selects."""
    mine = matched_pods(route, pods)
    names = {
        other.metadata.name
        for other in others
        if other.metadata.name != route.metadata.name
        and other.metadata.namespace == route.metadata.namespace
        and any(selector_matches(other.spec.selector, pod_labels(pod)) for pod in mine)
    }
    return sorted(names)


def recommended_replicas(route: LLMRoute, hints: Sequence[Mapping[str, Any]]) -> int | None:
    """clamp(ceil(sum(inflightAvg) / targetInFlightPerPod), minReplicas, maxReplicas); None without
    autoscaling or hints."""
    autoscaling = route.spec.autoscaling
    if autoscaling is None or not hints:
        return None
    total = sum(float(hint.get("inflightAvg") or 0.0) for hint in hints)
    wanted = math.ceil(total / autoscaling.target_in_flight_per_pod - 1e-9)
    return max(autoscaling.min_replicas, min(autoscaling.max_replicas, wanted))


def condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    """A condition; lastTransitionTime is kept from ``previous`` when the status did not change."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since or now,
    }


@dataclass(frozen=True)
class Observation:
    """What the handlers saw for one route, besides the route itself."""

    pods: Sequence[Mapping[str, Any]] = ()
    sidecar_hash: str = ""
    conflicts: Sequence[str] = ()
    hints: Sequence[Mapping[str, Any]] | None = None
    workloads: Sequence[str] = ()
    """Workloads (``Kind/name``) needing a restart that the operator did not restart (manual)."""
    autoscaling_problem: str | None = None
    """Why the HPA the route asks for cannot be made (reported as Degraded)."""
    budgets: Sequence[Mapping[str, Any]] | None = None
    """``status.budgets`` as read now (``budgets.py``); None: not read this time (kept as it was)."""


def route_status(
    route: LLMRoute, observed: Observation, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """The status of a valid route: generation, conditions, pod counts, hash, recommendation."""
    previous = previous or {}
    old_conditions: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    generation = route.metadata.generation
    matched = matched_pods(route, observed.pods)
    current = [pod for pod in matched if is_current(pod, route, observed.sidecar_hash)]
    ready = [pod for pod in current if pod_ready(pod)]
    lacking = pods_needing_rollout(route, observed.pods, observed.sidecar_hash)

    if observed.conflicts:
        others = ", ".join(observed.conflicts)
        ready_condition = condition(
            READY,
            False,
            "SelectorConflict",
            f"pods selected by this route are also selected by {others}; they get no sidecar",
            generation,
            old_conditions,
            now,
        )
    else:
        ready_condition = condition(
            READY,
            True,
            "Reconciled",
            f"configuration {config_hash(route)} rendered; {len(ready)}/{len(matched)} pods ready",
            generation,
            old_conditions,
            now,
        )
    if lacking:
        names = ", ".join(sorted(str((pod.get("metadata") or {}).get("name", "?")) for pod in lacking))
        message = f"{len(lacking)} matched pod(s) without the current sidecar: {names}"
        if observed.workloads:
            message += f"; restart to inject: {', '.join(observed.workloads)}"
        if observed.autoscaling_problem:
            message += f"; {observed.autoscaling_problem}"
        degraded = condition(DEGRADED, True, "PodsWithoutSidecar", message, generation, old_conditions, now)
    elif observed.autoscaling_problem:
        degraded = condition(
            DEGRADED,
            True,
            "AutoscalerUnavailable",
            observed.autoscaling_problem,
            generation,
            old_conditions,
            now,
        )
    else:
        degraded = condition(
            DEGRADED,
            False,
            "AsExpected",
            "every matched pod runs the sidecar",
            generation,
            old_conditions,
            now,
        )

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [ready_condition, degraded],
        "pods": {"matched": len(matched), "injected": len(current), "ready": len(ready)},
        "podSummary": f"{len(ready)}/{len(matched)}",
        "configHash": config_hash(route),
        "podsNeedingRollout": sorted(str((pod.get("metadata") or {}).get("name", "?")) for pod in lacking),
    }
    generations = {hint.get("generation") for hint in observed.hints or ()}
    status["configGeneration"] = generation if current and generations == {generation} else None
    recommendation = recommended_replicas(route, observed.hints or ())
    if recommendation is None and observed.hints is None:
        recommendation = previous.get("recommendedReplicas")
    status["recommendedReplicas"] = recommendation
    budgets = observed.budgets if observed.budgets is not None else previous.get("budgets")
    if budgets:
        status["budgets"] = list(budgets)
    if route.spec.upstreams:
        known = observed.hints is not None
        status["upstreams"] = (
            upstream_status(route, observed.hints or ()) if known else previous.get("upstreams")
        )
    return status


def upstream_status(route: LLMRoute, hints: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each upstream with the pods (one hint each) that can send to it and those whose breaker for it
    is open; a pod that does not report the upstream (older configuration) counts in neither."""
    result = []
    for upstream in route.spec.routed_upstreams:
        reports = [
            entry
            for hint in hints
            for entry in hint.get("upstreams") or ()
            if isinstance(entry, Mapping) and entry.get("name") == upstream.name
        ]
        opened = sum(1 for entry in reports if entry.get("breaker") == "open")
        ready = sum(
            1 for entry in reports if entry.get("breaker") != "open" and entry.get("healthy") is not False
        )
        result.append(
            {"name": upstream.name, "url": upstream.url, "readyPods": ready, "breakerOpenPods": opened}
        )
    return result


def invalid_status(
    body: Mapping[str, Any], message: str, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """The status of a route whose spec does not validate: Ready=False, reason InvalidSpec."""
    previous = previous or {}
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    old_conditions: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    return {
        "observedGeneration": generation,
        "conditions": [
            condition(READY, False, "InvalidSpec", message, generation, old_conditions, now),
            condition(
                DEGRADED, True, "InvalidSpec", "configuration not updated", generation, old_conditions, now
            ),
        ],
    }


def transition_events(
    previous: Mapping[str, Any] | None, status: Mapping[str, Any]
) -> list[tuple[str, str, str]]:
    """Events (type, reason, message) for conditions whose status or reason changed."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    events: list[tuple[str, str, str]] = []
    for new in status.get("conditions") or []:
        before = old.get(new["type"])
        if before and (before.get("status"), before.get("reason")) == (new["status"], new["reason"]):
            continue
        healthy = (new["type"] == READY) == (new["status"] == "True")
        if before is None and healthy and new["type"] == DEGRADED:
            continue  # nothing to say about a route that starts out not degraded
        events.append(("Normal" if healthy else "Warning", new["reason"], new["message"]))
    return events
