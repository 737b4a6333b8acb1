"""SidecarMetrics: names, types, labels and buckets on a per-instance registry."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from llmroute_sidecar.metrics import LATENCY_BUCKETS, OUTCOMES, WAIT_BUCKETS, SidecarMetrics

# Exposition name -> (type, labels). Counters are collected without their ``_total`` suffix.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmroute_requests_total": ("counter", ("route", "method", "outcome", "code")),
    "llmroute_request_duration_seconds": ("histogram", ("route", "outcome")),
    "llmroute_upstream_duration_seconds": ("histogram", ("route", "upstream", "outcome")),
    "llmroute_time_to_first_byte_seconds": ("histogram", ("route",)),
    "llmroute_time_to_first_token_seconds": ("histogram", ("route", "model")),
    "llmroute_time_per_output_token_seconds": ("histogram", ("route", "model")),
    "llmroute_quota_utilization": ("gauge", ("route", "limit", "dimension")),
    "llmroute_quota_rejections_total": ("counter", ("route", "limit", "dimension")),
    "llmroute_quota_shadow_rejections_total": ("counter", ("route", "limit", "dimension")),
    "llmroute_budget_near_limit_total": ("counter", ("route", "limit")),
    "llmroute_tokens_total": ("counter", ("route", "kind")),
    "llmroute_client_tokens_total": ("counter", ("route", "client")),
    "llmroute_cost_total": ("counter", ("route", "model")),
    "llmroute_inflight_requests": ("gauge", ("route",)),
    "llmroute_queue_wait_seconds": ("histogram", ("route",)),
    "llmroute_retries_total": ("counter", ("route", "upstream", "reason")),
    "llmroute_upstream_fallbacks_total": ("counter", ("route", "upstream", "reason")),
    "llmroute_timeouts_total": ("counter", ("route", "layer")),
    "llmroute_upstream_errors_total": ("counter", ("route", "upstream", "type")),
    "llmroute_store_errors_total": ("counter", ("route", "operation")),
    "llmroute_store_fallback_total": ("counter", ("route",)),
    "llmroute_store_state": ("gauge", ("route",)),
    "llmroute_store_busy_total": ("counter", ("route",)),
    "llmroute_settlements_lost_total": ("counter", ("route",)),
    "llmroute_circuit_breaker_state": ("gauge", ("route", "upstream")),
    "llmroute_client_disconnects_total": ("counter", ("route",)),
    "llmroute_config_reloads_total": ("counter", ("route", "result")),
    "llmroute_ready": ("gauge", ("route",)),
    "llmroute_connections_open": ("gauge", ("listener",)),
    "llmroute_connections_rejected_total": ("counter", ("listener", "reason")),
}


def _collected(registry: CollectorRegistry) -> dict[str, str]:
    return {family.name: family.type for family in registry.collect()}


def test_every_metric_is_registered_with_its_type() -> None:
    metrics = SidecarMetrics()
    collected = _collected(metrics.registry)
    for name, (kind, _) in EXPECTED.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert collected.get(family) == kind, name
    assert set(collected) == {
        n.removesuffix("_total") if k == "counter" else n for n, (k, _) in EXPECTED.items()
    }


def test_attributes_carry_the_documented_labels() -> None:
    metrics = SidecarMetrics()
    for name, (_, labels) in EXPECTED.items():
        attribute = getattr(metrics, name.removeprefix("llmroute_"))
        assert tuple(attribute._labelnames) == labels, name


def test_histogram_buckets() -> None:
    metrics = SidecarMetrics()
    metrics.request_duration_seconds.labels("r", "ok").observe(0.3)
    metrics.queue_wait_seconds.labels("r").observe(0.002)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render()[0].decode())}

    def bounds(family: str) -> list[float]:
        return [float(s.labels["le"]) for s in families[family].samples if s.name.endswith("_bucket")]

    assert bounds("llmroute_request_duration_seconds") == [*map(float, LATENCY_BUCKETS), float("inf")]
    assert bounds("llmroute_queue_wait_seconds") == [*map(float, WAIT_BUCKETS), float("inf")]


def test_render_exposes_samples_with_content_type() -> None:
    metrics = SidecarMetrics()
    for outcome in OUTCOMES:
        metrics.requests_total.labels("ns/route", "POST", outcome, "200").inc()
    metrics.circuit_breaker_state.labels("ns/route", "http://up:8000").set(2)
    payload, content_type = metrics.render()
    text = payload.decode()
    assert content_type.startswith("text/plain")
    assert "llmroute_requests_total" in text
    assert (
        'llmroute_requests_total{code="200",method="POST",outcome="breaker_open",route="ns/route"} 1.0'
        in text
    )
    assert 'llmroute_circuit_breaker_state{route="ns/route",upstream="http://up:8000"} 2.0' in text


def test_two_instances_do_not_clash() -> None:
    first, second = SidecarMetrics(), SidecarMetrics()
    first.retries_total.labels("a", "default", "timeout").inc(3)
    assert first.registry is not second.registry
    assert (
        first.registry.get_sample_value(
            "llmroute_retries_total", {"route": "a", "upstream": "default", "reason": "timeout"}
        )
        == 3
    )
    assert (
        second.registry.get_sample_value(
            "llmroute_retries_total", {"route": "a", "upstream": "default", "reason": "timeout"}
        )
        is None
    )


def test_uses_a_given_registry() -> None:
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry)
    metrics.ready.labels("r").set(1)
    assert metrics.registry is registry
    assert registry.get_sample_value("llmroute_ready", {"route": "r"}) == 1


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for family in registry.collect():
        found += [(s.name, s.labels, s.value) for s in family.samples if not s.name.endswith("_created")]
    return found


def test_lock_free_children_expose_what_prometheus_client_would() -> None:
    """Our children keep plain values and bisect their buckets; the exposition must not change: the
    same observations give the same samples as prometheus_client's own classes, on the edges too."""
    ours = SidecarMetrics()
    theirs = CollectorRegistry()
    histogram = prometheus_client.Histogram(
        "llmroute_request_duration_seconds",
        "d",
        ["route", "outcome"],
        buckets=LATENCY_BUCKETS,
        registry=theirs,
    )
    counter = prometheus_client.Counter("llmroute_tokens_total", "t", ["route", "kind"], registry=theirs)
    gauge = prometheus_client.Gauge("llmroute_inflight_requests", "i", ["route"], registry=theirs)
    for value in (0, 0.01, 0.0100001, 0.3, 300, 301, 1e9, -1, 5, 5):
        for h in (ours.request_duration_seconds, histogram):
            h.labels("r", "ok").observe(value)
    for amount in (1, 0, 2.5, 7):
        for c in (ours.tokens_total, counter):
            c.labels("r", "prompt").inc(amount)
    for g in (ours.inflight_requests, gauge):
        child = g.labels("r")
        child.inc()
        child.inc(3)
        child.dec()
        child.set(10)
        child.dec(4)
    names = {"llmroute_request_duration_seconds", "llmroute_tokens", "llmroute_inflight_requests"}
    mine = [s for s in _samples(ours.registry) if any(s[0].startswith(n) for n in names)]
    assert sorted(mine, key=repr) == sorted(_samples(theirs), key=repr)


def test_lock_free_metrics_keep_prometheus_client_errors() -> None:
    metrics = SidecarMetrics()
    with pytest.raises(ValueError, match="missing label values"):
        metrics.requests_total.inc()
    with pytest.raises(ValueError, match="missing label values"):
        metrics.request_duration_seconds.observe(1)
    with pytest.raises(ValueError, match="missing label values"):
        metrics.inflight_requests.set(1)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.tokens_total.labels("r", "prompt").inc(-1)
