"""The operator against a real API server in a throw-away kind cluster (``make e2e``).

Skips with the reason when Docker, kind or kubectl is missing. Covers what the emulator cannot prove:
the generated CRD accepted and enforced by a real API server (structural schema, list-map keys), and
the operator, run here out of the cluster, reconciling there (ConfigMap with owner reference, status
subresource, Events, finalizer, deletion). The installed chart, images and in-cluster injection are
``test_kind_chart.py``'s (same cluster, after this module: its local operator is stopped by then).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import Kind, suite_marks
from tests.support.sidecar_procs import free_port, operator_command, stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "llmroute-e2e"

pytestmark = suite_marks(("docker", "kind", "kubectl"), timeout=900)


@pytest.fixture(scope="module")
def kind(cluster: Kind) -> Kind:
    """The session's cluster with the CRD from ``crds/`` and this module's namespace."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmroutes.llmroute.dev", "--timeout=60s")
    cluster.kubectl("create", "namespace", NAMESPACE)
    return cluster


@pytest.fixture(scope="module")
def operator(kind: Kind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(kind.kubeconfig), "LLMROUTE_RESYNC_SECONDS": "2"}
    command = operator_command(NAMESPACE, free_port())
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop_process(process, timeout=20)
        print(log.read_text()[-5000:])


def example() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((ROOT / "examples" / "header-keyed.yaml").read_text()) if d]
    (route,) = [d for d in documents if d["kind"] == "LLMRoute"]
    route["metadata"]["namespace"] = NAMESPACE
    return dict(route)


def test_the_api_server_enforces_the_generated_schema(kind: Kind) -> None:
    bad = example()
    bad["metadata"]["name"] = "bad-key"
    bad["spec"]["limits"][0]["requestsPerMinute"] = "many"
    done = kind.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad), check=False)
    assert done.returncode != 0
    assert "requestsPerMinute" in done.stderr


def test_route_is_reconciled_and_cleaned_up(kind: Kind, operator: subprocess.Popen[bytes]) -> None:
    route = example()
    name = route["metadata"]["name"]
    kind.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(route))
    cm = wait_for(lambda: kind.get("configmap", f"llmroute-{name}", "-n", NAMESPACE), timeout=60, interval=1)
    uid = kind.get("llmroute", name, "-n", NAMESPACE)["metadata"]["uid"]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid

    def ready() -> Any:
        status = (kind.get("llmroute", name, "-n", NAMESPACE) or {}).get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        return conditions.get("Ready", {}).get("status") == "True" and status

    status = wait_for(ready, timeout=60, interval=1)
    assert status["observedGeneration"] == 1
    assert status["podSummary"] == "0/0"
    printed = kind.kubectl("get", "llmroute", name, "-n", NAMESPACE).stdout
    assert "0/0" in printed and "True" in printed  # printer columns

    route["spec"]["limits"][0]["requestsPerMinute"] = 7
    kind.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(route))
    wait_for(
        lambda: (
            (kind.get("llmroute", name, "-n", NAMESPACE) or {}).get("status", {}).get("observedGeneration")
            == 2
        ),
        timeout=60,
        interval=1,
    )
    cm = kind.get("configmap", f"llmroute-{name}", "-n", NAMESPACE)
    assert "requestsPerMinute: 7" in cm["data"]["route.yaml"]

    kind.kubectl("delete", "llmroute", name, "-n", NAMESPACE, "--timeout=60s")
    wait_for(
        lambda: kind.get("configmap", f"llmroute-{name}", "-n", NAMESPACE) is None, timeout=60, interval=1
    )
    assert operator.poll() is None
