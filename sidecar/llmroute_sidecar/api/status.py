"""The ``LLMRoute`` status: written by the operator, read by people and by ``kubectl get``."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmroute_sidecar.api.spec import ApiModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A standard Kubernetes status condition."""

    type: str = Field(min_length=1, max_length=316)
    """Condition type: Ready or Degraded."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """One CamelCase word saying why, e.g. Reconciled, InvalidSpec, SelectorConflict."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    observed_generation: int = Field(default=0, ge=0)
    """The metadata.generation this condition was computed from."""
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When the status last changed (RFC 3339)."""


class PodCounts(ApiModel):
    """How many pods the route selects, how many carry the sidecar, how many are ready."""

    matched: int = Field(default=0, ge=0)
    """Pods selected by spec.selector."""
    injected: int = Field(default=0, ge=0)
    """Selected pods carrying the sidecar with the current configuration."""
    ready: int = Field(default=0, ge=0)
    """Injected pods that are ready."""


class BudgetConsumer(ApiModel):
    """One of a budget's top consumers in its current window."""

    id: str = Field(max_length=64)
    """A prefix of the client's hashed id (the sha256 of its key, header or claim value, or model)."""
    spend: float = Field(ge=0)
    """What it used in the window: money (pricing currency) for cost budgets, else tokens."""


class BudgetStatus(ApiModel):
    """A day or month budget's use in its current UTC window, read from the sidecars' Redis."""

    limit: str = Field(max_length=63)
    """The limit's name."""
    dimension: str = Field(max_length=32)
    """tokensPerDay, tokensPerMonth, costPerDay or costPerMonth."""
    window: str = Field(max_length=16)
    """The UTC window counted: 2026-12-03 (a day) or 2026-12 (a month)."""
    budget: float | None = Field(default=None, ge=0)
    """The limit's value (per client for per-client limits; tiers may differ)."""
    used: float | None = Field(default=None, ge=0)
    """Used in the window (route-scoped limits)."""
    top_consumers: list[BudgetConsumer] = Field(default_factory=list, max_length=5)
    """Per-client limits: the five clients that used most of their budget in the window, most first."""


class UpstreamStatus(ApiModel):
    """One upstream of spec.upstreams as the route's sidecars report it (their /hints)."""

    name: str
    """The upstream's name."""
    url: str
    """Its URL as the spec gives it."""
    ready_pods: int = Field(default=0, ge=0)
    """Pods whose sidecar can send to it: its breaker is not open and its health probe not failing."""
    breaker_open_pods: int = Field(default=0, ge=0)
    """Pods where its circuit breaker is open."""


class LLMRouteStatus(ApiModel):
    """Observed state of an LLMRoute."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the operator last reconciled."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready and Degraded conditions."""
    pods: PodCounts | None = None
    """Pod counts."""
    config_hash: str | None = None
    """Hash of the sidecar configuration the route currently renders."""
    config_generation: int | None = Field(default=None, ge=0)
    """The route generation whose configuration every injected pod runs (unset while rolling out)."""
    recommended_replicas: int | None = Field(default=None, ge=0)
    """Replicas the observed load needs, from the sidecars' autoscaling hints."""
    upstreams: list[UpstreamStatus] | None = None
    """Per upstream of spec.upstreams: how many pods can reach it, how many have its breaker open."""
    pods_needing_rollout: list[str] = Field(default_factory=list)
    """Matched pods without the current sidecar (listed under rollout: manual, or while rolling out)."""
    budgets: list[BudgetStatus] = Field(default_factory=list, max_length=256)
    """Day and month budgets: use and top consumers in the current window (needs the operator's Redis
    URL; refreshed by the periodic status pass)."""
