"""The real operator process (``llmroute-operator``, kopf) against kmock's Kubernetes emulator.

The emulator (``tests/support/kube_emulator.py``) serves on a loopback port; routes are applied with
the real ``kubectl`` where it works against it, the webhooks get real AdmissionReview requests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from llmroute_operator import render
from tests.support.admission import POD_KIND, POD_RESOURCE, ROUTE_KIND, ROUTE_RESOURCE, admission_review
from tests.support.kube_emulator import EmulatorThread, write_kubeconfig
from tests.support.sidecar_procs import free_port, operator_command, stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "tests"
IMAGE = "registry.test/llmroute-sidecar:9.9.9"
REDIS = "redis://redis.tests:6379/0"
ROUTES = f"/apis/llmroute.dev/v1alpha1/namespaces/{NAMESPACE}/llmroutes"
KUBECTL = shutil.which("kubectl")


class Cluster:
    """The emulator, the operator process, and small HTTP/kubectl helpers."""

    def __init__(self, emulator: EmulatorThread, kubeconfig: Path, webhook: str, log: Path) -> None:
        self.emulator = emulator
        self.kubeconfig = kubeconfig
        self.webhook = webhook
        self.log = log

    def api(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.emulator.url + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        assert KUBECTL is not None
        done = subprocess.run(
            [KUBECTL, "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def apply(self, document: dict[str, Any]) -> None:
        """``kubectl apply`` (client-side; the emulator serves no OpenAPI, hence --validate=false)."""
        if KUBECTL is None:
            name = document["metadata"]["name"]
            if self.api("GET", f"{ROUTES}/{name}") is None:
                self.api("POST", ROUTES, document)
            else:
                self.api("PATCH", f"{ROUTES}/{name}", document, "application/merge-patch+json")
            return
        self.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(document))

    def review(self, path: str, obj: dict[str, Any], resource: dict[str, str], kind: dict[str, str]) -> Any:
        """POST a real admission.k8s.io/v1 AdmissionReview to the operator's webhook server."""
        review = admission_review(obj, NAMESPACE, resource, kind)
        request = urllib.request.Request(self.webhook + path, data=json.dumps(review).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["response"]["uid"] == review["request"]["uid"]
        return answer["response"]

    def review_pod(self, pod: dict[str, Any]) -> Any:
        return self.review(
            "/inject",
            pod,
            POD_RESOURCE,
            POD_KIND,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("operator")
    emulator = EmulatorThread().start()
    process: subprocess.Popen[bytes] | None = None
    log = tmp / "operator.log"
    try:
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", emulator.url, NAMESPACE)
        port = free_port()
        cluster = Cluster(emulator, kubeconfig, f"http://127.0.0.1:{port}", log)
        cluster.api(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "LLMROUTE_SIDECAR_IMAGE": IMAGE,
            "LLMROUTE_REDIS_URL": REDIS,
            "LLMROUTE_RESYNC_SECONDS": "1",
        }
        command = operator_command(NAMESPACE, port)
        with log.open("wb") as output:
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        wait_for(
            lambda: _answers(cluster.webhook) or process.poll() is not None, timeout=20, what="webhook server"
        )
        assert process.poll() is None, log.read_text()
        yield cluster
    finally:
        if process is not None:
            stop_process(process)
        emulator.stop()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url + "/probe", data=b"{}", method="POST"), timeout=1)
    except urllib.error.HTTPError:
        return True  # the server is up (and rightly rejects an empty review)
    except OSError:
        return False
    return True


def example(name: str = "header-keyed.yaml") -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    (route,) = [d for d in documents if d["kind"] == "LLMRoute"]
    route["metadata"]["namespace"] = NAMESPACE
    return dict(route)


def matching_labels() -> dict[str, str]:
    """Labels the example route's selector (matchLabels and a matchExpression) selects."""
    return {**example()["spec"]["selector"]["matchLabels"], "track": "stable"}


def route_status(cluster: Cluster, name: str) -> dict[str, Any]:
    body = cluster.api("GET", f"{ROUTES}/{name}") or {}
    return dict(body.get("status") or {})


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }


def configmap(cluster: Cluster, route_name: str) -> Any:
    return cluster.api(
        "GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{render.configmap_name_for(route_name)}"
    )


def test_apply_creates_configmap_status_and_event(cluster: Cluster) -> None:
    route = example()
    name = route["metadata"]["name"]
    cluster.apply(route)
    uid = wait_for(lambda: (cluster.api("GET", f"{ROUTES}/{name}") or {}).get("metadata", {}).get("uid"))
    cm = wait_for(lambda: configmap(cluster, name), timeout=15, what="the route's ConfigMap")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "LLMRoute"
    sidecar_view = yaml.safe_load(cm["data"]["route.yaml"])
    assert sidecar_view["metadata"] == {"name": name, "namespace": NAMESPACE, "generation": 1}
    assert sidecar_view["spec"]["limits"] == route["spec"]["limits"]

    status = wait_for(
        lambda: route_status(cluster, name).get("observedGeneration") == 1 and route_status(cluster, name)
    )
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Reconciled", 1)
    assert status["pods"] == {"matched": 0, "injected": 0, "ready": 0}
    assert status["podSummary"] == "0/0"

    def reconciled_event() -> Any:
        events = cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}/events") or {}
        return [
            e
            for e in events.get("items", [])
            if e.get("reason") == "Reconciled" and e.get("involvedObject", {}).get("name") == name
        ]

    (event,) = wait_for(reconciled_event, timeout=15, what="a Reconciled Event")
    assert event["type"] == "Normal"
    assert (cluster.api("GET", f"{ROUTES}/{name}") or {})["metadata"]["finalizers"] == [
        "llmroute.dev/finalizer"
    ]


def test_updating_limits_updates_configmap_and_observed_generation(cluster: Cluster) -> None:
    route = example()
    name = route["metadata"]["name"]
    route["spec"]["limits"][0]["requestsPerMinute"] = 7
    cluster.apply(route)

    def updated() -> Any:
        cm = configmap(cluster, name) or {"data": {"route.yaml": "{}"}}
        document = yaml.safe_load(cm["data"]["route.yaml"])
        return document.get("metadata", {}).get("generation") == 2 and document

    document = wait_for(updated, timeout=15, what="the ConfigMap of generation 2")
    assert document["spec"]["limits"][0]["requestsPerMinute"] == 7
    status = wait_for(
        lambda: route_status(cluster, name).get("observedGeneration") == 2 and route_status(cluster, name)
    )
    assert condition(status, "Ready")["observedGeneration"] == 2


def test_webhook_injects_a_matching_pod_once(cluster: Cluster) -> None:
    route = example()
    labels = matching_labels()
    wait_for(lambda: route_status(cluster, route["metadata"]["name"]).get("observedGeneration"))
    new_pod = pod("tenant-api-abc12", labels)
    new_pod["metadata"].pop("namespace")  # as a ReplicaSet's pod arrives: namespace only in the review
    answer = cluster.review_pod(new_pod)
    assert answer["allowed"] is True
    assert answer["patchType"] == "JSONPatch"
    injected = jsonpatch.apply_patch(new_pod, json.loads(base64.b64decode(answer["patch"])))
    (sidecar,) = injected["spec"]["initContainers"]
    assert sidecar["name"] == "llmroute-sidecar"
    assert sidecar["image"] == IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"][:2] == ["--route", "/etc/llmroute/route/route.yaml"]
    assert {"name": "LLMROUTE_REDIS_URL", "value": REDIS} in sidecar["env"]
    assert {
        "name": "llmroute-config",
        "configMap": {"name": render.configmap_name_for(route["metadata"]["name"])},
    } in injected["spec"]["volumes"]
    assert injected["metadata"]["annotations"]["llmroute.dev/route"] == route["metadata"]["name"]
    assert injected["metadata"]["annotations"]["llmroute.dev/config-hash"]
    assert [c["name"] for c in injected["spec"]["containers"]] == ["app"]

    again = cluster.review_pod(injected)
    assert again["allowed"] is True
    assert "patch" not in again


def test_webhook_leaves_other_pods_alone(cluster: Cluster) -> None:
    canary_only = {**matching_labels(), "track": "experimental"}
    opted = pod("opted", matching_labels())
    opted["metadata"]["annotations"] = {"llmroute.dev/inject": "false"}
    for other in (pod("web-1", {"app": "web"}), pod("exp-1", canary_only), opted):
        answer = cluster.review_pod(other)
        assert answer["allowed"] is True
        assert "patch" not in answer


def test_validate_rejects_an_invalid_route_with_a_clear_message(cluster: Cluster) -> None:
    invalid = example()
    invalid["spec"]["limits"].append(dict(invalid["spec"]["limits"][0]))
    answer = cluster.review("/validate", invalid, ROUTE_RESOURCE, ROUTE_KIND)
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 422
    assert "limit names must be unique; repeated:" in answer["status"]["message"]
    assert cluster.review("/validate", example(), ROUTE_RESOURCE, ROUTE_KIND)["allowed"] is True


def test_an_invalid_route_that_slips_through_is_reported_not_crashed_on(cluster: Cluster) -> None:
    invalid = example()
    invalid["metadata"]["name"] = "broken"
    invalid["spec"]["limits"].append(dict(invalid["spec"]["limits"][0]))
    cluster.api("POST", ROUTES, invalid)  # straight to the API: no validating webhook in front
    ready = wait_for(lambda: condition(route_status(cluster, "broken"), "Ready"), timeout=15)
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "limit names must be unique" in ready["message"]
    assert configmap(cluster, "broken") is None
    cluster.api("DELETE", f"{ROUTES}/broken")
    wait_for(lambda: cluster.api("GET", f"{ROUTES}/broken") is None, timeout=15, what="broken route deleted")


def test_matched_pods_without_sidecar_restart_their_deployment(cluster: Cluster) -> None:
    route = example()
    labels = matching_labels()
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tenant-api", "namespace": NAMESPACE},
        "spec": {"template": {"metadata": {"labels": labels}, "spec": {"containers": []}}},
    }
    replicaset = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": "tenant-api-6f7d",
            "namespace": NAMESPACE,
            "ownerReferences": [{"kind": "Deployment", "name": "tenant-api", "controller": True}],
        },
    }
    bare = pod("tenant-api-6f7d-x1", labels)
    bare["metadata"]["ownerReferences"] = [
        {"kind": "ReplicaSet", "name": "tenant-api-6f7d", "controller": True}
    ]
    cluster.api("POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", deployment)
    cluster.api("POST", f"/apis/apps/v1/namespaces/{NAMESPACE}/replicasets", replicaset)
    cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", bare)

    def restarted() -> Any:
        found = cluster.api("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/tenant-api") or {}
        annotations = found["spec"]["template"]["metadata"].get("annotations") or {}
        return annotations.get("llmroute.dev/restartedAt") and annotations

    annotations = wait_for(restarted, timeout=15, what="the Deployment restarted by the resync timer")
    assert annotations["llmroute.dev/restartedFor"]
    status = wait_for(
        lambda: (
            route_status(cluster, route["metadata"]["name"]).get("pods", {}).get("matched") == 1
            and route_status(cluster, route["metadata"]["name"])
        )
    )
    assert status["podsNeedingRollout"] == ["tenant-api-6f7d-x1"]
    degraded = condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PodsWithoutSidecar")


def test_delete_cleans_owned_objects_and_removes_the_finalizer(cluster: Cluster) -> None:
    name = example()["metadata"]["name"]
    assert configmap(cluster, name) is not None
    if KUBECTL is not None:
        cluster.kubectl("delete", "llmroutes.llmroute.dev", name, "-n", NAMESPACE, "--wait=false")
    else:
        cluster.api("DELETE", f"{ROUTES}/{name}")
    wait_for(
        lambda: cluster.api("GET", f"{ROUTES}/{name}") is None,
        timeout=15,
        what="route gone (finalizer removed)",
    )
    assert configmap(cluster, name) is None


def test_kopf_run_on_the_handlers_module_serves_the_same_operator(cluster: Cluster, tmp_path: Path) -> None:
    """``kopf run -m llmroute_operator.handlers``: the same handlers, configured by LLMROUTE_* alone."""
    namespace = "kopf-run"
    cluster.api(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    webhook_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "LLMROUTE_WEBHOOK_LISTEN": f"127.0.0.1:{webhook_port}",
        "LLMROUTE_WEBHOOK_INSECURE": "true",
        "LLMROUTE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "LLMROUTE_SIDECAR_IMAGE": IMAGE,
    }
    kopf_cli = str(Path(sys.executable).parent / "kopf")
    command = [kopf_cli, "run", "-m", "llmroute_operator.handlers", "--standalone", "-n", namespace]
    log = tmp_path / "kopf-run.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        route = {**example(), "metadata": {"name": "via-kopf-run", "namespace": namespace}}
        cluster.api("POST", f"/apis/llmroute.dev/v1alpha1/namespaces/{namespace}/llmroutes", route)
        path = f"/api/v1/namespaces/{namespace}/configmaps/{render.configmap_name_for('via-kopf-run')}"
        wait_for(lambda: cluster.api("GET", path) or process.poll() is not None, timeout=20, what="ConfigMap")
        assert process.poll() is None, log.read_text()

        def counted() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                return b'llmroute_operator_reconciles_total{outcome="ok"} 1.0' in response.read()

        wait_for(counted, timeout=10, what="the reconcile counted on /metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            exported = response.read()
        for state in ("matched", "injected", "ready"):  # no pods yet: the route's series exist at 0
            series = f'llmroute_operator_route_pods{{route="{namespace}/via-kopf-run",state="{state}"}}'
            assert f"{series} 0.0".encode() in exported
        assert _answers(f"http://127.0.0.1:{webhook_port}")
    finally:
        stop_process(process)
