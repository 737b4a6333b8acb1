"""The pure core of ``llmroute-operator status``: figures, pods, rejections, the view and its text/JSON."""

from __future__ import annotations

import json
from typing import Any

from llmroute_operator.quota_usage import SubjectUsage
from llmroute_operator.route_status_render import render_json, render_text, table
from llmroute_operator.route_status_view import (
    Gathered,
    RecentRejection,
    add_counts,
    admin_url,
    build_view,
    limit_queries,
    newest,
    parse_rejections,
    percent,
    pod_view,
    recent_rejections,
    redact_url,
    sidecar_ready,
    sidecar_redis_url,
    usage_text,
)
from llmroute_operator.status_command import choose_redis_url
from llmroute_sidecar.api import LLMRoute, parse_route
from llmroute_sidecar.quota.base import Dimension


def route(**spec: Any) -> LLMRoute:
    return parse_route(
        {
            "apiVersion": "llmroute.dev/v1alpha1",
            "kind": "LLMRoute",
            "metadata": {"name": "chat", "namespace": "team-a", "generation": 3},
            "spec": {
                "selector": {"matchLabels": {"app": "chat"}},
                "upstream": {"url": "http://up:8000"},
                **spec,
            },
        }
    )


def body(r: LLMRoute, status: dict[str, Any] | None = None) -> dict[str, Any]:
    document = r.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {**document, "status": status or {}}


def pod(
    name: str, *, injected: bool = True, ready: bool = True, native: bool = False, **extra: Any
) -> dict[str, Any]:
    sidecar = {
        "name": "llmroute-sidecar",
        "ports": [{"name": "llmroute-admin", "containerPort": 19090}],
        "env": [{"name": "LLMROUTE_REDIS_URL", "value": "redis://r:6379/0"}],
    }
    spec: dict[str, Any] = {"containers": [{"name": "app"}]}
    statuses = [{"name": "llmroute-sidecar", "ready": ready}] if injected else []
    if injected:
        spec["initContainers" if native else "containers"] = (
            [sidecar] if native else [*spec["containers"], sidecar]
        )
    return {
        "metadata": {"name": name, "namespace": "team-a", "labels": {"app": "chat"}},
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            ("initContainerStatuses" if native else "containerStatuses"): statuses,
            **extra,
        },
    }


def test_usage_figures() -> None:
    assert usage_text(7, 100) == "7 / 100 (7%)"
    assert usage_text(999, 1000) == "999 / 1000 (99%)"  # not shown as full before it is
    assert usage_text(12, 10) == "12 / 10 (120%)"  # debt past a token limit shows as such
    assert usage_text(3, None) == "3"
    assert usage_text(0, 0) == "0 / 0"
    assert usage_text(1_250_000, 25_000_000, money=True) == "1.25 / 25 (5%)"  # cost budgets: micro-units
    assert usage_text(7, None, money=True) == "0.000007"
    assert percent(5, 5) == 100 and percent(1, 0) is None and percent(1, None) is None


def test_limit_queries_add_the_dimensions_tiers_set_for_api_key_limits() -> None:
    r = route(
        identity={"defaultTier": "free"},
        tiers={"free": {"requestsPerMinute": 5, "concurrentRequests": 2}},
        limits=[
            {"name": "per-key", "key": "apiKey", "requestsPerMinute": 10},
            {"name": "all", "key": "route", "requestsPerMinute": 60, "burst": 10},
        ],
    )
    per_key, everyone = limit_queries(r)
    assert per_key.dimensions == (Dimension.REQUESTS_PER_MINUTE, Dimension.CONCURRENT_REQUESTS)
    assert everyone.dimensions == (Dimension.REQUESTS_PER_MINUTE, Dimension.BURST)
    assert (everyone.burst_capacity, everyone.burst_refill_per_minute) == (10, 60)


def test_redis_url_precedence_and_redaction() -> None:
    pods = [pod("a", injected=False), pod("b", native=True)]
    assert sidecar_redis_url(pods) == "redis://r:6379/0"
    assert choose_redis_url("redis://flag", {"LLMROUTE_REDIS_URL": "redis://env"}, pods) == (
        "redis://flag",
        "--redis",
    )
    assert choose_redis_url(None, {"LLMROUTE_REDIS_URL": "redis://env"}, pods)[1] == "LLMROUTE_REDIS_URL"
    assert choose_redis_url(None, {}, pods) == ("redis://r:6379/0", "the sidecars' LLMROUTE_REDIS_URL")
    assert choose_redis_url(None, {}, [pod("a", injected=False)]) == (None, "")
    assert redact_url("redis://user:s3cret@r:6379/0") == "redis://user:***@r:6379/0"
    assert redact_url("rediss://:s3cret@r:6380") == "rediss://:***@r:6380"
    assert redact_url("redis://r:6379/0") == "redis://r:6379/0"


def test_pods_native_and_regular_sidecars() -> None:
    native = pod_view(pod("n", native=True, ready=False), {"inflight": 3})
    assert (native.injected, native.sidecar_ready, native.ready, native.inflight) == (True, False, False, 3)
    bare = pod_view(pod("b", injected=False))
    assert (bare.injected, bare.sidecar_ready, bare.inflight) == (False, None, None)
    assert sidecar_ready({"status": {}}) is None
    assert admin_url(pod("a")) == "http://10.0.0.7:19090"
    assert admin_url(pod("b", injected=False)) is None
    assert admin_url(pod("v6", podIP="fd00::7")) == "http://[fd00::7]:19090"


METRICS = """\
# HELP llmroute_quota_rejections_total Requests rejected by a limit.
# TYPE llmroute_quota_rejections_total counter
llmroute_quota_rejections_total{route="team-a/chat",limit="per-key",dimension="requestsPerMinute"} 4.0
llmroute_quota_rejections_total{route="team-a/chat",limit="per-key",dimension="tokensPerMinute"} 1.0
llmroute_quota_rejections_total{route="team-b/chat",limit="per-key",dimension="requestsPerMinute"} 9.0
llmroute_quota_rejections_created{route="team-a/chat",limit="per-key",dimension="requestsPerMinute"} 1.7e9
# HELP llmroute_quota_shadow_rejections_total Requests a shadow-mode limit would have rejected.
# TYPE llmroute_quota_shadow_rejections_total counter
llmroute_quota_shadow_rejections_total{route="team-a/chat",limit="strict",dimension="requestsPerMinute"} 2.0
"""


def test_rejections_from_metrics_for_this_route_only() -> None:
    rejections, shadow = parse_rejections(METRICS, "team-a/chat")
    assert rejections == {"per-key": {"requestsPerMinute": 4, "tokensPerMinute": 1}}
    assert shadow == {"strict": {"requestsPerMinute": 2}}
    twice = add_counts(rejections, rejections)
    assert twice == {"per-key": {"requestsPerMinute": 8, "tokensPerMinute": 2}}
    assert rejections == {"per-key": {"requestsPerMinute": 4, "tokensPerMinute": 1}}  # not modified
    assert parse_rejections("", "team-a/chat") == ({}, {})


def full_route() -> LLMRoute:
    return route(
        tiers={"premium": {"requestsPerMinute": 100}},
        limits=[
            {"name": "vendor", "key": "route", "requestsPerMinute": 100, "tokensPerMinute": 20000},
            {"name": "tenant", "key": "header:X-Tenant-ID", "requestsPerMinute": 5},
            {"name": "per-key", "key": "apiKey", "requestsPerMinute": 10},
            {"name": "strict", "key": "route", "requestsPerMinute": 1, "mode": "shadow"},
        ],
    )


STATUS = {
    "observedGeneration": 2,
    "recommendedReplicas": 4,
    "pods": {"matched": 2, "injected": 1, "ready": 1},
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Reconciled", "message": "1/2 pods ready"},
        {"type": "Degraded", "status": "True", "reason": "PodsWithoutSidecar", "message": "1 pod: b"},
    ],
}


def test_the_view_and_its_text() -> None:
    r = full_route()
    gathered = Gathered(
        body=body(r, STATUS),
        pods=[
            pod("b", injected=False, ready=False),
            pod("a"),
            {**pod("gone"), "status": {"phase": "Succeeded"}},
        ],
        usage={
            "vendor": [SubjectUsage("_", {"requestsPerMinute": 7, "tokensPerMinute": 812})],
            "tenant": [
                SubjectUsage("t1", {"requestsPerMinute": 2}),
                SubjectUsage("t2", {"requestsPerMinute": 5}),
                SubjectUsage("t3", {"requestsPerMinute": 0}),
            ],
            "per-key": [SubjectUsage("k1", {"requestsPerMinute": 30})],
            "strict": [],
        },
        usage_source="redis://r:6379/0 (--redis)",
        hints={"a": {"inflight": 2}},
        rejections={"tenant": {"requestsPerMinute": 3}},
        shadow_rejections={"strict": {"requestsPerMinute": 6}},
        metrics_answered=1,
        top=1,
        recent_rejections=[
            RecentRejection(1_796_000_000.0, "a", "tenant", "requestsPerMinute", "premium", 429, 12.5),
            RecentRejection(1_796_000_030.0, "a", "vendor", "tokensPerMinute", "k-0123456789ab", 400, None),
        ],
    )
    view = build_view(r, gathered)
    assert [p.name for p in view.pods] == ["a", "b"]  # the finished pod is not selected
    vendor, tenant, _, strict = view.limits
    assert vendor.top == (SubjectUsage("_", {"requestsPerMinute": 7, "tokensPerMinute": 812}),)
    assert (tenant.active_subjects, tenant.top) == (2, (SubjectUsage("t2", {"requestsPerMinute": 5}),))
    assert (strict.active_subjects, strict.top[0].used) == (0, {"requestsPerMinute": 0})

    text = render_text(view)
    assert text.splitlines()[:5] == [
        "LLMRoute:     team-a/chat",
        "Upstream:     http://up:8000",
        "Generation:   3 (observed 2)",
        "Replicas:     recommended 4",
        "Pods:         2 matched, 1 injected, 1 ready (status)",
    ]
    assert "  Degraded  True  PodsWithoutSidecar  1 pod: b" in text
    assert "Usage from:   redis://r:6379/0 (--redis)" in text
    assert "    requestsPerMinute  7 / 100 (7%)\n    tokensPerMinute    812 / 20000 (4%)\n" in text
    assert "    active subjects: 2\n    SUBJECT  requestsPerMinute\n    t2       5 / 5 (100%)\n" in text
    # apiKey limit with tiers: a key's own limit is unknown here, so no percentage
    assert "  per-key  key=apiKey  requestsPerMinute=10  (tiers premium replace these per key)" in text
    assert "    k1       30\n" in text
    assert "  strict  key=route  requestsPerMinute=1  mode=shadow\n" in text
    assert "  a     Running  yes    yes       yes            2" in text
    assert "  b     Running  no     no        -              -" in text
    assert (
        "counted since each sidecar started\n"
        "  tenant  requestsPerMinute  3\n"
        "  strict  requestsPerMinute  6  (shadow: would have been)\n"
    ) in text
    assert text.endswith(  # newest first
        "Last rejections:\n"
        "  00:53:50Z  a  vendor/tokensPerMinute    k-0123456789ab  400  -\n"
        "  00:53:20Z  a  tenant/requestsPerMinute  premium         429  retry after 12.5s\n"
    )

    decoded = json.loads(render_json(view))
    assert decoded["limits"][1]["top"] == [{"subject": "t2", "used": {"requestsPerMinute": 5}}]
    assert decoded["pods"][0]["inflight"] == 2 and decoded["usage_problem"] is None
    assert [r["limit"] for r in decoded["recent_rejections"]] == ["vendor", "tenant"]


def test_recent_rejections_keep_the_well_formed_newest() -> None:
    entries = [
        {
            "ts": 5,
            "limit": "l",
            "dimension": "requestsPerMinute",
            "client": None,
            "status": 429,
            "retry_after_seconds": 1,
        },
        {"ts": "x", "limit": "bad"},
        "not an object",
        {
            "ts": 9,
            "limit": "l",
            "dimension": "burst",
            "client": "free",
            "status": 429,
            "retry_after_seconds": 0.5,
        },
    ]
    found = recent_rejections("pod-1", entries)
    assert [(r.ts, r.dimension, r.pod) for r in found] == [
        (5.0, "requestsPerMinute", "pod-1"),
        (9.0, "burst", "pod-1"),
    ]
    assert [r.ts for r in newest([*found, *recent_rejections("pod-2", entries)], shown=3)] == [9.0, 9.0, 5.0]


def test_without_usage_status_or_probes() -> None:
    r = route(limits=[{"name": "vendor", "key": "route", "requestsPerMinute": 100}])
    view = build_view(
        r,
        Gathered(body=body(r), usage_problem="no Redis URL (--redis …)", probed=False),
    )
    text = render_text(view)
    assert "Generation:   3 (observed never)" in text
    assert "  none yet (the operator has not reconciled this route)" in text
    assert "Usage:        not shown: no Redis URL (--redis …)" in text
    assert "  vendor  key=route  requestsPerMinute=100\n" in text
    assert "requestsPerMinute  0 / 100" not in text  # nothing read: no figures
    assert "Selected pods: 0\n" in text and "Rejections (429s): not probed (--no-probe)\n  none\n" in text
    assert view.limits[0].active_subjects is None


def test_an_invalid_spec_is_shown_without_limits() -> None:
    raw = {"metadata": {"name": "bad", "namespace": "x", "generation": 1}, "spec": {}, "status": {}}
    text = render_text(build_view(None, Gathered(body=raw, probed=False), "spec.selector: missing"))
    assert "Spec:         does not validate: spec.selector: missing" in text
    assert "Limits:\n  none\n" in text


def test_table_aligns_columns() -> None:
    assert table([["a", "bb", ""], ["ccc", "d", "e"]]) == ["  a    bb", "  ccc  d   e"]
    assert table([]) == []


def test_budgets_show_money_and_their_top_spenders() -> None:
    r = route(
        limits=[
            {"name": "team", "key": "route", "costPerDay": 25, "tokensPerMonth": 9000},
            {"name": "per-key", "key": "apiKey", "costPerMonth": 40},
        ]
    )
    assert [q.dimensions for q in limit_queries(r)] == [
        (Dimension.TOKENS_PER_MONTH, Dimension.COST_PER_DAY),
        (Dimension.COST_PER_MONTH,),
    ]
    gathered = Gathered(
        body=body(r),
        usage={
            "team": [SubjectUsage("_", {"tokensPerMonth": 900, "costPerDay": 1_250_000})],
            "per-key": [
                SubjectUsage("k1", {"costPerMonth": 39_000_000}),
                SubjectUsage("k2", {"costPerMonth": 7}),
            ],
        },
        usage_source="redis://r:6379/0 (--redis)",
    )
    text = render_text(build_view(r, gathered))
    assert "  team  key=route  tokensPerMonth=9000 costPerDay=25\n" in text
    assert "    tokensPerMonth  900 / 9000 (10%)\n    costPerDay      1.25 / 25 (5%)\n" in text
    assert "    SUBJECT  costPerMonth\n    k1       39 / 40 (97%)\n    k2       0.000007 / 40 (0%)\n" in text
