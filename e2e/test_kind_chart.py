"""The whole in-cluster path in a throw-away kind cluster (``make e2e``): both images built from the
Dockerfile and loaded into kind, the Helm chart installed with them (default values: two replicas,
peering, self-managed webhook TLS), an example route and a Deployment of the mock upstream it
selects; then injection, status, traffic through the sidecar, a 429, an upgrade and the cleanup.

Skips with the reason when Docker, kind, kubectl or helm is missing. Runs after ``test_kind.py`` in
the same cluster (its out-of-cluster operator is stopped by then); the release is uninstalled at the
end of this module.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.cluster import ROOT, Kind, docker_build, suite_marks
from e2e.workload import (
    APPS,
    INVALID_MESSAGE,
    OPERATOR_IMAGE,
    SIDECAR_IMAGE,
    check_traffic,
    invalid_route,
    mock_app,
    route_manifest,
    traffic_script,
    upstream_address,
)
from tests.support.sidecar_procs import wait_for

pytestmark = suite_marks(("docker", "kind", "kubectl", "helm"), timeout=1800)

RELEASE, RELEASE_NAMESPACE = "llmroute", "llmroute-system"
APP = mock_app(route_manifest())["metadata"]["name"]


def diagnostics(cluster: Kind) -> str:
    """What to look at when something did not happen in time."""
    parts = []
    for args in (
        ["get", "pods", "-A", "-o", "wide"],
        ["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ["get", "llmroutes", "-A", "-o", "yaml"],
        [
            "logs",
            "-n",
            RELEASE_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=operator",
            "--tail=80",
            "--prefix",
        ],
        ["logs", "-n", APPS, "-l", f"app={APP}", "--all-containers", "--tail=40", "--prefix"],
    ):
        done = cluster.kubectl(*args, check=False)
        parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout[-5000:]}{done.stderr[-1000:]}")
    return "\n".join(parts)


def kubectl_wait(cluster: Kind, *args: str) -> None:
    """``kubectl wait`` / ``rollout status`` (watches, no polling); diagnostics when it fails."""
    done = cluster.kubectl(*args, check=False, timeout=400)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}\n{diagnostics(cluster)}"


def eventually(cluster: Kind, predicate: Any, timeout: float, what: str) -> Any:
    try:
        return wait_for(predicate, timeout=timeout, interval=1, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnostics(cluster)}") from None


@pytest.fixture(scope="module")
def release(cluster: Kind) -> Iterator[Kind]:
    """Both images in the cluster and the chart installed with them; the operator rolled out."""
    for target, tag in (("sidecar", SIDECAR_IMAGE), ("operator", OPERATOR_IMAGE)):
        cluster.load_image(docker_build(target, tag))
    operator_repo, operator_tag = OPERATOR_IMAGE.split(":")
    sidecar_repo, sidecar_tag = SIDECAR_IMAGE.split(":")
    cluster.helm(
        "install", RELEASE, str(ROOT / "helm" / "llmroute"), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace",
        "--set", f"image.repository={operator_repo}", "--set", f"image.tag={operator_tag}",
        "--set", f"sidecar.image.repository={sidecar_repo}", "--set", f"sidecar.image.tag={sidecar_tag}",
    )  # fmt: skip
    kubectl_wait(
        cluster, "rollout", "status", f"deployment/{RELEASE}", "-n", RELEASE_NAMESPACE, "--timeout=300s"
    )
    try:
        yield cluster
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", check=False)


@pytest.fixture(scope="module")
def app(release: Kind) -> Iterator[tuple[Kind, dict[str, Any], dict[str, Any]]]:
    """The route applied (and reconciled), then the Deployment it selects, rolled out."""
    cluster, route = release, route_manifest()
    cluster.kubectl("create", "namespace", APPS)
    cluster.apply(route)
    name = route["metadata"]["name"]
    eventually(cluster, lambda: cluster.get("configmap", f"llmroute-{name}", "-n", APPS), 60, "the ConfigMap")
    deployment = mock_app(route)
    cluster.apply(deployment)
    kubectl_wait(
        cluster,
        "rollout",
        "status",
        f"deployment/{APP}",
        "-n",
        APPS,
        "--timeout=300s",
    )
    (pod,) = cluster.get("pods", "-n", APPS, "-l", f"app={APP}")["items"]
    yield cluster, route, pod


def _ca_bundles(cluster: Kind) -> list[str]:
    bundles = []
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        (hook,) = (cluster.get(kind, RELEASE) or {"webhooks": [{}]})["webhooks"]
        bundles.append((hook.get("clientConfig") or {}).get("caBundle", ""))
    return bundles


def test_operator_replicas_peer_and_serve_a_ca_they_published(release: Kind) -> None:
    cluster = release
    deployment = cluster.get("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    assert deployment["status"]["readyReplicas"] == 2
    bundles = eventually(cluster, lambda: all(_ca_bundles(cluster)) and _ca_bundles(cluster), 120, "caBundle")
    assert all(b"BEGIN CERTIFICATE" in base64.b64decode(bundle) for bundle in bundles)
    secret = cluster.get("secret", f"{RELEASE}-webhook-tls", "-n", RELEASE_NAMESPACE)
    assert secret["data"]["tls.crt"] and secret["data"]["tls.key"]
    # both replicas keep their keep-alives in the chart's ClusterKopfPeering
    eventually(
        cluster,
        lambda: len((cluster.get("clusterkopfpeering", "llmroute") or {}).get("status") or {}) == 2,
        120,
        "two peers in ClusterKopfPeering llmroute",
    )


def _rejected_by_the_webhook(cluster: Kind) -> str | None:
    """A semantically invalid route checked with a server-side dry run: the API server calls
    /validate over TLS (under failurePolicy Ignore an unreachable webhook would let it through)."""
    stdin = json.dumps(invalid_route())
    done = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=stdin, check=False)
    return done.stderr if done.returncode != 0 else None


def test_the_api_server_calls_the_validating_webhook(release: Kind) -> None:
    message = eventually(release, lambda: _rejected_by_the_webhook(release), 120, "a /validate rejection")
    assert INVALID_MESSAGE in message


def test_selected_pods_get_the_native_sidecar(app: tuple[Kind, dict[str, Any], dict[str, Any]]) -> None:
    _, route, pod = app
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    (sidecar,) = [c for c in pod["spec"].get("initContainers", []) if c["name"] == "llmroute-sidecar"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["image"] == SIDECAR_IMAGE
    assert pod["metadata"]["annotations"]["llmroute.dev/route"] == route["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["llmroute-config"]["configMap"]["name"] == f"llmroute-{route['metadata']['name']}"
    statuses = {s["name"]: s for s in pod["status"]["initContainerStatuses"]}
    assert statuses["llmroute-sidecar"]["ready"] is True


def test_route_reports_its_pods_injected_and_ready(app: tuple[Kind, dict[str, Any], dict[str, Any]]) -> None:
    cluster, route, _ = app
    name = route["metadata"]["name"]
    kubectl_wait(
        cluster,
        "wait",
        f"llmroute/{name}",
        "-n",
        APPS,
        "--for=jsonpath={.status.podSummary}=1/1",
        "--timeout=120s",
    )
    kubectl_wait(cluster, "wait", f"llmroute/{name}", "-n", APPS, "--for=condition=Ready", "--timeout=60s")
    status = cluster.get("llmroute", name, "-n", APPS)["status"]
    assert status["pods"] == {"matched": 1, "injected": 1, "ready": 1}
    configmap = cluster.get("configmap", f"llmroute-{name}", "-n", APPS)
    assert status["configHash"] == configmap["metadata"]["annotations"]["llmroute.dev/config-hash"]


def test_traffic_flows_through_the_sidecar_and_the_limit_answers_429(
    app: tuple[Kind, dict[str, Any], dict[str, Any]],
) -> None:
    cluster, route, pod = app
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "llmroute-sidecar"]
    (port,) = [p["containerPort"] for p in sidecar["ports"] if p["name"] == "llmroute"]  # traffic port
    script = traffic_script(sidecar=f"127.0.0.1:{port}", upstream=upstream_address(route))
    done = cluster.kubectl(
        "exec", "-n", APPS, pod["metadata"]["name"], "-c", "app", "--", "python", "-c", script, check=False
    )
    assert done.returncode == 0, f"{done.stderr}\n{diagnostics(cluster)}"
    check_traffic(done.stdout)


def test_helm_upgrade_keeps_the_ca_bundle(app: tuple[Kind, dict[str, Any], dict[str, Any]]) -> None:
    cluster = app[0]
    before = _ca_bundles(cluster)
    assert all(before)
    cluster.helm("upgrade", RELEASE, str(ROOT / "helm" / "llmroute"), "--namespace", RELEASE_NAMESPACE,
                 "--reuse-values", "--set", "resyncSeconds=10")  # fmt: skip
    assert _ca_bundles(cluster) == before  # right after the upgrade, before any operator repair
    kubectl_wait(
        cluster, "rollout", "status", f"deployment/{RELEASE}", "-n", RELEASE_NAMESPACE, "--timeout=300s"
    )
    message = eventually(cluster, lambda: _rejected_by_the_webhook(cluster), 120, "a /validate rejection")
    assert INVALID_MESSAGE in message


def test_deleting_the_route_removes_its_configmap(app: tuple[Kind, dict[str, Any], dict[str, Any]]) -> None:
    cluster, route, pod = app
    name = route["metadata"]["name"]
    cluster.kubectl("delete", "llmroute", name, "-n", APPS, "--timeout=60s")
    eventually(
        cluster,
        lambda: cluster.get("configmap", f"llmroute-{name}", "-n", APPS) is None,
        60,
        "the route's ConfigMap to be deleted",
    )
    # the pod keeps running with its sidecar until its next rollout
    assert cluster.get("pod", pod["metadata"]["name"], "-n", APPS)["status"]["phase"] == "Running"
