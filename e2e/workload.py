"""What the in-cluster suite applies and sends: an example route (its per-tenant limit lowered), a
Deployment of the mock upstream it selects, and the traffic run inside that pod, with the checks of
its answers. Shared by ``test_kind_chart.py`` and ``test_workload.py`` (which runs the same route,
script and checks against local processes, so the plan is proven where kind is not available)."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import yaml

from e2e.cluster import ROOT

APPS = "llmroute-apps"
SIDECAR_IMAGE, OPERATOR_IMAGE = "llmroute-sidecar:e2e", "llmroute-operator:e2e"
TENANT_LIMIT = 3
"""Requests per minute per X-Tenant-ID value in the applied route (the example's, lowered)."""
EXAMPLE = ROOT / "examples" / "header-keyed.yaml"


def route_manifest(namespace: str = APPS) -> dict[str, Any]:
    """``examples/header-keyed.yaml``'s route in ``namespace``, its per-tenant limit lowered."""
    documents = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    (route,) = [d for d in documents if d["kind"] == "LLMRoute"]
    route["metadata"]["namespace"] = namespace
    limit = next(limit for limit in route["spec"]["limits"] if limit["name"] == "per-tenant")
    limit["requestsPerMinute"] = TENANT_LIMIT
    limit.pop("burst", None)
    return dict(route)


def invalid_route() -> dict[str, Any]:
    """A route the schema accepts (a cross-field rule it cannot express) and ``/validate`` rejects."""
    bad = route_manifest()
    bad["metadata"]["name"] = "inverted-autoscaling"
    bad["spec"]["autoscaling"] = {"targetInFlightPerPod": 4, "minReplicas": 5, "maxReplicas": 2}
    return bad


INVALID_MESSAGE = "minReplicas (5) exceeds maxReplicas (2)"


def pod_labels(selector: dict[str, Any]) -> dict[str, str]:
    """Labels the route's selector matches: its matchLabels and the first value of each In."""
    labels = dict(selector.get("matchLabels") or {})
    for expression in selector.get("matchExpressions") or []:
        assert expression["operator"] == "In", expression
        labels[expression["key"]] = expression["values"][0]
    return labels


def upstream_address(route: dict[str, Any]) -> str:
    """HOST:PORT of the route's upstream (the pod's own loopback in the example)."""
    return urllib.parse.urlsplit(route["spec"]["upstream"]["url"]).netloc


def mock_app(route: dict[str, Any]) -> dict[str, Any]:
    """A Deployment of the mock OpenAI upstream (shipped in the sidecar image), listening where the
    route's upstream URL points."""
    labels = pod_labels(route["spec"]["selector"])
    container = {
        "name": "app",
        "image": SIDECAR_IMAGE,
        "command": ["python", "-m", "llmroute_sidecar.mockupstream", "--listen", upstream_address(route)],
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": labels["app"], "namespace": route["metadata"]["namespace"]},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


TENANTS = ["e2e"] * (TENANT_LIMIT + 1) + ["someone-else"]

_TRAFFIC = """
import json, urllib.error, urllib.request
results = []
for tenant in TENANTS:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    request = urllib.request.Request("http://SIDECAR/v1/chat/completions", data=body,
        headers={"Content-Type": "application/json", "X-Tenant-ID": tenant})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            results.append([response.status, dict(response.headers), json.loads(response.read())])
    except urllib.error.HTTPError as error:
        results.append([error.code, dict(error.headers), json.loads(error.read())])
with urllib.request.urlopen("http://UPSTREAM/mock/requests", timeout=5) as response:
    seen = json.loads(response.read())
print(json.dumps({"results": results, "upstream": seen}))
"""


def traffic_script(sidecar: str, upstream: str) -> str:
    """Python (standard library only) that sends ``TENANTS``' requests to the sidecar at HOST:PORT
    ``sidecar`` and prints the answers and what the mock upstream at ``upstream`` received."""
    return (
        _TRAFFIC.replace("TENANTS", json.dumps(TENANTS))
        .replace("SIDECAR", sidecar)
        .replace("UPSTREAM", upstream)
    )


def check_traffic(output: str) -> None:
    """The tenant's first TENANT_LIMIT requests pass, the next gets 429 with Retry-After and never
    reaches the upstream, another tenant still passes."""
    answer = json.loads(output)
    statuses = [status for status, _, _ in answer["results"]]
    assert statuses == [200] * TENANT_LIMIT + [429, 200], answer["results"]
    for _, _, body in answer["results"][:TENANT_LIMIT]:
        assert body["choices"][0]["message"]["content"]
    _, headers, body = answer["results"][TENANT_LIMIT]
    headers = {key.lower(): value for key, value in headers.items()}
    assert 1 <= int(headers["retry-after"]) <= 60, headers
    assert body["error"]["code"] == "requests_per_minute_exceeded", body
    completions = [r for r in answer["upstream"] if r.get("path") == "/v1/chat/completions"]
    assert len(completions) == TENANT_LIMIT + 1
