"""The few Kubernetes API calls the handlers make, with plain dicts in and out.

Built on the official client's configuration and transport (kubeconfig or in-cluster service
account, TLS, token refresh); bodies stay dicts so no model conversion gets in the way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes

from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL

WORKLOAD_PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}",
    "DaemonSet": "/apis/apps/v1/namespaces/{ns}/daemonsets/{name}",
}

HPA_PATH = "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers"

ADMISSION_PATH = "/apis/admissionregistration.k8s.io/v1"
WEBHOOK_CONFIGURATIONS = ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")


class ApiError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def load_config() -> None:
    """In-cluster service account when running in a pod, else the kubeconfig (KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


class Kube:
    """Synchronous calls (kopf runs sync handlers in its thread pool)."""

    def __init__(self, api_client: Any | None = None, timeout: float = 10.0) -> None:
        self._api = api_client if api_client is not None else kubernetes.client.ApiClient()
        self._timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One call; the decoded JSON answer, None on 404, ApiError on other failures."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, payload, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(
            method, url, header_params=headers, body=payload, _request_timeout=self._timeout
        )
        data = response.read()
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise ApiError(response.status, data.decode(errors="replace")[:500] if data else "")
        decoded: dict[str, Any] = json.loads(data) if data else {}
        return decoded

    # -- ConfigMaps -----------------------------------------------------------------------------

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", body=dict(body))

    def patch_configmap(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/configmaps/{name}",
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def delete_configmap(self, namespace: str, name: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    # -- routes ---------------------------------------------------------------------------------

    def get_route(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One LLMRoute, None when it does not exist."""
        return self.request("GET", f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    def list_routes(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's LLMRoutes, straight from the API server."""
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
        answer = self.request("GET", path) or {}
        return list(answer.get("items") or [])

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """Merge-patch an LLMRoute's status subresource."""
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        self.request("PATCH", path, body=dict(patch), content_type="application/merge-patch+json")

    # -- pods and their owners ------------------------------------------------------------------

    def list_pods(self, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        answer = self.request("GET", f"/api/v1/namespaces/{namespace}/pods", query=query) or {}
        return list(answer.get("items") or [])

    def get_replicaset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets/{name}")

    def get_workload(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", WORKLOAD_PATHS[kind].format(ns=namespace, name=name))

    def patch_workload(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.request(
            "PATCH",
            WORKLOAD_PATHS[kind].format(ns=namespace, name=name),
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    # -- HorizontalPodAutoscalers -----------------------------------------------------------------

    def get_hpa(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"{HPA_PATH.format(ns=namespace)}/{name}")

    def create_hpa(self, namespace: str, body: Mapping[str, Any]) -> None:
        self.request("POST", HPA_PATH.format(ns=namespace), body=dict(body))

    def patch_hpa(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.request(
            "PATCH",
            f"{HPA_PATH.format(ns=namespace)}/{name}",
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def delete_hpa(self, namespace: str, name: str) -> None:
        self.request("DELETE", f"{HPA_PATH.format(ns=namespace)}/{name}")

    # -- webhook TLS (self-managed) ---------------------------------------------------------------

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def create_secret(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """ApiError 409 when it already exists."""
        return self.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=dict(body))

    def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge patch; with ``metadata.resourceVersion`` in it, ApiError 409 if the Secret changed since."""
        return self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/secrets/{name}",
            body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def get_webhook_configuration(self, plural: str, name: str) -> dict[str, Any] | None:
        """A Mutating- or ValidatingWebhookConfiguration (``plural`` from WEBHOOK_CONFIGURATIONS)."""
        return self.request("GET", f"{ADMISSION_PATH}/{plural}/{name}")

    def patch_webhook_configuration(self, plural: str, name: str, patch: Sequence[Mapping[str, Any]]) -> None:
        """JSON patch (its ``test`` operations make it conditional: 422 when one fails)."""
        self.request(
            "PATCH",
            f"{ADMISSION_PATH}/{plural}/{name}",
            body=[dict(op) for op in patch],
            content_type="application/json-patch+json",
        )
