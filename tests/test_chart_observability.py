"""The chart's Grafana dashboard and PrometheusRule, rendered by the real Helm engine: both off by
default; when on, the dashboard ConfigMap carries the Grafana sidecar's label and parseable JSON, every
PromQL expression (panels, variables, alerts) names only metrics the sidecar's and the operator's
registries export, and every alert links a section of docs/runbooks.md that says what to do."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from prometheus_client import CollectorRegistry

from llmroute_operator import metrics as operator_metrics
from llmroute_operator import render as render_operator
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import LLMRoute
from llmroute_sidecar.metrics import SidecarMetrics
from tests.test_helm_chart import CHART, NAMESPACE, RELEASE, _chart, _documents, of_kind, one

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "docs" / "runbooks.md"
ON = {
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "alertLabels": {"team": "ml"}},
}
ALERTS = {
    "LLMRouteStoreDown",
    "LLMRouteCircuitBreakerOpen",
    "LLMRouteBudgetNearLimit",
    "LLMRouteSidecarMissing",
    "LLMRouteWebhookFailing",
}


@functools.cache
def _rendered_on() -> str:
    return json.dumps(_documents(_chart().render(ON, name=RELEASE, namespace=NAMESPACE, is_install=True)))


def rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if values is None:
        docs: list[dict[str, Any]] = json.loads(_rendered_on())
        return docs
    return _documents(_chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


# -- what the code exports -------------------------------------------------------------------------


def _exposed(registry: CollectorRegistry) -> set[str]:
    """Series names a registry exposes, suffixes included (labelled metrics need no sample for this)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
    }
    names = set()
    for family in registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


@functools.cache
def exported() -> frozenset[str]:
    names = _exposed(SidecarMetrics().registry) | _exposed(operator_metrics.REGISTRY)
    assert "llmroute_time_to_first_token_seconds_bucket" in names and "llmroute_requests_total" in names
    assert "llmroute_operator_route_pods" in names
    return frozenset(names)


# -- PromQL -------------------------------------------------------------------------------------------

FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev", "count_values", "group",
    "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "max_over_time", "min_over_time",
    "avg_over_time", "sum_over_time", "last_over_time", "absent", "absent_over_time", "clamp_min",
    "clamp_max", "clamp", "abs", "ceil", "floor", "round", "vector", "scalar", "time", "changes", "resets",
    "label_replace", "sort", "sort_desc",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects; AssertionError on an identifier that is neither a metric
    nor a known function or keyword (so a typo cannot pass as "not a metric")."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if word in KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):
            assert word in FUNCTIONS, f"unknown function {word} in {expr}"
        else:
            names.add(word)
    return names


def assert_exported(exprs: list[str]) -> set[str]:
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        assert names <= exported(), f"{expr} names metrics the code does not export: {names - exported()}"
        used |= names
    return used


def test_the_promql_check_catches_what_the_code_does_not_export() -> None:
    assert metric_names('sum by (le) (rate(llmroute_x_bucket{a="b"}[5m])) > 0.9') == {"llmroute_x_bucket"}
    assert metric_names('max by (route) (up{job="x"}) and on (route) vector(1)') == {"up"}
    for bad in ("up", "llmroute_requests", "llmroute_time_to_first_token_seconds", "llmroute_ready_total"):
        with pytest.raises(AssertionError):
            assert_exported([f"sum(rate({bad}[5m]))"])
    with pytest.raises(AssertionError, match="unknown function"):
        metric_names("summ(llmroute_ready)")


# -- the switches -------------------------------------------------------------------------------------


def test_dashboards_and_alerts_are_off_by_default() -> None:
    docs = rendered({})
    assert of_kind(docs, "PrometheusRule") == []
    assert [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboards")] == []


def test_values_schema_rejects_malformed_monitoring_values() -> None:
    for bad in (
        {"prometheusRule": {"budgetThreshold": 1.5}},
        {"prometheusRule": {"runbookUrl": "docs/runbooks.md"}},
        {"prometheusRule": {"runbookUrl": "https://x/runbooks.md#section"}},
        {"prometheusRule": {"enable": True}},
        {"dashboards": {"labels": {"grafana_dashboard": 1}}},
        {"dashboards": {"namespace": "Monitoring"}},
    ):
        with pytest.raises(helm.HelmValuesError):
            _chart().render(bad, name=RELEASE, namespace=NAMESPACE)


def test_the_chart_lints_with_both_on() -> None:
    report = helm.lint(str(CHART), ON, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# -- the dashboard ------------------------------------------------------------------------------------


def dashboard_configmap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == f"{RELEASE}-dashboards"]
    return found


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _panels(panel.get("panels") or [])
    return found


def test_the_dashboard_configmap_is_for_the_grafana_sidecar_and_is_the_charts_json() -> None:
    configmap = dashboard_configmap(rendered())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert list(configmap["data"]) == ["llmroute.json"]
    shipped = (CHART / "dashboards" / "llmroute.json").read_text()
    assert json.loads(configmap["data"]["llmroute.json"]) == json.loads(shipped)
    elsewhere = rendered(
        {"dashboards": {"enabled": True, "namespace": "monitoring", "labels": {"dash": "yes"}}}
    )
    moved = dashboard_configmap(elsewhere)["metadata"]
    assert moved["namespace"] == "monitoring" and moved["labels"]["dash"] == "yes"
    assert moved["labels"]["grafana_dashboard"] == "1"  # merged with the default label
    dropped = rendered(
        {"dashboards": {"enabled": True, "labels": {"grafana_dashboard": None, "dash": "yes"}}}
    )
    assert "grafana_dashboard" not in dashboard_configmap(dropped)["metadata"]["labels"]


def test_every_dashboard_query_names_exported_metrics_and_covers_what_on_call_needs() -> None:
    dashboard = json.loads(dashboard_configmap(rendered())["data"]["llmroute.json"])
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(dashboard["panels"])}) == len(_panels(dashboard["panels"]))
    exprs = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    query = re.fullmatch(r"label_values\((\w+), route\)", variables["route"]["query"]["query"])
    assert query is not None
    exprs.append(query.group(1))
    used = assert_exported(exprs)
    for needed in (
        "llmroute_requests_total",
        "llmroute_quota_rejections_total",  # admitted vs limited, per limit
        "llmroute_quota_utilization",
        "llmroute_tokens_total",  # tokens per route
        "llmroute_time_to_first_token_seconds_bucket",
        "llmroute_time_per_output_token_seconds_bucket",
        "llmroute_request_duration_seconds_bucket",
        "llmroute_circuit_breaker_state",
        "llmroute_store_state",
        "llmroute_operator_recommended_replicas",  # recommended vs actual replicas
        "llmroute_operator_route_pods",
        "llmroute_operator_webhook_requests_total",
    ):
        assert needed in used, needed
    route_scoped = [e for e in exprs if "llmroute_" in e and "operator_" not in e and "(" in e]
    assert all('route=~"$route"' in e for e in route_scoped), "sidecar panels follow the route variable"


# -- the alerts ---------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    text = RUNBOOKS.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {_anchor(title): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def alert_rules() -> list[dict[str, Any]]:
    rule = one(rendered(), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_every_alert_names_exported_metrics() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    assert_exported([r["expr"] for r in rules])
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["labels"]["team"] == "ml"
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
        # Prometheus' own templating survives Helm's.
        assert "{{ $labels." in rule["annotations"]["summary"], rule["alert"]


def test_the_budget_threshold_is_a_value() -> None:
    values = {"prometheusRule": {"enabled": True, "budgetThreshold": 0.75}}
    (budget,) = [r for r in alert_rules_of(rendered(values)) if r["alert"] == "LLMRouteBudgetNearLimit"]
    assert "> 0.75)" in budget["expr"]


def alert_rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for group in one(docs, "PrometheusRule")["spec"]["groups"] for r in group["rules"]]


def test_every_alert_links_its_own_runbook_section() -> None:
    sections = runbook_sections()
    base = _chart().merge_values({})["prometheusRule"]["runbookUrl"]
    assert base.endswith("/docs/runbooks.md")
    linked = set()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base and anchor == rule["alert"].lower(), url
        assert anchor in sections, f"docs/runbooks.md has no section for {rule['alert']}"
        body = sections[anchor]
        for part in ("Meaning", "Impact", "Diagnosis", "Fix"):
            assert re.search(rf"^\*\*{part}\.?\*\*", body, re.M), f"{rule['alert']}: no {part}"
        assert "kubectl " in body, f"{rule['alert']}: no diagnosis command"
        linked.add(anchor)
    assert linked == {a for a in sections if a.startswith("llmroute")}, "a runbook section without an alert"


# -- scraping the sidecars ----------------------------------------------------------------------------


def test_the_pod_monitor_scrapes_the_port_the_operator_gives_the_sidecar() -> None:
    assert of_kind(rendered({}), "PodMonitor") == []
    documents = yaml.safe_load_all((ROOT / "examples" / "header-keyed.yaml").read_text())
    route = LLMRoute.model_validate(next(d for d in documents if d["kind"] == "LLMRoute"))
    ports = render_operator.sidecar_container(route, OperatorSettings())["ports"]
    admin = next(p["name"] for p in ports if p["containerPort"] == render_operator.ADMIN_PORT)
    monitor = one(
        rendered({"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}}}), "PodMonitor"
    )
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == admin and endpoint["path"] == "/metrics"
    scoped = rendered({"metrics": {"podMonitor": {"enabled": True}}, "watchNamespaces": ["team-a"]})
    assert one(scoped, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
