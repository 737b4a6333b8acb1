"""The operator's own metrics helpers, its peering priority and where it finds a pod's hints."""

from __future__ import annotations

import kopf
import pytest

from llmroute_operator import metrics, render
from llmroute_operator.cli import start_time_priority


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_reconcile_outcomes_are_counted_and_timed() -> None:
    before = {
        outcome: sample("llmroute_operator_reconciles_total", outcome=outcome)
        for outcome in ("ok", "invalid", "error")
    }
    timed = sample("llmroute_operator_reconcile_duration_seconds_count")
    with metrics.observe_reconcile():
        pass
    with metrics.observe_reconcile() as outcome:
        outcome[0] = "invalid"
    with pytest.raises(RuntimeError), metrics.observe_reconcile():
        raise RuntimeError("API down")
    for outcome in ("ok", "invalid", "error"):
        assert sample("llmroute_operator_reconciles_total", outcome=outcome) == before[outcome] + 1
    assert sample("llmroute_operator_reconcile_duration_seconds_count") == timed + 3


def test_webhook_denials_and_errors_are_told_apart() -> None:
    def count(outcome: str) -> float:
        return sample("llmroute_operator_webhook_requests_total", webhook="validate", outcome=outcome)

    before = {outcome: count(outcome) for outcome in ("allowed", "denied", "error")}
    with metrics.observe_webhook("validate"):
        pass
    with pytest.raises(kopf.AdmissionError), metrics.observe_webhook("validate"):
        raise kopf.AdmissionError("invalid LLMRoute", code=422)
    with pytest.raises(KeyError), metrics.observe_webhook("validate"):
        raise KeyError("bug")
    assert {outcome: count(outcome) - before[outcome] for outcome in before} == {
        "allowed": 1,
        "denied": 1,
        "error": 1,
    }


def test_older_replicas_rank_higher_in_peering() -> None:
    assert start_time_priority(1_000.0) > start_time_priority(1_000.5)
    assert start_time_priority(1_000.0) != start_time_priority(1_000.001)


def test_hints_are_read_from_the_declared_admin_port() -> None:
    declared = {
        "spec": {
            "initContainers": [
                {"name": render.SIDECAR_NAME, "ports": [{"name": "llmroute-admin", "containerPort": 9191}]}
            ]
        }
    }
    assert render.admin_port(declared) == 9191
    assert render.admin_port({"spec": {"containers": [{"name": "app"}]}}) == render.ADMIN_PORT


def test_route_status_is_exported_and_forgotten() -> None:
    route = "team-a/metrics-test"
    status = {"pods": {"matched": 3, "injected": 2, "ready": 1}, "recommendedReplicas": 4}
    metrics.record_route_status(route, status)
    pods = {s: sample("llmroute_operator_route_pods", route=route, state=s) for s in metrics.POD_STATES}
    assert pods == {"matched": 3, "injected": 2, "ready": 1}
    assert sample("llmroute_operator_recommended_replicas", route=route) == 4
    metrics.record_route_status(route, {"pods": {"matched": 2, "injected": 2, "ready": 2}})
    assert sample("llmroute_operator_route_pods", route=route, state="injected") == 2
    assert (
        metrics.REGISTRY.get_sample_value("llmroute_operator_recommended_replicas", {"route": route}) is None
    )
    metrics.record_route_status(route, status)
    metrics.forget_route(route)
    metrics.forget_route(route)  # twice is fine
    for state in metrics.POD_STATES:
        assert (
            metrics.REGISTRY.get_sample_value(
                "llmroute_operator_route_pods", {"route": route, "state": state}
            )
            is None
        )
    assert (
        metrics.REGISTRY.get_sample_value("llmroute_operator_recommended_replicas", {"route": route}) is None
    )
