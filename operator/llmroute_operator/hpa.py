"""The optional HorizontalPodAutoscaler of a route (``spec.autoscaling.hpa: true``); no I/O.

The HPA scales the one workload that owns the route's pods on the per-pod metric the sidecars
export, ``llmroute_inflight_requests``, to ``targetInFlightPerPod`` on average: the same arithmetic
as ``status.recommendedReplicas`` (ceil(total in flight / target), clamped). Kubernetes reads that
metric through a custom-metrics adapter (e.g. prometheus-adapter; see docs/operator.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmroute_operator.render import _bounded_name, labels, owner_reference
from llmroute_operator.rollout import Workload
from llmroute_sidecar.api import LLMRoute

METRIC = "llmroute_inflight_requests"
SCALABLE = {"Deployment", "StatefulSet"}


def hpa_name_for(route_name: str) -> str:
    """``llmroute-<route>`` (the HPA lives beside the route's ConfigMap of the same name)."""
    return _bounded_name("llmroute-", route_name, 253)


def hpa_name(route: LLMRoute) -> str:
    """The name of the route's HPA."""
    return hpa_name_for(route.metadata.name)


def owned_by(obj: Mapping[str, Any], route_name: str) -> bool:
    """The object's owner references name the route (an HPA someone else made is left alone)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("kind") == "LLMRoute" and ref.get("name") == route_name for ref in refs)


def wants_hpa(route: LLMRoute) -> bool:
    """The route asks for a managed HPA."""
    return route.spec.autoscaling is not None and route.spec.autoscaling.hpa


@dataclass(frozen=True)
class HpaPlan:
    """What to do about the route's HPA: the object to apply (None: delete it if present) and why."""

    desired: dict[str, Any] | None
    problem: str | None = None
    """Set when the route asks for an HPA that cannot be made (reported as Degraded)."""


def plan_hpa(route: LLMRoute, owners: Sequence[Workload]) -> HpaPlan:
    """The HPA for the workload owning the route's pods; refuses zero or several scalable owners."""
    if not wants_hpa(route):
        return HpaPlan(None)
    scalable = sorted({owner for owner in owners if owner.kind in SCALABLE})
    if not scalable:
        return HpaPlan(None, "autoscaling.hpa: no Deployment or StatefulSet owns the matched pods yet")
    if len(scalable) > 1:
        names = ", ".join(str(owner) for owner in scalable)
        return HpaPlan(None, f"autoscaling.hpa: the matched pods belong to several workloads ({names})")
    return HpaPlan(render_hpa(route, scalable[0]))


def render_hpa(route: LLMRoute, target: Workload) -> dict[str, Any]:
    """An ``autoscaling/v2`` HPA scaling ``target`` on the sidecars' in-flight requests."""
    autoscaling = route.spec.autoscaling
    assert autoscaling is not None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": hpa_name(route),
            "namespace": route.metadata.namespace,
            "labels": {**labels(route), "app.kubernetes.io/component": "route-autoscaler"},
            "ownerReferences": [owner_reference(route)],
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": target.kind, "name": target.name},
            "minReplicas": max(1, autoscaling.min_replicas),
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(autoscaling.target_in_flight_per_pod),
                        },
                    },
                }
            ],
        },
    }


def needs_update(existing: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """The stored HPA differs from the desired one in the fields the operator sets (fields the API
    server defaults, such as ``behavior``, are left alone)."""
    if existing is None:
        return True
    spec = existing.get("spec") or {}
    if any(spec.get(key) != value for key, value in desired["spec"].items()):
        return True
    return not (existing.get("metadata") or {}).get("ownerReferences")
