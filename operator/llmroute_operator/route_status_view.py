"""``llmroute-operator status``: what one route looks like now, as a plain model built without I/O.

``status_command.py`` gathers the inputs (the route and its pods from the API server, usage from
Redis, each sidecar's ``/hints`` and ``/metrics``); ``build_view`` turns them into a ``RouteView``;
``route_status_render.py`` prints it as text or JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from llmroute_operator import render
from llmroute_operator import status as state
from llmroute_operator.quota_usage import LimitQuery, SubjectUsage, top_subjects
from llmroute_sidecar.api import LLMRoute
from llmroute_sidecar.api.spec import Limit, LimitMode
from llmroute_sidecar.quota.base import COST_DIMENSIONS, Dimension, micros
from llmroute_sidecar.quota.redis import ORDER

REJECTIONS_METRIC = "llmroute_quota_rejections"
SHADOW_REJECTIONS_METRIC = "llmroute_quota_shadow_rejections"
FIELDS = {
    Dimension.REQUESTS_PER_MINUTE: "requests_per_minute",
    Dimension.REQUESTS_PER_HOUR: "requests_per_hour",
    Dimension.TOKENS_PER_MINUTE: "tokens_per_minute",
    Dimension.CONCURRENT_REQUESTS: "concurrent_requests",
    Dimension.BURST: "burst",
    Dimension.TOKENS_PER_DAY: "tokens_per_day",
    Dimension.TOKENS_PER_MONTH: "tokens_per_month",
    Dimension.COST_PER_DAY: "cost_per_day",
    Dimension.COST_PER_MONTH: "cost_per_month",
}


@dataclass(frozen=True)
class ConditionView:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class LimitView:
    """One limit: configured values, live usage (None when not read) and 429s counted by sidecars."""

    name: str
    key: str
    mode: str
    configured: Mapping[str, int]
    """The limit's own values by dimension (``requestsPerMinute`` …); tiers may override per key."""
    tiers: tuple[str, ...] = ()
    """Tiers whose values replace ``configured`` for their keys (apiKey limits)."""
    active_subjects: int | None = None
    """Subjects using anything now (1 or 0 for a route-scoped limit); None: usage not read."""
    top: tuple[SubjectUsage, ...] = ()
    """The busiest subjects (hashed ids as stored; ``_`` for the route itself)."""
    rejections: Mapping[str, int] = field(default_factory=dict)
    """429s by dimension, summed over the sidecars whose /metrics answered."""
    shadow_rejections: Mapping[str, int] = field(default_factory=dict)
    """Would-be rejections of a shadow-mode limit, by dimension."""

    @property
    def per_subject(self) -> bool:
        return self.key != "route"


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str
    ready: bool
    injected: bool
    """The pod has a container (or native sidecar init container) named llmroute-sidecar."""
    sidecar_ready: bool | None
    """That container's ready flag in the pod's status; None without one."""
    ip: str | None = None
    inflight: int | None = None
    """Requests in flight in the sidecar now, from its /hints; None when not probed or no answer."""
    probe_error: str | None = None


@dataclass(frozen=True)
class RouteView:
    namespace: str
    name: str
    upstream: str | None
    generation: int | None
    observed_generation: int | None
    recommended_replicas: int | None
    conditions: tuple[ConditionView, ...]
    pod_counts: Mapping[str, int]
    """matched / injected / ready as the operator last wrote them in status.pods."""
    limits: tuple[LimitView, ...]
    pods: tuple[PodView, ...]
    usage_source: str | None
    """Where usage came from (Redis URL, password hidden, and which setting named it)."""
    usage_problem: str | None
    """Why limits are shown without usage, in one line; None when usage was read."""
    rejections_source: str
    """Where the rejection counters came from, in one line."""
    recent_rejections: tuple[RecentRejection, ...] = ()
    """The newest rejections the sidecars remember, newest first."""
    invalid_spec: str | None = None


# -- figures ----------------------------------------------------------------------------------


def percent(used: int, limit: int | None) -> int | None:
    """Whole percent of ``limit`` used, rounded down (99.9 % is not shown as full); None without a
    positive limit."""
    if limit is None or limit <= 0:
        return None
    return used * 100 // limit


def usage_text(used: int, limit: int | None, money: bool = False) -> str:
    """``used / limit (pct%)``; just ``used`` without a limit; ``used / 0`` for a limit of 0. With
    ``money`` the figures are micro-units shown in the currency (cost budgets)."""
    shown = money_text if money else str
    if limit is None:
        return shown(used)
    pct = percent(used, limit)
    return f"{shown(used)} / {shown(limit)}" + (f" ({pct}%)" if pct is not None else "")


def money_text(micro_units: int) -> str:
    """Micro-units of the pricing currency as an amount: ``12.5``, ``0.000007``."""
    return f"{micro_units / 1_000_000:.6f}".rstrip("0").rstrip(".")


#: Dimensions counted in money (micro-units), by their API names.
MONEY = frozenset(dimension.value for dimension in COST_DIMENSIONS)


def configured_values(values: Any) -> dict[str, int]:
    """The dimensions a limit (or tier) sets, by their API names, in the store's order (cost budgets
    in micro-units, as the store counts them)."""
    return {
        dimension.value: _count(dimension, getattr(values, FIELDS[dimension]))
        for dimension in ORDER
        if getattr(values, FIELDS[dimension], None) is not None
    }


def _count(dimension: Dimension, value: float) -> int:
    return micros(value) if dimension in COST_DIMENSIONS else int(value)


def limit_tiers(route: LLMRoute, limit: Limit) -> tuple[str, ...]:
    """Tiers that apply to an apiKey limit (a key's tier replaces the limit's values)."""
    return tuple(sorted(route.spec.tiers)) if limit.key == "apiKey" else ()


def limit_queries(route: LLMRoute) -> list[LimitQuery]:
    """What to read from Redis for each limit: its dimensions and any a tier adds."""
    queries = []
    for limit in route.spec.limits:
        names = set(configured_values(limit))
        for tier in limit_tiers(route, limit):
            names |= set(configured_values(route.spec.tiers[tier]))
        queries.append(
            LimitQuery(
                limit.name,
                tuple(d for d in ORDER if d.value in names),
                burst_capacity=limit.burst or 0,
                burst_refill_per_minute=limit.requests_per_minute or 0,
            )
        )
    return queries


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def sidecar_redis_url(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The Redis URL the operator gave the injected sidecars (their ``LLMROUTE_REDIS_URL`` value)."""
    for pod in pods:
        spec = pod.get("spec") or {}
        for container in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
            if container.get("name") != render.SIDECAR_NAME:
                continue
            for variable in container.get("env") or []:
                if variable.get("name") == "LLMROUTE_REDIS_URL" and variable.get("value"):
                    return str(variable["value"])
    return None


# -- pods -------------------------------------------------------------------------------------


def sidecar_ready(pod: Mapping[str, Any]) -> bool | None:
    """The sidecar container's ready flag (init container statuses for a native sidecar)."""
    status = pod.get("status") or {}
    entries = list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])
    for entry in entries:
        if entry.get("name") == render.SIDECAR_NAME:
            return bool(entry.get("ready"))
    return None


def pod_view(
    pod: Mapping[str, Any], hint: Mapping[str, Any] | None = None, error: str | None = None
) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    inflight = hint.get("inflight") if hint is not None else None
    return PodView(
        name=str(meta.get("name", "?")),
        phase=str(status.get("phase") or "Unknown"),
        ready=state.pod_ready(pod),
        injected=render.has_sidecar(pod),
        sidecar_ready=sidecar_ready(pod),
        ip=status.get("podIP") or None,
        inflight=int(inflight) if isinstance(inflight, int | float) else None,
        probe_error=error,
    )


def admin_url(pod: Mapping[str, Any]) -> str | None:
    """``http://IP:ADMIN_PORT`` of an injected pod's sidecar; None without sidecar or IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or not render.has_sidecar(pod):
        return None
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"http://{host}:{render.admin_port(pod)}"


# -- rejections -------------------------------------------------------------------------------

#: How many of the merged last rejections the view keeps.
RECENT_SHOWN = 10


@dataclass(frozen=True)
class RecentRejection:
    """One rejected request, as a sidecar's ``/rejections`` reported it (client: tier or key id)."""

    ts: float
    pod: str
    limit: str
    dimension: str
    client: str | None
    status: int
    retry_after_seconds: float | None


def recent_rejections(pod: str, entries: Sequence[Any]) -> list[RecentRejection]:
    """The well-formed entries of one sidecar's ``/rejections`` answer (others are skipped)."""
    found: list[RecentRejection] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        try:
            retry = entry.get("retry_after_seconds")
            client = entry.get("client")
            found.append(
                RecentRejection(
                    ts=float(entry["ts"]),
                    pod=pod,
                    limit=str(entry["limit"]),
                    dimension=str(entry["dimension"]),
                    client=None if client is None else str(client),
                    status=int(entry["status"]),
                    retry_after_seconds=None if retry is None else float(retry),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def newest(rejections: Sequence[RecentRejection], shown: int = RECENT_SHOWN) -> tuple[RecentRejection, ...]:
    """The ``shown`` newest of the rejections gathered from every sidecar."""
    return tuple(sorted(rejections, key=lambda r: r.ts, reverse=True)[:shown])


Counts = dict[str, dict[str, int]]
"""limit -> dimension -> count."""


def parse_rejections(metrics_text: str, route_key: str) -> tuple[Counts, Counts]:
    """(rejections, shadow rejections) of one route from one sidecar's /metrics text."""
    found: dict[str, Counts] = {REJECTIONS_METRIC: {}, SHADOW_REJECTIONS_METRIC: {}}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in found:
            continue
        for sample in family.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("route") != route_key:
                continue
            per_limit = found[family.name].setdefault(labels.get("limit", "?"), {})
            dimension = labels.get("dimension", "?")
            per_limit[dimension] = per_limit.get(dimension, 0) + int(sample.value)
    return found[REJECTIONS_METRIC], found[SHADOW_REJECTIONS_METRIC]


def add_counts(total: Counts, more: Counts) -> Counts:
    """Counts summed (a new dict)."""
    result = {limit: dict(values) for limit, values in total.items()}
    for limit, values in more.items():
        into = result.setdefault(limit, {})
        for dimension, count in values.items():
            into[dimension] = into.get(dimension, 0) + count
    return result


# -- the view ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """Everything the I/O side collected for one route."""

    body: Mapping[str, Any]
    pods: Sequence[Mapping[str, Any]] = ()
    usage: Mapping[str, Sequence[SubjectUsage]] | None = None
    """limit name -> subjects, None when usage could not be read."""
    usage_source: str | None = None
    usage_problem: str | None = None
    hints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """pod name -> its sidecar's /hints answer."""
    probe_errors: Mapping[str, str] = field(default_factory=dict)
    """pod name -> why its sidecar did not answer."""
    rejections: Counts = field(default_factory=dict)
    shadow_rejections: Counts = field(default_factory=dict)
    probed: bool = True
    metrics_answered: int = 0
    top: int = 5
    recent_rejections: Sequence[RecentRejection] = ()
    """The sidecars' last rejections (``/rejections``), any order."""


def _conditions(status: Mapping[str, Any]) -> tuple[ConditionView, ...]:
    return tuple(
        ConditionView(*(str(c.get(name, "")) for name in ("type", "status", "reason", "message")))
        for c in status.get("conditions") or []
    )


def _limit_view(route: LLMRoute, limit: Limit, gathered: Gathered) -> LimitView:
    configured = configured_values(limit)
    active: int | None = None
    top: tuple[SubjectUsage, ...] = ()
    if gathered.usage is not None:
        subjects = list(gathered.usage.get(limit.name, ()))
        if limit.key == "route":
            used = next((s.used for s in subjects if s.subject == "_"), {})
            full = {name: 0 for name in configured} | dict(used)
            active = int(any(full.values()))
            top = (SubjectUsage("_", full),)
        else:
            tiers = limit_tiers(route, limit)
            active, top = top_subjects(subjects, {} if tiers else configured, gathered.top)
    return LimitView(
        name=limit.name,
        key=limit.key,
        mode=LimitMode(limit.mode).value,
        configured=configured,
        tiers=limit_tiers(route, limit),
        active_subjects=active,
        top=top,
        rejections=gathered.rejections.get(limit.name, {}),
        shadow_rejections=gathered.shadow_rejections.get(limit.name, {}),
    )


def _rejections_source(gathered: Gathered, injected: int) -> str:
    if not gathered.probed:
        return "not probed (--no-probe)"
    return (
        f"llmroute_quota_rejections_total of {gathered.metrics_answered} of {injected} injected pod(s), "
        "counted since each sidecar started"
    )


def build_view(route: LLMRoute | None, gathered: Gathered, invalid: str | None = None) -> RouteView:
    """The route as people should see it; ``route`` is None when its spec does not validate."""
    body = gathered.body
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    selected = state.matched_pods(route, gathered.pods) if route is not None else []
    pods = tuple(
        sorted(
            (
                pod_view(
                    pod,
                    gathered.hints.get(str((pod.get("metadata") or {}).get("name"))),
                    gathered.probe_errors.get(str((pod.get("metadata") or {}).get("name"))),
                )
                for pod in selected
            ),
            key=lambda p: p.name,
        )
    )
    counts = status.get("pods") or {}
    return RouteView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        upstream=upstream_summary(spec),
        generation=meta.get("generation"),
        observed_generation=status.get("observedGeneration"),
        recommended_replicas=status.get("recommendedReplicas"),
        conditions=_conditions(status),
        pod_counts={key: int(counts.get(key) or 0) for key in ("matched", "injected", "ready")},
        limits=tuple(_limit_view(route, limit, gathered) for limit in route.spec.limits) if route else (),
        pods=pods,
        usage_source=gathered.usage_source,
        usage_problem=gathered.usage_problem,
        rejections_source=_rejections_source(gathered, sum(1 for p in pods if p.injected)),
        recent_rejections=newest(gathered.recent_rejections),
        invalid_spec=invalid,
    )


def upstream_summary(spec: Mapping[str, Any]) -> str | None:
    """``spec.upstream``'s URL, or ``name=url`` of each of ``spec.upstreams`` (comma-separated)."""
    several = [u for u in spec.get("upstreams") or () if isinstance(u, Mapping)]
    if several:
        return ", ".join(f"{u.get('name')}={u.get('url')}" for u in several)
    single = spec.get("upstream")
    return single.get("url") if isinstance(single, Mapping) else None
