"""One request's record: filled in along the request path, read by the shielded finish."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llmroute_sidecar.api.spec import ModelPrice
from llmroute_sidecar.genai import RequestTelemetry
from llmroute_sidecar.quota.base import Lease, QuotaStore


@dataclass
class Exchange:
    """What one request did; filled in as it goes, read by the shielded finish."""

    request_id: str
    trace_id: str
    route: str
    method: str
    path: str
    started: float
    status: int = 0
    outcome: str = "ok"
    attempts: int = 0
    upstream_seconds: float | None = None
    queue_wait: float = 0.0
    stream: bool = False
    tokens_reserved: int = 0
    cost_reserved: int = 0
    """Price of the reservation in micro-units (only with cost budgets, else 0)."""
    tokens_actual: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Cached prompt tokens (usage.prompt_tokens_details.cached_tokens), part of prompt_tokens."""
    limit: str | None = None
    client: str | None = None
    client_disconnected: bool = False
    error: str | None = None
    lease: Lease | None = None
    lease_store: QuotaStore | None = None
    upstream_leases: list[tuple[QuotaStore, Lease]] = field(default_factory=list)
    """Leases of limits attached to the upstream that serves the request (``limit.upstream``)."""
    upstream: str = ""
    """Name of the upstream that answered (spec.upstreams; 'default' for spec.upstream)."""
    upstream_timeout: float = 30.0
    """That upstream's timeoutSeconds: the relay's idle timeout between chunks."""
    response_started: bool = False
    delivered: bool = False
    """The terminal event (``[DONE]``, ``response.completed``) or the whole body reached the client."""
    first_byte: float | None = None
    model: str | None = None
    """The OpenAI request's ``model`` (None for pass-through paths)."""
    pricing: Sequence[ModelPrice] = ()
    """The route's price table when the request started (``RoutePolicy.pricing``)."""
    first_token: float | None = None
    last_token: float | None = None
    """When the first and the latest SSE event carrying completion text were relayed."""
    headers: dict[str, str] = field(default_factory=dict)
    telemetry: RequestTelemetry | None = None
    """What the span and GenAI metrics need; only while telemetry is on (``telemetry.py``)."""
