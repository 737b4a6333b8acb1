"""The managed HorizontalPodAutoscaler: pure planning and rendering, then against the emulator."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import yaml

from llmroute_operator import handlers, hpa, kube, status
from llmroute_operator.rollout import Workload
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, hold_stream, wait_for
from tests.test_operator_kopf import NAMESPACE, ROUTES, Cluster, cluster, condition, route_status
from tests.test_operator_render import NOW, route

__all__ = ["cluster"]  # the emulator + operator fixture, shared with test_operator_kopf

AUTOSCALING = {"targetInFlightPerPod": 8, "minReplicas": 2, "maxReplicas": 6, "hpa": True}
DEPLOYMENT = Workload("Deployment", "chat")


def test_no_hpa_unless_the_route_asks_for_one() -> None:
    assert hpa.plan_hpa(route(), [DEPLOYMENT]) == hpa.HpaPlan(None)
    without = {**AUTOSCALING, "hpa": False}
    assert hpa.plan_hpa(route(autoscaling=without), [DEPLOYMENT]) == hpa.HpaPlan(None)


def test_the_hpa_scales_the_owning_workload_on_in_flight_requests() -> None:
    plan = hpa.plan_hpa(route(autoscaling=AUTOSCALING), [DEPLOYMENT, Workload("DaemonSet", "agent")])
    assert plan.problem is None and plan.desired is not None
    desired = plan.desired
    assert desired["apiVersion"] == "autoscaling/v2"
    assert desired["metadata"]["name"] == "llmroute-chat"
    assert desired["metadata"]["ownerReferences"][0]["kind"] == "LLMRoute"
    assert desired["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llmroute-operator"
    spec = desired["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    (metric,) = spec["metrics"]
    assert metric["pods"]["metric"]["name"] == "llmroute_inflight_requests"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}


def test_statefulsets_scale_too_and_min_replicas_zero_becomes_one() -> None:
    plan = hpa.plan_hpa(route(autoscaling={**AUTOSCALING, "minReplicas": 0}), [Workload("StatefulSet", "db")])
    assert plan.desired is not None
    assert plan.desired["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert plan.desired["spec"]["minReplicas"] == 1  # an HPA cannot scale to zero


def test_no_hpa_without_exactly_one_scalable_owner() -> None:
    asking = route(autoscaling=AUTOSCALING)
    none_yet = hpa.plan_hpa(asking, [])
    assert none_yet.desired is None and "no Deployment or StatefulSet" in (none_yet.problem or "")
    daemons = hpa.plan_hpa(asking, [Workload("DaemonSet", "agent")])
    assert daemons.desired is None and daemons.problem
    two = hpa.plan_hpa(asking, [DEPLOYMENT, Workload("Deployment", "chat-canary")])
    assert two.desired is None
    assert "Deployment/chat, Deployment/chat-canary" in (two.problem or "")


def test_updates_only_when_the_operator_owned_fields_differ() -> None:
    desired = hpa.render_hpa(route(autoscaling=AUTOSCALING), DEPLOYMENT)
    stored = copy.deepcopy(desired)
    stored["spec"]["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": 300}}  # server default
    assert not hpa.needs_update(stored, desired)
    assert hpa.needs_update(None, desired)
    changed = copy.deepcopy(stored)
    changed["spec"]["maxReplicas"] = 9
    assert hpa.needs_update(changed, desired)
    orphan = copy.deepcopy(stored)
    del orphan["metadata"]["ownerReferences"]
    assert hpa.needs_update(orphan, desired)


def test_an_hpa_that_cannot_be_made_is_reported_as_degraded() -> None:
    asking = route(autoscaling=AUTOSCALING)
    observed = status.Observation(autoscaling_problem="autoscaling.hpa: several workloads")
    degraded = condition(status.route_status(asking, observed, None, NOW), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "AutoscalerUnavailable")
    assert degraded["message"] == "autoscaling.hpa: several workloads"


# -- against the emulator -------------------------------------------------------------------------


def _workload(cluster: Cluster, name: str, labels: dict[str, str]) -> None:
    apps = f"/apis/apps/v1/namespaces/{NAMESPACE}"
    cluster.api(
        "POST",
        f"{apps}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers": []}}},
        },
    )
    owner = {"kind": "Deployment", "name": name, "controller": True}
    cluster.api(
        "POST",
        f"{apps}/replicasets",
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {"name": f"{name}-5c9", "ownerReferences": [owner]},
        },
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-5c9-a1",
            "labels": labels,
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"{name}-5c9", "controller": True}],
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod)


def _autoscaled_route(hpa_on: bool) -> dict[str, Any]:
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "scaled", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "scaled-chat"}},
            "upstream": {"url": "http://127.0.0.1:8000"},
            "limits": [{"name": "all", "requestsPerMinute": 600}],
            "rollout": "manual",
            "autoscaling": {**AUTOSCALING, "hpa": hpa_on},
        },
    }


def test_the_operator_manages_the_routes_hpa(cluster: Cluster) -> None:
    hpa_path = f"/apis/autoscaling/v2/namespaces/{NAMESPACE}/horizontalpodautoscalers/llmroute-scaled"
    _workload(cluster, "scaled-chat", {"app": "scaled-chat"})
    cluster.apply(_autoscaled_route(hpa_on=True))
    made = wait_for(lambda: cluster.api("GET", hpa_path), timeout=15, what="the route's HPA")
    assert made["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "scaled-chat",
    }
    assert made["metadata"]["ownerReferences"][0]["name"] == "scaled"

    cluster.apply(_autoscaled_route(hpa_on=False))
    wait_for(lambda: cluster.api("GET", hpa_path) is None, timeout=15, what="the HPA deleted")

    # A second workload's pods also match: which one to scale is ambiguous, so no HPA and a condition.
    _workload(cluster, "scaled-chat-canary", {"app": "scaled-chat"})
    cluster.apply(_autoscaled_route(hpa_on=True))

    def ambiguous() -> Any:
        degraded = condition(route_status(cluster, "scaled"), "Degraded")
        return "several workloads" in degraded.get("message", "") and degraded

    # (reason PodsWithoutSidecar: these bare pods wait for a manual rollout; the message says both)
    degraded = wait_for(ambiguous, timeout=15, what="Degraded naming the ambiguous HPA target")
    assert degraded["status"] == "True"
    assert "Deployment/scaled-chat, Deployment/scaled-chat-canary" in degraded["message"]
    assert cluster.api("GET", hpa_path) is None
    cluster.api("DELETE", f"{ROUTES}/scaled")
    wait_for(lambda: cluster.api("GET", f"{ROUTES}/scaled") is None, timeout=15, what="route deleted")


async def test_status_aggregates_the_hints_of_real_sidecars(
    cluster: Cluster, mock: MockUpstream, sidecars: list[SidecarProcess], tmp_path: Path
) -> None:
    """Two real sidecar processes stand for two injected pods (podIP 127.0.0.1, their admin ports
    declared on the injected container): the route's status gets recommendedReplicas and
    configGeneration from their /hints."""
    route = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "hinted", "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "hinted"}},
            "upstream": {"url": mock.url},
            "limits": [{"name": "all", "requestsPerMinute": 6000}],
            "rollout": "manual",
            "autoscaling": {"targetInFlightPerPod": 1, "minReplicas": 1, "maxReplicas": 10},
        },
    }
    cluster.apply(route)
    wait_for(
        lambda: route_status(cluster, "hinted").get("observedGeneration") == 1, timeout=15, what="status"
    )
    route_file = tmp_path / "route.yaml"
    route_file.write_text(yaml.safe_dump({**route, "metadata": {**route["metadata"], "generation": 1}}))
    for index in range(2):
        sidecar = SidecarProcess(route_file, "--store", "memory")
        sidecars.append(sidecar)
        bare = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"hinted-{index}", "namespace": NAMESPACE, "labels": {"app": "hinted"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        }
        answer = cluster.review_pod(bare)
        injected = jsonpatch.apply_patch(bare, json.loads(base64.b64decode(answer["patch"])))
        (container,) = injected["spec"]["initContainers"]
        container["ports"] = [{"name": "llmroute-admin", "containerPort": sidecar.admin_port}]
        injected["status"] = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
        cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", injected)

    async with aiohttp.ClientSession() as session:
        held = [await hold_stream(session, sidecars[0].url) for _ in range(4)]
        status = await asyncio.to_thread(
            wait_for,
            lambda: (
                (route_status(cluster, "hinted").get("recommendedReplicas") or 0) >= 2
                and route_status(cluster, "hinted")
            ),
            20,
            0.05,
            "a recommendation above the minimum from the held streams",
        )
        mock.release()
        for response in held:
            response.close()
    assert status["configGeneration"] == 1  # every injected pod reports generation 1
    assert status["pods"] == {"matched": 2, "injected": 2, "ready": 2}
    cluster.api("DELETE", f"{ROUTES}/hinted")


class _ForbiddenHpas:
    """An API client whose HPA calls are refused (RBAC without autoscaling), for the error path."""

    def get_replicaset(self, namespace: str, name: str) -> None:
        return None

    def get_hpa(self, namespace: str, name: str) -> None:
        raise kube.ApiError(403, "horizontalpodautoscalers is forbidden")


def test_an_hpa_the_operator_may_not_manage_is_a_status_problem_not_a_crash() -> None:
    client: Any = _ForbiddenHpas()
    asking = route(autoscaling=AUTOSCALING)
    problem = handlers._ensure_hpa(client, {}, asking, [])
    assert problem is not None and "could not be managed: HTTP 403" in problem
    assert handlers._ensure_hpa(client, {}, route(), []) is None  # nothing asked, nothing to report
