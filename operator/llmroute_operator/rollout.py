"""Which workloads own pods that need a (re)injected sidecar, and how to restart them; no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmroute_operator.render import ANNOTATION_RESTARTED_AT, ANNOTATION_RESTARTED_FOR

RESTARTABLE = {"Deployment", "StatefulSet", "DaemonSet"}


@dataclass(frozen=True, order=True)
class Workload:
    """A restartable workload in the route's namespace."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


def _owners(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    controllers = [ref for ref in refs if ref.get("controller")]
    return controllers or list(refs)


def replicaset_names(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """ReplicaSets owning these pods (to be read to find their Deployments)."""
    return sorted({ref["name"] for pod in pods for ref in _owners(pod) if ref.get("kind") == "ReplicaSet"})


def rollout_targets(
    pods: Sequence[Mapping[str, Any]], replicasets: Mapping[str, Mapping[str, Any]]
) -> list[Workload]:
    """Deployments (pod → ReplicaSet → Deployment), StatefulSets and DaemonSets owning the pods."""
    targets: set[Workload] = set()
    for pod in pods:
        for ref in _owners(pod):
            kind, name = ref.get("kind"), ref.get("name")
            if kind in RESTARTABLE and name:
                targets.add(Workload(kind, name))
            elif kind == "ReplicaSet" and isinstance(name, str) and name in replicasets:
                for owner in _owners(replicasets[name]):
                    if owner.get("kind") == "Deployment" and owner.get("name"):
                        targets.add(Workload("Deployment", owner["name"]))
    return sorted(targets)


def already_restarted(workload: Mapping[str, Any], sidecar_hash: str) -> bool:
    """The workload's template was already restarted for this sidecar hash (no restart loops)."""
    template = (workload.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_RESTARTED_FOR) == sidecar_hash


def restart_patch(sidecar_hash: str, now: str) -> dict[str, Any]:
    """A merge patch restarting a workload's pods (as ``kubectl rollout restart`` does)."""
    annotations = {ANNOTATION_RESTARTED_AT: now, ANNOTATION_RESTARTED_FOR: sidecar_hash}
    return {"spec": {"template": {"metadata": {"annotations": annotations}}}}
