"""The in-cluster suite's plan, checked without a cluster (runs everywhere): the route it applies is
valid, the chart's webhook and the operator would inject the Deployment it creates, and the traffic
it sends gets the answers it expects from a real sidecar in front of the real mock upstream."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from e2e.cluster import ROOT
from e2e.workload import (
    APPS,
    INVALID_MESSAGE,
    SIDECAR_IMAGE,
    check_traffic,
    invalid_route,
    mock_app,
    route_manifest,
    traffic_script,
    upstream_address,
)
from llmroute_operator import crd, render
from llmroute_operator import status as state
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import parse_route
from tests.support.kube_schema import validate_object
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, wait_for


def test_the_route_is_valid_and_the_invalid_one_is_rejected_for_the_expected_reason() -> None:
    schema = crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    route = route_manifest()
    assert validate_object(schema, route) == []
    assert parse_route(route).metadata.namespace == APPS
    bad = invalid_route()
    assert validate_object(schema, bad) == []  # only the webhook can reject it
    assert any(INVALID_MESSAGE in problem for problem in state.validate_route(bad))


def test_the_charts_webhook_and_the_operator_would_inject_the_app() -> None:
    route = route_manifest()
    deployment = mock_app(route)
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    with helm.Chart.load(str(ROOT / "helm" / "llmroute")) as chart:
        manifests = chart.render(name="llmroute", namespace="llmroute-system")
    webhooks = yaml.safe_load_all(manifests["llmroute/templates/webhooks.yaml"])
    (hook,) = next(doc for doc in webhooks if doc and doc["kind"] == "MutatingWebhookConfiguration")[
        "webhooks"
    ]
    assert render.selector_matches(hook["namespaceSelector"], {"kubernetes.io/metadata.name": APPS})
    assert render.selector_matches(hook["objectSelector"], template["metadata"]["labels"])
    pod = {"metadata": {"namespace": APPS, **template["metadata"]}, "spec": template["spec"]}
    settings = OperatorSettings(sidecar_image=SIDECAR_IMAGE)
    plan = render.plan_injection(pod, [parse_route(route)], settings)
    assert plan.reason == "Injected"
    assert settings.image == SIDECAR_IMAGE  # the tag given is used as is
    (container,) = template["spec"]["containers"]
    assert container["command"][-1] == upstream_address(route)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[SidecarProcess, MockUpstream]]:
    """The e2e route served by a real sidecar in front of a real mock upstream, on loopback."""
    route_file = tmp_path / "route.yaml"
    route_file.write_text(yaml.safe_dump(route_manifest()))
    upstream = MockUpstream()
    try:
        process = SidecarProcess(route_file, "--upstream", upstream.url)
        try:
            yield process, upstream
        finally:
            process.stop()
    finally:
        upstream.stop()


def test_the_traffic_gets_the_answers_the_suite_expects(sidecar: tuple[SidecarProcess, MockUpstream]) -> None:
    process, upstream = sidecar
    # the pod turns Ready only if /readyz passes: the route's upstream health path answers on the mock
    wait_for(lambda: process.readyz()[0] == 200, timeout=10, what="/readyz 200")
    script = traffic_script(sidecar=f"127.0.0.1:{process.port}", upstream=f"127.0.0.1:{upstream.port}")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    check_traffic(done.stdout)
