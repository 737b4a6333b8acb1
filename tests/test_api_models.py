"""The LLMRoute models: defaults, bounds and the semantic rules a schema alone cannot express."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmroute_sidecar.api import LLMRoute, ManifestError, parse_route
from llmroute_sidecar.api.manifest import load_route, parse_route_text

ROOT = Path(__file__).resolve().parent.parent


def _route(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "chat"}},
        "upstream": {"url": "http://127.0.0.1:8000"},
    }
    base.update(spec)
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "r"},
        "spec": base,
    }


def _error(**spec: Any) -> str:
    with pytest.raises(ManifestError) as caught:
        parse_route(_route(**spec))
    return str(caught.value)


def test_defaults_follow_the_brief() -> None:
    route = parse_route(_route())
    spec = route.spec
    assert spec.upstream.timeout_seconds == 30 and spec.upstream.retries == 2
    assert spec.deadline_seconds == 60 and spec.queue_timeout_seconds == 5
    assert spec.identity.header == "Authorization"
    assert spec.on_store_failure == "allow"
    assert spec.readiness.max_in_flight == 64
    assert route.key == "default/r"


def test_camel_case_round_trip() -> None:
    route = parse_route(_route(limits=[{"name": "a", "key": "header:X-Tenant", "tokensPerMinute": 5}]))
    dumped = route.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["limits"][0]["tokensPerMinute"] == 5
    assert route.spec.limits[0].header_name == "X-Tenant"
    assert LLMRoute.model_validate(dumped) == route


def test_empty_selector_is_rejected() -> None:
    assert "selector is empty" in _error(selector={})


def test_selector_operator_needs_values() -> None:
    message = _error(selector={"matchExpressions": [{"key": "app", "operator": "In"}]})
    assert "spec.selector.matchExpressions[0]" in message and "needs at least one value" in message


def test_undefined_default_tier_is_named() -> None:
    message = _error(identity={"defaultTier": "gold"}, tiers={"free": {"requestsPerMinute": 1}})
    assert "defaultTier 'gold' is not defined in tiers (defined: free)" in message


def test_limit_without_values_is_rejected_unless_tiers_supply_them() -> None:
    assert "sets none of" in _error(limits=[{"name": "a", "key": "route"}])
    parse_route(_route(limits=[{"name": "a", "key": "apiKey"}], tiers={"free": {"requestsPerMinute": 1}}))


def test_min_replicas_above_max_is_rejected() -> None:
    assert "minReplicas (5) exceeds maxReplicas (2)" in _error(
        autoscaling={"minReplicas": 5, "maxReplicas": 2}
    )


def test_several_problems_are_reported_together_with_paths() -> None:
    message = _error(upstream={"url": "ftp://x"}, limits=[{"name": "Bad_Name", "requestsPerMinute": 1}])
    assert "spec.upstream.url: 'ftp://x' must be an http:// or https:// URL" in message
    assert "spec.limits[0].name: 'Bad_Name' must be a lower-case DNS label" in message


def test_wrong_kind_and_version() -> None:
    document = _route()
    document["apiVersion"] = "llmroute.dev/v1"
    with pytest.raises(ManifestError, match=r"apiVersion: 'llmroute\.dev/v1' must be llmroute\.dev/v1alpha1"):
        parse_route(document)


def test_load_route_reads_examples_and_skips_other_documents() -> None:
    route = load_route(ROOT / "examples" / "inbound-model-server.yaml")
    assert route.key == "ml-serving/vllm-chat"
    assert route.spec.tiers["premium"].requests_per_minute == 100


def test_route_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read route file"):
        load_route(tmp_path / "missing.yaml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        parse_route_text("a: [")
    with pytest.raises(ManifestError, match="exactly one document of kind LLMRoute, found 0"):
        parse_route_text("kind: Secret\n")
