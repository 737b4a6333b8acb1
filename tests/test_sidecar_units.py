"""Pure pieces of the sidecar: identity and limit checks, headers, readiness rules, settings, tracing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from llmroute_sidecar.api import parse_route
from llmroute_sidecar.api.spec import Readiness, StoreFailurePolicy
from llmroute_sidecar.config import SettingsError, load_settings
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.headers import end_to_end, rate_limit_headers, retry_after
from llmroute_sidecar.health import ErrorRate, HealthState, readiness_reasons
from llmroute_sidecar.hints import HintTracker
from llmroute_sidecar.policy import build_checks, client_key, identify, load_policy
from llmroute_sidecar.quota.base import Decision, Dimension, LimitState
from llmroute_sidecar.tracing import child_trace, request_id


def _route(**spec: Any) -> Any:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"a": "b"}},
        "upstream": {"url": "http://127.0.0.1:1"},
    }
    base.update(spec)
    return parse_route(
        {"apiVersion": "llmroute.dev/v1alpha1", "kind": "LLMRoute", "metadata": {"name": "r"}, "spec": base}
    )


def _keys_dir(tmp_path: Path, keys: dict[str, str]) -> Path:
    directory = tmp_path / "secrets" / "keys"
    directory.mkdir(parents=True)
    for key, tier in keys.items():
        (directory / hashlib.sha256(key.encode()).hexdigest()).write_text(tier + "\n")
    (directory / "..data").mkdir()  # what a Secret volume holds besides the keys
    return tmp_path / "secrets"


TIERED = {
    "identity": {"keysSecretRef": {"name": "keys"}},
    "tiers": {
        "free": {"requestsPerMinute": 5, "concurrentRequests": 1},
        "premium": {"requestsPerMinute": 100},
    },
    "limits": [
        {"name": "per-key", "key": "apiKey", "requestsPerMinute": 10, "tokensPerMinute": 1000},
        {"name": "all", "key": "route", "concurrentRequests": 50},
        {"name": "tenant", "key": "header:X-Tenant", "requestsPerHour": 7, "mode": "shadow"},
    ],
}


def test_identity_resolves_tiers_and_applies_their_values(tmp_path: Path) -> None:
    policy = load_policy(_route(**TIERED), _keys_dir(tmp_path, {"sk-free": "free", "sk-gold": "premium"}))
    free = identify(policy, {"Authorization": "Bearer sk-free"})
    assert free.tier == "free" and free.key_hash == hashlib.sha256(b"sk-free").hexdigest()
    per_key, route_wide, tenant = build_checks(policy, free, {"X-Tenant": "acme"})
    assert (per_key.requests_per_minute, per_key.concurrent_requests, per_key.tokens_per_minute) == (
        5,
        1,
        1000,
    )
    assert per_key.subject == free.key_hash[:32] and "sk-free" not in repr(per_key)
    assert route_wide.subject == "" and route_wide.concurrent_requests == 50
    assert tenant.shadow and tenant.subject == hashlib.sha256(b"acme").hexdigest()[:32]
    premium = build_checks(policy, identify(policy, {"Authorization": "sk-gold"}), {})[0]
    assert premium.requests_per_minute == 100 and premium.concurrent_requests is None


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer nope"}, "invalid_api_key"),
        ({"Authorization": "Bearer "}, "missing_api_key"),
    ],
)
def test_unknown_or_missing_keys_are_401(tmp_path: Path, headers: dict[str, str], code: str) -> None:
    policy = load_policy(_route(**TIERED), _keys_dir(tmp_path, {"sk-free": "free"}))
    with pytest.raises(ProxyError) as caught:
        identify(policy, headers)
    assert caught.value.status == 401 and caught.value.code == code
    assert "nope" not in caught.value.message


def test_routes_without_key_limits_need_no_key() -> None:
    policy = load_policy(_route(limits=[{"name": "a", "requestsPerMinute": 1}]), Path("/nonexistent"))
    assert identify(policy, {}).key_hash is None


def _header_policy(**limit: Any) -> Any:
    spec = {"name": "t", "key": "header:X-T", "requestsPerMinute": 1, **limit}
    return load_policy(_route(limits=[spec, {"name": "all", "requestsPerMinute": 5}]), Path("/x"))


@pytest.mark.parametrize("headers", [{}, {"X-T": ""}, {"X-T": "  "}])
def test_missing_limit_header_is_rejected_by_default(headers: dict[str, str]) -> None:
    policy = _header_policy()
    with pytest.raises(ProxyError) as caught:
        build_checks(policy, identify(policy, headers), headers)
    assert caught.value.status == 400 and caught.value.code == "missing_limit_header"
    assert "X-T" in caught.value.message and "'t'" in caught.value.message


def test_missing_header_value_shares_one_bucket_only_when_asked() -> None:
    policy = _header_policy(whenMissing="shared")
    checks = build_checks(policy, identify(policy, {}), {})
    assert [(c.limit, c.subject) for c in checks] == [("t", "-"), ("all", "")]


def test_missing_header_skips_the_limit_when_asked_and_for_shadow_limits() -> None:
    for policy in (_header_policy(whenMissing="skip"), _header_policy(mode="shadow")):
        assert [c.limit for c in build_checks(policy, identify(policy, {}), {})] == ["all"]


def test_present_header_is_counted_per_value_whatever_when_missing_says() -> None:
    for when in ("reject", "shared", "skip"):
        policy = _header_policy(whenMissing=when)
        (a, _), (b, _) = (build_checks(policy, identify(policy, {}), {"X-T": v}) for v in ("x", "y"))
        assert a.subject != b.subject and "-" not in (a.subject, b.subject)


def test_missing_secret_is_a_clear_error(tmp_path: Path) -> None:
    route = _route(upstream={"url": "http://h", "apiKeySecretRef": {"name": "vendor", "key": "k"}})
    with pytest.raises(ValueError, match=r"upstream.apiKeySecretRef: cannot read mounted secret .*vendor/k"):
        load_policy(route, tmp_path)


def test_client_key_strips_bearer_case_insensitively() -> None:
    assert client_key({"Authorization": "bearer  abc "}, "Authorization") == "abc"
    assert client_key({"X-API-Key": "abc"}, "X-API-Key") == "abc"
    assert client_key({}, "X-API-Key") is None


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Keep", "a"),
            ("X-Keep", "b"),
            ("Host", "h"),
        ]
    )
    kept = end_to_end(headers, drop=["Host"])
    assert kept.getall("X-Keep") == ["a", "b"] and len(kept) == 2


def _state(dimension: Dimension, remaining: int, reset: float, limit: int = 10) -> LimitState:
    return LimitState("lim", "route", dimension, limit, remaining, reset)


def test_rate_limit_headers_name_the_binding_limit() -> None:
    rejected = _state(Dimension.REQUESTS_PER_MINUTE, 0, 42.2)
    decision = Decision(
        admitted=False,
        rejected=rejected,
        retry_after=12.1,
        states=(rejected, _state(Dimension.CONCURRENT_REQUESTS, 3, 0)),
    )
    headers = rate_limit_headers(decision)
    assert headers["X-RateLimit-Limit"] == "10" and headers["X-RateLimit-Remaining"] == "0"
    # the rejecting limit resets when the request could pass: the same moment as Retry-After
    assert headers["X-RateLimit-Reset"] == "13" and headers["x-ratelimit-reset-requests"] == "12.1s"
    assert headers["RateLimit-Policy"] == (
        '"lim-requestsPerMinute";q=10;w=60, "lim-concurrentRequests";q=10;qu="concurrent-requests"'
    )
    assert headers["RateLimit"] == '"lim-requestsPerMinute";r=0;t=13, "lim-concurrentRequests";r=3'
    assert retry_after(decision) == "13"
    assert retry_after(Decision(admitted=False, rejected=rejected, retry_after=0.01)) == "1"


def test_readiness_rules_each_name_themselves() -> None:
    rules = Readiness(max_in_flight=2, max_error_rate=0.5)
    assert readiness_reasons(HealthState(), rules, StoreFailurePolicy.DENY) == []
    state = HealthState(
        draining=True, inflight=2, breaker_open=True, upstream_healthy=False, store_available=False
    )
    reasons = readiness_reasons(state, rules, StoreFailurePolicy.DENY)
    assert [r.split(" ")[0].rstrip(":") for r in reasons] == [
        "draining",
        "saturated",
        "circuit",
        "upstream",
        "quota",
    ]
    assert not any("quota" in r for r in readiness_reasons(state, rules, StoreFailurePolicy.ALLOW))


def test_error_rate_needs_samples_and_forgets_old_ones() -> None:
    now = [0.0]
    rate = ErrorRate(clock=lambda: now[0])
    state = HealthState(errors=rate)
    rules = Readiness(max_error_rate=0.5)
    for _ in range(5):
        rate.record(False)
    assert readiness_reasons(state, rules, StoreFailurePolicy.ALLOW) == []  # too few samples to judge
    for _ in range(6):
        rate.record(False)
    assert any("error rate" in r for r in readiness_reasons(state, rules, StoreFailurePolicy.ALLOW))
    now[0] = 61.0
    assert rate.snapshot() == (0, 0.0)


def test_hints_average_the_last_minute() -> None:
    now = [0.0]
    hints = HintTracker(clock=lambda: now[0])
    for value in (0, 4, 8):
        hints.sample(value)
        now[0] += 31
    snapshot = hints.snapshot()
    assert snapshot["inflight"] == 8 and snapshot["inflightPeak"] == 8 and snapshot["samples"] == 2
    assert snapshot["inflightAvg"] == 6.0


def test_settings_flags_override_environment(tmp_path: Path) -> None:
    env = {
        "LLMROUTE_REDIS_URL": "redis://env:6379/0",
        "LLMROUTE_LISTEN": "127.0.0.1:1",
        "LLMROUTE_ROUTE_FILE": "f",
    }
    settings = load_settings(["--listen", "127.0.0.1:2"], env)
    assert (
        settings.listen.port == 2 and settings.store == "redis" and settings.redis_url == "redis://env:6379/0"
    )
    assert load_settings(["--store", "memory"], env).redis_url is None
    with pytest.raises(SettingsError, match="no route file"):
        load_settings([], {})
    with pytest.raises(SettingsError, match="HOST:PORT"):
        load_settings(["--route", "f", "--listen", "nope"], {})
    with pytest.raises(SettingsError, match="LLMROUTE_DRAIN_SECONDS must be a number"):
        load_settings(["--route", "f"], {"LLMROUTE_DRAIN_SECONDS": "soon"})


def test_request_ids_and_trace_context() -> None:
    assert request_id("abc-1") == "abc-1"
    assert len(request_id("bad id with spaces")) == 32 and len(request_id(None)) == 32
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    child = child_trace(incoming)
    assert child.trace_id == "0af7651916cd43dd8448eb211c80319c" and child.parent_id != "b7ad6b7169203331"
    assert child.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-") and child.flags == "01"
    fresh = child_trace("garbage")
    assert len(fresh.trace_id) == 32 and fresh.trace_id != "0" * 32
