"""AdmissionReview requests as the API server sends them (``admission.k8s.io/v1``)."""

from __future__ import annotations

import uuid
from typing import Any

POD_RESOURCE = {"group": "", "version": "v1", "resource": "pods"}
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
ROUTE_RESOURCE = {"group": "llmroute.dev", "version": "v1alpha1", "resource": "llmroutes"}
ROUTE_KIND = {"group": "llmroute.dev", "version": "v1alpha1", "kind": "LLMRoute"}


def admission_review(
    obj: dict[str, Any],
    namespace: str,
    resource: dict[str, str] = POD_RESOURCE,
    kind: dict[str, str] = POD_KIND,
    operation: str = "CREATE",
) -> dict[str, Any]:
    """A review of ``obj`` with a fresh uid (the answer must echo it)."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": kind,
            "resource": resource,
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }
