"""Two operator replicas with kopf peering against the emulator: one reconciles, both inject.

Also proves the operator's own metrics endpoint (which replica reconciled is read from it), that pod
events (not the resync period, set to 5 minutes here) refresh a route's pod counts, and that the
standby replica takes over when the active one is killed without saying goodbye.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.support.admission import admission_review
from tests.support.kube_emulator import EmulatorThread, write_kubeconfig
from tests.support.sidecar_procs import free_port, operator_command, stop_process, wait_for
from tests.test_operator_kopf import (
    IMAGE,
    NAMESPACE,
    REDIS,
    ROUTES,
    Cluster,
    _answers,
    configmap,
    example,
    matching_labels,
    pod,
    route_status,
)

PEERING = "llmroute"
PEERING_PATH = f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings"
LIFETIME_SECONDS = 4


class Replica:
    """One operator process: its webhook and metrics ports, its log."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str]) -> None:
        self.webhook_port, self.metrics_port = free_port(), free_port()
        self.log = tmp / f"{name}.log"
        command = operator_command(NAMESPACE, self.webhook_port, self.metrics_port, peering=PEERING)
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.webhook_port}"

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from the replica's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        sample = f"{name}{{{wanted}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.process, sig)


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[Cluster, Replica, Replica]]:
    emulator = EmulatorThread().start()
    replicas: list[Replica] = []
    try:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url, NAMESPACE)
        cluster = Cluster(emulator, kubeconfig, "", tmp_path / "first.log")
        cluster.api(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        cluster.api(
            "POST",
            PEERING_PATH,
            {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}, "status": {}},
        )
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "LLMROUTE_SIDECAR_IMAGE": IMAGE,
            "LLMROUTE_REDIS_URL": REDIS,
            "LLMROUTE_RESYNC_SECONDS": "300",  # only pod events can refresh the counts in this test
            "LLMROUTE_PEERING_LIFETIME_SECONDS": str(LIFETIME_SECONDS),
        }
        first = Replica("first", tmp_path, env)
        replicas.append(first)
        wait_for(
            lambda: _answers(first.webhook) or first.process.poll() is not None, timeout=20, what="webhook"
        )
        wait_for(lambda: len(peers(cluster)) == 1, timeout=20, what="the first replica in the peering object")
        second = Replica("second", tmp_path, env)
        replicas.append(second)
        wait_for(
            lambda: _answers(second.webhook) or second.process.poll() is not None, timeout=20, what="webhook"
        )
        wait_for(lambda: len(peers(cluster)) == 2, timeout=20, what="both replicas in the peering object")
        for replica in replicas:
            assert replica.process.poll() is None, replica.log.read_text()
        yield cluster, first, second
    finally:
        for replica in replicas:
            replica.stop()
        emulator.stop()


def peers(cluster: Cluster) -> dict[str, Any]:
    body = cluster.api("GET", f"{PEERING_PATH}/{PEERING}") or {}
    return {key: value for key, value in (body.get("status") or {}).items() if value}


def reconciles(replica: Replica) -> float:
    return replica.metric("llmroute_operator_reconciles_total", outcome="ok")


def review_pod(webhook: str, body: dict[str, Any]) -> dict[str, Any]:
    review = admission_review(body, NAMESPACE)
    request = urllib.request.Request(webhook + "/inject", data=json.dumps(review).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.loads(response.read())["response"])


def test_one_replica_reconciles_both_inject_and_the_standby_takes_over(
    pair: tuple[Cluster, Replica, Replica],
) -> None:
    cluster, first, second = pair
    route = example()
    name = route["metadata"]["name"]
    cluster.api("POST", ROUTES, route)
    wait_for(lambda: route_status(cluster, name).get("observedGeneration") == 1, timeout=20, what="status")
    assert configmap(cluster, name) is not None

    # The oldest replica is the active one; the younger one stands by (its metrics say so).
    wait_for(lambda: reconciles(first) >= 1, timeout=10, what="a reconcile counted by the first replica")
    assert reconciles(second) == 0

    # The standby still injects: its webhook reads routes from the API, not its paused watches.
    new_pod = pod("ha-app-1", matching_labels())
    answer = review_pod(second.webhook, new_pod)
    assert answer["allowed"] is True and answer.get("patch"), answer
    injected = jsonpatch.apply_patch(new_pod, json.loads(base64.b64decode(answer["patch"])))
    assert second.metric("llmroute_operator_pods_injected_total") == 1
    assert (
        second.metric("llmroute_operator_webhook_requests_total", webhook="inject", outcome="injected") == 1
    )

    # A pod event (not the 5-minute resync) refreshes the active replica's pod counts.
    injected["status"] = {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    injected["status"]["phase"] = "Running"
    cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", injected)
    counts = wait_for(
        lambda: (
            (route_status(cluster, name).get("pods") or {}).get("injected") == 1
            and route_status(cluster, name)["pods"]
        ),
        timeout=15,
        what="pod counts refreshed by the pod event",
    )
    assert counts == {"matched": 1, "injected": 1, "ready": 1}

    # The active replica dies without a goodbye: the standby takes over once its keep-alive lapses.
    first.stop(signal.SIGKILL)
    cluster.api(
        "PATCH",
        f"{ROUTES}/{name}",
        {"spec": {"limits": [{**route["spec"]["limits"][0], "requestsPerMinute": 11}]}},
        "application/merge-patch+json",
    )

    def limit_applied() -> bool:
        document = yaml.safe_load(
            (configmap(cluster, name) or {"data": {"route.yaml": "{}"}})["data"]["route.yaml"]
        )
        limits = (document.get("spec") or {}).get("limits") or [{}]
        return bool(limits[0].get("requestsPerMinute") == 11)

    wait_for(limit_applied, timeout=LIFETIME_SECONDS + 30, what="the standby reconciling after the takeover")
    wait_for(lambda: reconciles(second) >= 1, timeout=10, what="reconciles counted by the new active replica")
    assert second.process.poll() is None, second.log.read_text()
