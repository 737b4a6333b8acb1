"""The operator and spec.upstreams (pure): every vendor key mounted, per-upstream status from hints."""

from __future__ import annotations

from typing import Any

from llmroute_operator import render, status
from llmroute_operator.route_status_view import upstream_summary
from llmroute_sidecar.api.status import LLMRouteStatus
from tests.test_operator_render import NOW, route

UPSTREAMS = [
    {"name": "azure", "url": "https://azure.test", "apiKeySecretRef": {"name": "azure-key", "key": "k"}},
    {"name": "openai", "url": "https://openai.test", "apiKeySecretRef": {"name": "openai-key", "key": "k"}},
]


def multi(**spec: Any) -> Any:
    return route(upstream=None, upstreams=UPSTREAMS, **spec)


def hint(**upstreams: tuple[str, bool | None]) -> dict[str, Any]:
    """A pod's /hints answer reporting (breaker, healthy) per upstream name."""
    entries = [{"name": n, "url": "x", "breaker": b, "healthy": h} for n, (b, h) in upstreams.items()]
    return {"inflightAvg": 0.0, "generation": 3, "upstreams": entries}


def test_every_upstreams_vendor_key_is_mounted() -> None:
    assert render.secret_names(multi()) == ["azure-key", "openai-key"]
    volumes = [v["name"] for v in render.sidecar_volumes(multi())]
    assert volumes == ["llmroute-config", "llmroute-secret-azure-key", "llmroute-secret-openai-key"]


def test_upstream_status_counts_ready_and_breaker_open_pods() -> None:
    hints = [
        hint(azure=("closed", True), openai=("closed", True)),
        hint(azure=("open", True), openai=("half_open", None)),
        hint(azure=("closed", False), openai=("open", False)),
        {"inflightAvg": 0.0},  # an older sidecar: reports no upstream
    ]
    assert status.upstream_status(multi(), hints) == [
        {"name": "azure", "url": "https://azure.test", "readyPods": 1, "breakerOpenPods": 1},
        {"name": "openai", "url": "https://openai.test", "readyPods": 2, "breakerOpenPods": 1},
    ]


def test_route_status_reports_upstreams_only_for_spec_upstreams_and_keeps_them_without_hints() -> None:
    observed = status.Observation(hints=[hint(azure=("open", True), openai=("closed", True))])
    reported = status.route_status(multi(), observed, None, NOW)
    assert [(u["name"], u["readyPods"], u["breakerOpenPods"]) for u in reported["upstreams"]] == [
        ("azure", 0, 1),
        ("openai", 1, 0),
    ]
    modelled = {key: value for key, value in reported.items() if key != "podSummary"}  # podSummary: crd.py
    LLMRouteStatus.model_validate(modelled)  # the status schema accepts it
    kept = status.route_status(multi(), status.Observation(), reported, NOW)
    assert kept["upstreams"] == reported["upstreams"]
    assert "upstreams" not in status.route_status(route(), observed, None, NOW)


def test_the_status_command_names_every_upstream() -> None:
    assert (
        upstream_summary({"upstreams": UPSTREAMS}) == "azure=https://azure.test, openai=https://openai.test"
    )
    assert upstream_summary({"upstream": {"url": "http://up:8000"}}) == "http://up:8000"
    assert upstream_summary({}) is None
