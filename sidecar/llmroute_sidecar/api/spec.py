"""The ``LLMRoute`` v1alpha1 spec: the single source of truth for the API.

The CRD schema in ``crds/`` is generated from these models (``make crds``); the sidecar reads a
manifest through them; the operator renders configuration from them. Field docstrings become the
schema's descriptions, so ``kubectl explain llmroute.spec`` reads them.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "llmroute.dev"
API_VERSION = "v1alpha1"
KIND = "LLMRoute"
PLURAL = "llmroutes"
SINGULAR = "llmroute"
SHORT_NAMES = ("llmr",)

#: RFC 7230 token characters: what an HTTP header name may contain.
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
#: A JWT claim name (top level; dots and colons are part of the name, as in URI-named claims).
CLAIM_NAME_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_.:/]*$"
#: ``route``, ``apiKey``, ``model``, ``header:<Name>`` or ``claim:<name>``.
LIMIT_KEY_PATTERN = (
    r"^(route|apiKey|model|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|claim:[A-Za-z0-9_][-A-Za-z0-9_.:/]*)$"
)
#: A lower-case DNS label: limit and tier names appear in metrics and Redis keys.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: Kubernetes object names (Secrets) are DNS subdomains.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: Secret data keys.
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
#: Label keys: optional DNS-subdomain prefix and a name segment.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
URL_PATTERN = r"^https?://[^\s/?#]+(/[^\s]*)?$"
PATH_PATTERN = r"^/[^\s]*$"

RateValue = Annotated[int, Field(ge=0, le=1_000_000_000)]
#: Tokens of a day or month budget.
BudgetTokens = Annotated[int, Field(ge=0, le=1_000_000_000_000)]
#: Money of a day or month budget, in the pricing currency (stored as integer micro-units).
BudgetMoney = Annotated[float, Field(ge=0, le=1_000_000_000)]
#: Completion tokens reserved for a request that sets no maximum (spec.tokens.defaultReservation).
DEFAULT_RESERVATION = 1024


class ApiModel(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields rejected, docstrings kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement: a key, an operator and values."""

    key: str = Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)
    """The label key the selector applies to."""
    operator: LabelSelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: list[Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=list, max_length=256
    )
    """Values for In and NotIn (non-empty); must be empty for Exists and DoesNotExist."""

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        needs_values = self.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)
        if needs_values and not self.values:
            raise ValueError(f"operator {self.operator.value} needs at least one value")
        if not needs_values and self.values:
            raise ValueError(f"operator {self.operator.value} takes no values")
        return self


class LabelSelector(ApiModel):
    """A standard Kubernetes label selector; pods in the route's namespace that match get the sidecar."""

    match_labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] = Field(
        default_factory=dict
    )
    """Labels a pod must carry, all of them (AND)."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=64)
    """Set-based requirements, all of which must hold (AND)."""

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.match_labels and not self.match_expressions:
            raise ValueError(
                "selector is empty: it would select every pod in the namespace; "
                "set matchLabels or matchExpressions"
            )
        for key in self.match_labels:
            if not re.match(LABEL_KEY_PATTERN, key) or len(key) > 317:
                raise ValueError(f"matchLabels key {key!r} is not a valid label key")
        return self


class SecretKeyRef(ApiModel):
    """A key of a Secret in the route's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    """Key within the Secret's data."""


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the route's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the ConfigMap."""
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    """Key within the ConfigMap's data."""


class SecretRef(ApiModel):
    """A Secret in the route's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the Secret."""


class CircuitBreaker(ApiModel):
    """Stops sending to an upstream that keeps failing, then probes it (closed, open, half-open)."""

    consecutive_failures: int = Field(default=5, ge=1, le=10_000)
    """Failed attempts in a row (connect errors, timeouts, 5xx) that open the breaker."""
    open_seconds: float = Field(default=10.0, gt=0, le=3600)
    """How long the breaker stays open before one probe request is let through (half-open)."""


class Upstream(ApiModel):
    """Where the sidecar forwards traffic, and how hard it tries."""

    url: str = Field(min_length=1, max_length=2048, pattern=URL_PATTERN)
    """Base URL of the upstream, e.g. http://127.0.0.1:8000 (inbound) or https://api.openai.com (outbound).
    The request path is appended to it."""
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Per-attempt timeout: time allowed for one upstream attempt to deliver its response headers
    (and, for streams, between chunks)."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts on connect errors, timeouts and 5xx answers; never on 4xx, never after the first
    byte reached the client. Backoff is exponential with jitter and bounded by deadlineSeconds."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Optional vendor key, sent upstream as 'Authorization: Bearer <key>' in place of the client's key."""
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    """Circuit breaker for this upstream."""


#: The name ``spec.upstream`` (the one-entry form) has in metrics, status and routing.
DEFAULT_UPSTREAM_NAME = "default"


class RoutedUpstream(Upstream):
    """One of several upstreams of a route (spec.upstreams): which models it serves, how preferred it is."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Name, unique within the route; used in metrics, status, limits' 'upstream' and /v1/models."""
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=64
    )
    """Models it serves: names or globs (gpt-4o*). Empty: every model (also requests without one)."""
    priority: int = Field(default=0, ge=0, le=1000)
    """Lower is preferred: the next priority is only tried when every upstream of this one failed,
    has its breaker open or its own quota exhausted."""
    weight: int = Field(default=1, ge=1, le=1000)
    """Share of the traffic within its priority (weighted random choice)."""
    model_rewrite: dict[Annotated[str, Field(min_length=1, max_length=256)], str] = Field(
        default_factory=dict, max_length=64
    )
    """The model name sent to this upstream for the client's model name (exact names, e.g.
    gpt-4o: my-azure-gpt4o-deployment); the response is relayed as the upstream sent it."""


class JwtAlgorithm(StrEnum):
    RS256 = "RS256"
    ES256 = "ES256"
    EDDSA = "EdDSA"


class JwtIdentity(ApiModel):
    """Clients authenticated by JSON Web Tokens (Bearer) signed by an identity provider."""

    issuer: str = Field(min_length=1, max_length=2048)
    """The 'iss' every token must carry, exactly (e.g. https://login.example.com/)."""
    audience: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(min_length=1, max_length=16)
    """Accepted 'aud' values; a token must name at least one of them."""
    jwks_url: str | None = Field(default=None, max_length=2048, pattern=URL_PATTERN)
    """URL of the provider's JSON Web Key Set (e.g. https://login.example.com/.well-known/jwks.json),
    fetched at start, every jwksRefreshSeconds and when a token names an unknown 'kid'. Set this or
    jwksSecretRef."""
    jwks_secret_ref: SecretKeyRef | None = None
    """A Secret key holding the JSON Web Key Set (JSON), mounted and watched like the other Secrets.
    Set this or jwksUrl."""
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=lambda: [JwtAlgorithm.RS256, JwtAlgorithm.ES256, JwtAlgorithm.EDDSA],
        min_length=1,
        max_length=3,
    )
    """Signature algorithms accepted (RS256, ES256, EdDSA). 'none' and the HMAC algorithms (HS*) are
    never accepted; a key is only used with its own algorithm."""
    clock_skew_seconds: int = Field(default=30, ge=0, le=600)
    """Leeway for 'exp', 'nbf' and 'iat' against this pod's clock."""
    jwks_refresh_seconds: int = Field(default=300, ge=1, le=86_400)
    """How often a jwksUrl is fetched again (rotated keys are picked up without a restart)."""
    jwks_min_refresh_seconds: int = Field(default=30, ge=1, le=3600)
    """At most one extra fetch of jwksUrl per this many seconds, triggered by tokens whose 'kid' is
    unknown (so unknown kids cannot flood the provider)."""
    subject_claim: str = Field(default="sub", max_length=256, pattern=CLAIM_NAME_PATTERN)
    """Claim identifying the client for 'apiKey'-keyed limits (every token must carry it); hashed like
    API keys before it reaches Redis, logs or metrics."""
    tier_claim: str | None = Field(default=None, max_length=256, pattern=CLAIM_NAME_PATTERN)
    """Claim whose value names the client's tier (a key of tiers). A token without it, or naming no
    defined tier, gets identity.defaultTier."""


class Identity(ApiModel):
    """How a client is identified for apiKey-scoped limits."""

    header: str = Field(default="Authorization", min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN)
    """Request header holding the client key or token; a leading 'Bearer ' is stripped."""
    keys_secret_ref: SecretRef | None = None
    """Optional Secret whose data maps sha256-hex(key) to a tier name. When set, a missing or unknown
    key is answered 401."""
    jwt: JwtIdentity | None = None
    """Verify JSON Web Tokens presented in the header. With jwt set every request must authenticate;
    a credential shaped like a JWT (three dot-separated base64url parts) is verified as a token, any
    other one is looked up in keysSecretRef (401 when that is not set)."""
    default_tier: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Tier for keys without one (every key when keysSecretRef is not set). Must be defined in tiers."""


class TierLimits(ApiModel):
    """Limit values for one tier; they replace the values of apiKey-scoped limits for keys of the tier."""

    requests_per_minute: RateValue | None = None
    """Requests admitted per sliding minute."""
    requests_per_hour: RateValue | None = None
    """Requests admitted per sliding hour."""
    tokens_per_minute: RateValue | None = None
    """Tokens (prompt + completion) admitted per sliding minute."""
    concurrent_requests: RateValue | None = None
    """Requests in flight at once."""
    tokens_per_day: BudgetTokens | None = None
    """Token budget (prompt + completion) per UTC calendar day (resets at 00:00 UTC). Reserved at
    admission like tokensPerMinute, settled to the actual usage. One counter per subject and day: exact
    within the day, O(1) memory however many requests; the reservation of a request that never settles
    (its pod died) stays charged until the day ends."""
    tokens_per_month: BudgetTokens | None = None
    """Token budget per UTC calendar month (resets on the 1st, 00:00 UTC); as tokensPerDay."""
    cost_per_day: BudgetMoney | None = None
    """Spend budget per UTC calendar day, in the currency of spec.pricing (decimals allowed; counted
    in micro-units, so 0.000001 is the smallest step). Admission reserves the price of the reservation
    (prompt estimate x input price + reserved completion tokens x output price), settlement charges
    the actual cost (cached prompt tokens at cachedInputPerMillion). Requests of models without a
    price cost 0. Same window, accuracy and memory as tokensPerDay."""
    cost_per_month: BudgetMoney | None = None
    """Spend budget per UTC calendar month (resets on the 1st, 00:00 UTC); as costPerDay."""


class LimitMode(StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


class WhenMissing(StrEnum):
    REJECT = "reject"
    SHARED = "shared"
    SKIP = "skip"


class Limit(TierLimits):
    """One fleet-wide limit. Every limit that applies to a request must admit it (all or nothing)."""

    name: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Name, unique within the route; used in metrics, errors and 429 headers."""
    key: str = Field(default="route", max_length=300, pattern=LIMIT_KEY_PATTERN)
    """What the limit counts per: 'route' (one shared budget), 'apiKey' (each client key or token
    subject, see identity), 'model' (each model name the client sent; requests without a model are
    not counted by it), 'header:<Name>' (each value of that request header) or 'claim:<name>'
    (each value of that claim of the client's JWT; needs identity.jwt)."""
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=64
    )
    """Only requests whose body 'model' (as the client sent it) matches one of these names or globs
    (gpt-4o*, claude-*) count against the limit; requests without a model never match. Empty: all
    requests."""
    warn_at_percent: int = Field(default=80, ge=1, le=100)
    """Day and month budgets: once an admitted request leaves this share (percent) of the budget used,
    the response carries 'x-llmroute-budget-warning: <limit>; used=<ratio>' and
    llmroute_budget_near_limit_total{route, limit} counts it."""
    burst: RateValue | None = Field(default=None, ge=1, le=1_000_000_000)
    """Pacing on top of requestsPerMinute: at most this many requests back to back, refilled at
    requestsPerMinute/60 per second (a token bucket). Unset: only the sliding-minute cap applies."""
    mode: LimitMode = LimitMode.ENFORCE
    """'enforce' rejects over-limit requests; 'shadow' only counts and reports would-be rejections."""
    upstream: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Attach the limit to one upstream of spec.upstreams (its provisioned capacity): it applies only
    when that upstream is tried, and when it rejects, the next candidate upstream is tried instead of
    answering 429. Unset: the limit applies to every request of the route."""
    when_missing: WhenMissing = WhenMissing.REJECT
    """For 'header:<Name>' and 'claim:<name>' keys: what a request without the header or claim (or
    with an empty value; for claims also a value that is not a string or integer, and requests
    authenticated by a static key) gets. 'reject' (default): 400 missing_limit_header naming the
    header, or 403 missing_limit_claim naming the claim, so no client escapes or silently shares the
    limit; 'shared': all such requests count against one common bucket; 'skip': the limit does not
    apply to them (they are unlimited by it). A shadow limit never rejects: it skips them."""

    @property
    def header_name(self) -> str | None:
        """The header name of a 'header:<Name>' key, else None."""
        return self.key.split(":", 1)[1] if self.key.startswith("header:") else None

    @property
    def claim_name(self) -> str | None:
        """The claim name of a 'claim:<name>' key, else None."""
        return self.key.split(":", 1)[1] if self.key.startswith("claim:") else None


class PromptCounting(StrEnum):
    ESTIMATE = "estimate"
    TIKTOKEN = "tiktoken"


class TokenAccounting(ApiModel):
    """How tokensPerMinute limits reserve and charge tokens of requests whose size is not known upfront."""

    default_reservation: int = Field(default=DEFAULT_RESERVATION, ge=1, le=1_000_000)
    """Completion tokens reserved (x n) for a request that sets no max_tokens / max_completion_tokens /
    max_output_tokens. Admission reserves the prompt estimate plus this; settlement charges the actual."""
    inject_max_tokens: bool = False
    """Add the reservation as the request's maximum (max_completion_tokens for chat, max_tokens for
    completions, max_output_tokens for responses) when the client set none, so the reservation is a
    true bound on the completion and tokensPerMinute holds exactly. Changes what the upstream sees."""
    stream_charge_interval_tokens: int = Field(default=256, ge=1, le=1_000_000)
    """A stream that outgrows its reservation has its live usage charged to the quota store whenever it
    has grown by this many tokens since the last charge, so other admissions see it while it streams."""
    stream_charge_interval_ms: int = Field(default=500, ge=10, le=60_000)
    """How often (milliseconds) such a stream is charged again while it keeps growing, even before
    streamChargeIntervalTokens more tokens arrived. Charges run beside the stream, never per chunk."""
    prompt_counting: PromptCounting = PromptCounting.ESTIMATE
    """How admission sizes a prompt. 'estimate' (default): about 4 characters per token plus 4 per chat
    message, no tokenizer (typical English within about 25%; code, numbers and CJK text can be off 2x
    or more, see docs/quotas.md). 'tiktoken': the exact count for the models tiktoken knows (OpenAI's
    gpt-4o, gpt-4.1, gpt-5, o-series, gpt-4, gpt-3.5, text-embedding-*); other models keep the
    estimate. Costs CPU per request (about 1 ms per 10,000 prompt characters); the sidecar image ships
    tiktoken and its encodings (TIKTOKEN_CACHE_DIR)."""
    cut_over_reservation: bool = False
    """End a stream that outgrows its reservation with a final SSE error event (code
    token_reservation_exceeded) instead of relaying the rest: once its completion, as the sidecar
    estimates it from the streamed text (about 4 characters per token, which runs high for plain
    English), passes 1.5x the completion tokens it reserved. For upstreams that ignore max_tokens."""


class ModelPrice(ApiModel):
    """What one model's tokens cost, per million, in the currency your bills use (llmroute adds
    them up; it never converts)."""

    model: str = Field(min_length=1, max_length=256)
    """The request's model name, or a glob (gpt-4o*, claude-*); the first matching entry prices it."""
    input_per_million: float = Field(ge=0, le=1_000_000)
    """Price of one million prompt (input) tokens."""
    output_per_million: float = Field(ge=0, le=1_000_000)
    """Price of one million completion (output) tokens."""
    cached_input_per_million: float | None = Field(default=None, ge=0, le=1_000_000)
    """Price of one million cached prompt tokens (usage.prompt_tokens_details.cached_tokens). Unset:
    the input price."""


class StoreFailurePolicy(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Readiness(ApiModel):
    """When the sidecar tells Kubernetes to stop sending it traffic."""

    max_in_flight: int = Field(default=64, ge=1, le=1_000_000)
    """Not ready while this many requests are in flight in this pod."""
    upstream_health_path: str | None = Field(default=None, max_length=1024, pattern=PATH_PATTERN)
    """Path on the upstream probed for health (e.g. /health); not probed when unset."""
    max_error_rate: float = Field(default=0.5, ge=0, le=1)
    """Not ready while the share of upstream failures over the last minute exceeds this (0..1)."""


class Autoscaling(ApiModel):
    """Replica hints: each sidecar publishes its load; the operator aggregates them into status."""

    target_in_flight_per_pod: int = Field(default=16, ge=1, le=100_000)
    """In-flight requests one pod should carry; recommended replicas = ceil(total in flight / this)."""
    min_replicas: int = Field(default=1, ge=0, le=10_000)
    """Lower bound of the recommendation."""
    max_replicas: int = Field(default=10, ge=1, le=10_000)
    """Upper bound of the recommendation."""
    hpa: bool = False
    """Also manage a HorizontalPodAutoscaler for the owning workload."""

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})")
        return self


class Telemetry(ApiModel):
    """OpenTelemetry export: a span per request and GenAI metrics over OTLP/HTTP (protobuf). Needs the
    OpenTelemetry packages in the sidecar image (the 'otel' extra); the sidecar refuses to start without
    them. Unset fields fall back to the standard OTEL_* environment variables."""

    endpoint: str | None = Field(default=None, max_length=2048, pattern=URL_PATTERN)
    """OTLP/HTTP base URL of a collector (e.g. http://otel-collector.observability:4318); /v1/traces
    and /v1/metrics are appended. Unset: OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318."""
    headers: dict[Annotated[str, Field(max_length=256, pattern=HEADER_NAME_PATTERN)], str] = Field(
        default_factory=dict, max_length=32
    )
    """HTTP headers sent with every export (e.g. a tenant id); empty: OTEL_EXPORTER_OTLP_HEADERS."""
    sampling_ratio: float | None = Field(default=None, ge=0, le=1)
    """Share of new traces whose spans are exported (0..1); a caller's traceparent decides for its own
    trace. Unset: OTEL_TRACES_SAMPLER_ARG with a ratio sampler, else 1."""
    service_name: str | None = Field(default=None, min_length=1, max_length=253)
    """service.name of the exported resource. Unset: OTEL_SERVICE_NAME, else llmroute-sidecar."""
    traces: bool = True
    """Export a span per request."""
    metrics: bool = True
    """Export the GenAI metrics (gen_ai.client.token.usage, gen_ai.server.*)."""


class RolloutPolicy(StrEnum):
    AUTO = "auto"
    MANUAL = "manual"


class LLMRouteSpec(ApiModel):
    """Desired state of an LLMRoute: which pods, which upstream, which fleet-wide limits."""

    selector: LabelSelector
    """Pods in the route's namespace that get the sidecar."""
    upstream: Upstream | None = None
    """Where the sidecar forwards traffic (one upstream). Set this or upstreams."""
    upstreams: list[RoutedUpstream] = Field(default_factory=list, max_length=16)
    """Several upstreams, chosen per request by its model, priority and weight, with fallback to the
    next one (breaker open, 429 or 5xx before the first byte, connect errors, own quota exhausted).
    Set this or upstream."""
    deadline_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """Whole-request budget (SLA), retries and queueing included; 504 when exceeded."""
    queue_timeout_seconds: float = Field(default=5.0, ge=0, le=3600)
    """How long a request may wait for a concurrency slot before it is rejected."""
    max_request_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=1024**3)
    """Largest accepted request body; larger ones are answered 413."""
    identity: Identity = Field(default_factory=Identity)
    """How clients are identified for apiKey-scoped limits."""
    tiers: dict[Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)], TierLimits] = Field(
        default_factory=dict
    )
    """Limit values per tier (e.g. free, premium) for apiKey-scoped limits."""
    limits: list[Limit] = Field(default_factory=list, max_length=64)
    """Fleet-wide limits; a request must pass every limit that applies to it."""
    tokens: TokenAccounting = Field(default_factory=TokenAccounting)
    """Token reservation and live charging of tokensPerMinute limits (requests without max_tokens,
    streams)."""
    pricing: list[ModelPrice] = Field(default_factory=list, max_length=256)
    """Prices per model: each request's cost (its tokens at its model's price) is counted in
    llmroute_cost_total{route, model} and in costPerDay/costPerMonth budgets; requests of unpriced
    models cost nothing there."""
    pricing_config_map_ref: ConfigMapKeyRef | None = None
    """A ConfigMap key holding a shared price table: a YAML (or JSON) list of entries shaped like
    spec.pricing's (model, inputPerMillion, outputPerMillion, cachedInputPerMillion). Mounted into the
    sidecar by the operator and read again when it changes; its entries come after spec.pricing (the
    first matching entry prices a model)."""
    on_store_failure: StoreFailurePolicy = StoreFailurePolicy.ALLOW
    """When the quota store is unreachable: 'allow' falls back to a local limiter at each limit's share
    per replica; 'deny' answers 503 and reports not ready."""
    readiness: Readiness = Field(default_factory=Readiness)
    """Readiness rules of the sidecar."""
    autoscaling: Autoscaling | None = None
    """Replica recommendation (status.recommendedReplicas) and optional HPA."""
    telemetry: Telemetry | None = None
    """OpenTelemetry traces and GenAI metrics over OTLP; off when unset (unless the OTEL_* environment
    names an endpoint)."""
    rollout: RolloutPolicy = RolloutPolicy.AUTO
    """'auto' restarts workloads whose pods need a (re)injected sidecar; 'manual' lists them in status."""

    @property
    def routed_upstreams(self) -> tuple[RoutedUpstream, ...]:
        """The upstreams in the spec.upstreams form: spec.upstream is the one entry named 'default'."""
        if self.upstream is not None:
            fields = self.upstream.model_dump()
            return (RoutedUpstream(name=DEFAULT_UPSTREAM_NAME, **fields),)
        return tuple(self.upstreams)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.upstream is None) == (not self.upstreams):
            raise ValueError("set exactly one of upstream (one upstream) and upstreams (several)")
        upstream_names = [upstream.name for upstream in self.upstreams]
        repeated = sorted({name for name in upstream_names if upstream_names.count(name) > 1})
        if repeated:
            raise ValueError(f"upstream names must be unique; repeated: {', '.join(repeated)}")
        names = [limit.name for limit in self.limits]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique; repeated: {', '.join(duplicates)}")
        tier = self.identity.default_tier
        if tier is not None and tier not in self.tiers:
            defined = ", ".join(sorted(self.tiers)) or "none"
            raise ValueError(f"identity.defaultTier {tier!r} is not defined in tiers (defined: {defined})")
        jwt = self.identity.jwt
        if jwt is not None and (jwt.jwks_url is None) == (jwt.jwks_secret_ref is None):
            raise ValueError("identity.jwt needs exactly one of jwksUrl and jwksSecretRef")
        for limit in self.limits:
            if limit.upstream is not None and limit.upstream not in upstream_names:
                known = ", ".join(upstream_names) or "none: the limit needs spec.upstreams"
                raise ValueError(
                    f"limit {limit.name!r} is attached to upstream {limit.upstream!r}, which spec.upstreams "
                    f"does not define (defined: {known})"
                )
            if limit.claim_name is not None and jwt is None:
                raise ValueError(f"limit {limit.name!r} is keyed by {limit.key!r}, which needs identity.jwt")
            has_value = any(
                value is not None
                for value in (
                    limit.requests_per_minute,
                    limit.requests_per_hour,
                    limit.tokens_per_minute,
                    limit.concurrent_requests,
                    limit.tokens_per_day,
                    limit.tokens_per_month,
                    limit.cost_per_day,
                    limit.cost_per_month,
                )
            )
            if not has_value and not (limit.key == "apiKey" and self.tiers):
                raise ValueError(
                    f"limit {limit.name!r} sets none of requestsPerMinute, requestsPerHour, "
                    "tokensPerMinute, concurrentRequests, tokensPerDay, tokensPerMonth, costPerDay, "
                    "costPerMonth"
                )
            if limit.burst is not None and limit.requests_per_minute is None:
                raise ValueError(f"limit {limit.name!r} sets burst without requestsPerMinute")
        return self
