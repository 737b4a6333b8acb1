"""Upstream choice per request (pure): model globs, priorities, weights, open breakers, rewrites."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llmroute_sidecar.api import parse_route
from llmroute_sidecar.api.manifest import ManifestError
from llmroute_sidecar.api.spec import Readiness, RoutedUpstream, StoreFailurePolicy
from llmroute_sidecar.health import ErrorRate, HealthState, readiness_reasons
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.policy import ClientIdentity, RoutePolicy, UpstreamTarget, build_checks, load_policy
from llmroute_sidecar.routing import candidates, eligible, model_listing, upstream_model, with_model
from llmroute_sidecar.upstream_state import UpstreamStates


def _target(name: str, **fields: Any) -> UpstreamTarget:
    spec = RoutedUpstream.model_validate({"name": name, "url": f"http://{name}:8000", **fields})
    return UpstreamTarget(spec, spec.url, None)


def _names(targets: list[UpstreamTarget]) -> list[str]:
    return [target.name for target in targets]


def test_models_match_names_and_globs_and_empty_serves_everything() -> None:
    upstreams = [
        _target("azure", models=["gpt-4o"]),
        _target("openai", models=["gpt-4o*", "o1-*"]),
        _target("any"),
    ]
    assert _names(eligible(upstreams, "gpt-4o")) == ["azure", "openai", "any"]
    assert _names(eligible(upstreams, "gpt-4o-mini")) == ["openai", "any"]
    assert _names(eligible(upstreams, "o1-preview")) == ["openai", "any"]
    assert _names(eligible(upstreams, "claude-3")) == ["any"]
    assert _names(eligible(upstreams, None)) == ["any"]


def test_requests_without_a_model_go_to_the_first_priority_group_when_none_serves_all() -> None:
    upstreams = [
        _target("b", models=["x"], priority=2),
        _target("a", models=["y"], priority=1),
        _target("c", models=["z"], priority=1),
    ]
    assert _names(eligible(upstreams, None)) == ["a", "c"]
    assert eligible(upstreams, "nope") == []


def test_priorities_order_candidates_and_open_breakers_are_skipped() -> None:
    upstreams = [_target("late", priority=5), _target("early", priority=0), _target("mid", priority=1)]
    rng = random.Random(1)
    assert _names(candidates(upstreams, "m", rng)) == ["early", "mid", "late"]
    assert _names(candidates(upstreams, "m", rng, {"early"})) == ["mid", "late"]
    assert candidates(upstreams, "m", rng, {"early", "mid", "late"}) == []


def test_weights_share_the_first_pick_within_a_priority() -> None:
    upstreams = [_target("heavy", weight=3), _target("light", weight=1), _target("backup", priority=1)]
    rng = random.Random(42)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = _names(candidates(upstreams, "m", rng))
        assert order[-1] == "backup" and sorted(order[:2]) == ["heavy", "light"]
        firsts[order[0]] += 1
    # Expected 3000 / 1000; the bounds are more than 5 standard deviations (about 27) wide.
    assert 2850 < firsts["heavy"] < 3150
    assert firsts["heavy"] + firsts["light"] == 4000


def test_model_rewrite_and_body_replacement() -> None:
    target = _target("azure", models=["gpt-4o"], modelRewrite={"gpt-4o": "my-deployment"})
    assert upstream_model(target.spec, "gpt-4o") == "my-deployment"
    assert upstream_model(target.spec, "gpt-4o-mini") is None
    assert upstream_model(target.spec, None) is None
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hé"}]}).encode()
    assert json.loads(with_model(body, "my-deployment")) == {
        "model": "my-deployment",
        "messages": [{"role": "user", "content": "hé"}],
    }


def test_model_listing_names_plain_models_once_with_their_first_owner() -> None:
    upstreams = [
        _target("azure", models=["gpt-4o"]).spec,
        _target("openai", models=["gpt-4o", "gpt-4o-mini", "o1-*"]).spec,
        _target("any").spec,
    ]
    listing = model_listing(upstreams)
    assert listing == {
        "object": "list",
        "data": [
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "azure"},
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "openai"},
        ],
    }
    assert model_listing([_target("any").spec, _target("g", models=["x*"]).spec]) is None


def _route(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "exactly one of upstream"),
        (
            {"upstream": {"url": "http://a"}, "upstreams": [{"name": "a", "url": "http://a"}]},
            "exactly one of upstream",
        ),
        (
            {"upstreams": [{"name": "a", "url": "http://a"}, {"name": "a", "url": "http://b"}]},
            "repeated: a",
        ),
        (
            {
                "upstreams": [{"name": "a", "url": "http://a"}],
                "limits": [{"name": "l", "upstream": "b", "requestsPerMinute": 1}],
            },
            "attached to upstream 'b'",
        ),
        (
            {
                "upstream": {"url": "http://a"},
                "limits": [{"name": "l", "upstream": "a", "requestsPerMinute": 1}],
            },
            "needs spec.upstreams",
        ),
    ],
)
def test_upstream_spec_errors_are_clear(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_route(_route(spec))


def test_the_one_upstream_form_is_the_entry_named_default() -> None:
    route = parse_route(_route({"upstream": {"url": "http://a:1", "retries": 4}}))
    (only,) = route.spec.routed_upstreams
    assert (only.name, only.url, only.retries, only.models, only.priority) == (
        "default",
        "http://a:1",
        4,
        [],
        0,
    )


def _policy(upstreams: list[dict[str, Any]], tmp_path: Path, **spec: Any) -> RoutePolicy:
    return load_policy(parse_route(_route({"upstreams": upstreams, **spec})), tmp_path)


def test_upstream_states_follow_reloads_and_aggregate_readiness(tmp_path: Path) -> None:
    metrics, health = SidecarMetrics(), HealthState()
    states = UpstreamStates(metrics, health)
    breaker = {"consecutiveFailures": 1, "openSeconds": 600}
    both = [
        {"name": "a", "url": "http://a:1", "circuitBreaker": breaker},
        {"name": "b", "url": "http://b:1", "circuitBreaker": breaker},
    ]
    states.sync(_policy(both, tmp_path))
    gauge = metrics.registry.get_sample_value
    states.breaker("a").record_failure()
    assert states.open_names() == {"a"} and health.breaker_open is False
    assert gauge("llmroute_circuit_breaker_state", {"route": "ns/r", "upstream": "a"}) == 2
    states.breaker("b").record_failure()
    assert states.open_names() == {"a", "b"} and health.breaker_open is True
    states.set_health("a", False, "answered 503")
    states.set_health("b", True, "answered 200")
    assert health.upstream_healthy is True  # one upstream can still serve
    states.set_health("b", False, "answered 500")
    assert health.upstream_healthy is False and "a answered 503" in health.upstream_health_detail
    states.sync(_policy([both[1], {"name": "c", "url": "http://c:1"}], tmp_path))  # a removed, c added
    assert [s["name"] for s in states.snapshot()] == ["b", "c"]
    assert states.open_names() == {"b"} and health.breaker_open is False  # b kept its breaker
    assert gauge("llmroute_circuit_breaker_state", {"route": "ns/r", "upstream": "a"}) is None
    assert gauge("llmroute_circuit_breaker_state", {"route": "ns/r", "upstream": "c"}) == 0


def test_limits_attached_to_an_upstream_are_checked_only_for_it(tmp_path: Path) -> None:
    policy = _policy(
        [{"name": "a", "url": "http://a:1"}, {"name": "b", "url": "http://b:1"}],
        tmp_path,
        limits=[
            {"name": "route-rpm", "requestsPerMinute": 10},
            {"name": "a-rpm", "upstream": "a", "requestsPerMinute": 5},
        ],
    )
    assert policy.limited_upstreams == {"a"}
    assert [c.limit for c in build_checks(policy, ClientIdentity(), {})] == ["route-rpm"]
    assert [c.limit for c in build_checks(policy, ClientIdentity(), {}, upstream="a")] == ["a-rpm"]
    assert build_checks(policy, ClientIdentity(), {}, upstream="b") == ()


def test_error_rate_readiness_needs_every_upstream_failing() -> None:
    rules, health = Readiness(maxErrorRate=0.5), HealthState()
    health.upstream_errors = {"a": ErrorRate(), "b": ErrorRate()}
    for _ in range(10):
        health.upstream_errors["a"].record(False)
    assert readiness_reasons(health, rules, StoreFailurePolicy.ALLOW) == []  # b can serve
    for ok in [False] * 8 + [True] * 2:
        health.upstream_errors["b"].record(ok)
    (reason,) = readiness_reasons(health, rules, StoreFailurePolicy.ALLOW)
    assert reason.startswith("every upstream's lowest error rate 80%")
