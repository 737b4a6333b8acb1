"""A route compiled for the request path: identity, tiers and the limit checks of each request.

``load_policy`` does the only I/O (reading mounted Secrets); everything else here is pure.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import ValidationError

from llmroute_sidecar.api import LLMRoute
from llmroute_sidecar.api.spec import (
    Limit,
    LimitMode,
    ModelPrice,
    RoutedUpstream,
    SecretKeyRef,
    TierLimits,
    WhenMissing,
)
from llmroute_sidecar.config import CONFIGMAPS_SUBDIR
from llmroute_sidecar.errors import ProxyError, bad_request, unauthorized
from llmroute_sidecar.jwt_identity import KeySet, parse_jwks
from llmroute_sidecar.quota.base import LimitCheck, micros

log = logging.getLogger("llmroute.policy")
SUBJECT_HEX = 32
LOOKUP_HEX = 16
NO_HEADER_SUBJECT = "-"
"""The one subject header-less (or claim-less) requests share under ``whenMissing: shared``."""
#: LimitChecks kept per route policy (one per limit and counted identity) before the cache restarts.
CHECKS_CACHE_SIZE = 4096


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ClientIdentity:
    """Who sent a request, as far as limits care: never the raw key."""

    key_hash: str | None = None
    """sha256-hex of the API key, or of the JWT subject (prefixed, see ``authn``)."""
    tier: str | None = None
    claims: Mapping[str, str] = field(default_factory=dict)
    """Values of the JWT claims that ``claim:<name>`` limits count by (never logged, hashed in checks)."""

    @property
    def label(self) -> str | None:
        """What logs may show: the tier, or a short key id."""
        if self.tier:
            return self.tier
        return self.key_hash[:12] if self.key_hash else None


@dataclass(frozen=True)
class UpstreamTarget:
    """One upstream as the request path uses it: its spec entry, URL (override applied), vendor key."""

    spec: RoutedUpstream
    url: str
    vendor_key: str | None

    @cached_property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class RoutePolicy:
    """One route's configuration as the proxy uses it; swapped whole on reload."""

    route: LLMRoute
    upstream_url: str
    vendor_key: str | None
    keys: Mapping[str, str] | None
    """sha256-hex(key) -> tier from identity.keysSecretRef; None when not configured."""
    config_hash: str
    jwks: KeySet | None = None
    """identity.jwt's key set when it comes from jwksSecretRef (a jwksUrl is fetched by ``authn``)."""
    pricing: tuple[ModelPrice, ...] = ()
    """The price table: spec.pricing, then the entries of spec.pricingConfigMapRef."""
    upstreams: tuple[UpstreamTarget, ...] = ()
    """spec.upstreams (or spec.upstream as the one entry 'default'), in spec order."""

    @cached_property
    def limited_upstreams(self) -> frozenset[str]:
        """Names of the upstreams that limits are attached to (``limit.upstream``)."""
        return frozenset(limit.upstream for limit in self.route.spec.limits if limit.upstream is not None)

    @cached_property
    def key_index(self) -> dict[str, tuple[str, str]]:
        """Digest prefix -> (full digest, tier), for the constant-time check in ``identify``."""
        return {digest[:LOOKUP_HEX]: (digest, tier) for digest, tier in (self.keys or {}).items()}

    @cached_property
    def name(self) -> str:
        return self.route.key

    @cached_property
    def checks_cache(self) -> dict[tuple[str, str, str], LimitCheck]:
        """``build_checks``' LimitChecks by (limit, subject, tier): one object per counted identity, so
        the stores' per-check caches hit (bounded: cleared past ``CHECKS_CACHE_SIZE`` entries)."""
        return {}

    @cached_property
    def shadow_limits(self) -> frozenset[str]:
        """Names of the route's shadow-mode limits: they never reject and never appear in headers."""
        return frozenset(limit.name for limit in self.route.spec.limits if limit.mode is LimitMode.SHADOW)

    @cached_property
    def uses_api_keys(self) -> bool:
        return self.keys is not None or any(limit.key == "apiKey" for limit in self.route.spec.limits)

    @cached_property
    def has_cost_budgets(self) -> bool:
        """Some limit (or tier) sets costPerDay or costPerMonth: requests need a reserved cost."""
        spec = self.route.spec
        values: list[TierLimits] = [*spec.limits, *spec.tiers.values()]
        return any(v.cost_per_day is not None or v.cost_per_month is not None for v in values)

    @cached_property
    def limits_by_name(self) -> dict[str, Limit]:
        return {limit.name: limit for limit in self.route.spec.limits}

    def limit(self, name: str) -> Limit | None:
        """The route's limit of that name."""
        return self.limits_by_name.get(name)

    @cached_property
    def limit_claims(self) -> tuple[str, ...]:
        """The claims ``claim:<name>`` limits count by."""
        return tuple(sorted({limit.claim_name for limit in self.route.spec.limits if limit.claim_name}))


def config_hash(route: LLMRoute) -> str:
    """A stable hash of the spec: equal specs give equal hashes."""
    canonical = json.dumps(route.spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_policy(
    route: LLMRoute,
    secrets_dir: Path,
    upstream_override: str | None = None,
    file_secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> RoutePolicy:
    """Compile a route, reading its mounted Secrets (``<secrets_dir>/<name>/<key>``).

    ``file_secrets`` (the Secret documents of the route file, name -> data) stand in for a Secret
    that is not mounted: what running a sidecar by hand against an example needs.
    """
    spec = route.spec
    inline = file_secrets or {}
    upstreams = tuple(
        UpstreamTarget(
            upstream,
            (upstream_override or upstream.url).rstrip("/"),
            _vendor_key(upstream.api_key_secret_ref, secrets_dir, inline),
        )
        for upstream in spec.routed_upstreams
    )
    keys = None
    if spec.identity.keys_secret_ref is not None:
        name = spec.identity.keys_secret_ref.name
        directory = secrets_dir / name
        if not directory.is_dir() and name in inline:
            log.info("client keys from the route file's Secret", extra={"fields": {"secret": name}})
            keys = _key_entries(inline[name].items())
        else:
            keys = read_key_directory(directory, secrets_dir)
    jwks = None
    jwt = spec.identity.jwt
    if jwt is not None and jwt.jwks_secret_ref is not None:
        ref = jwt.jwks_secret_ref
        path = secrets_dir / ref.name / ref.key
        if not path.exists() and ref.key in inline.get(ref.name, {}):
            log.info("JWKS from the route file's Secret", extra={"fields": {"secret": ref.name}})
            document = inline[ref.name][ref.key]
        else:
            document = _read_secret_file(path, "identity.jwt.jwksSecretRef", secrets_dir)
        try:
            jwks = parse_jwks(document)
        except ValueError as error:
            raise ValueError(f"identity.jwt.jwksSecretRef: Secret {ref.name}/{ref.key}: {error}") from None
    pricing = tuple(spec.pricing)
    if spec.pricing_config_map_ref is not None:
        pricing += read_price_table(pricing_file(route, secrets_dir))
    first = upstreams[0]
    return RoutePolicy(
        route,
        first.url,
        first.vendor_key,
        keys,
        config_hash(route),
        jwks,
        pricing=pricing,
        upstreams=upstreams,
    )


def pricing_file(route: LLMRoute, secrets_dir: Path) -> Path:
    """Where the ConfigMap key of spec.pricingConfigMapRef is mounted."""
    ref = route.spec.pricing_config_map_ref
    assert ref is not None
    return secrets_dir / CONFIGMAPS_SUBDIR / ref.name / ref.key


def read_price_table(path: Path) -> tuple[ModelPrice, ...]:
    """A mounted price table: a YAML or JSON list of spec.pricing entries."""
    what = "pricingConfigMapRef"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{what}: cannot read mounted ConfigMap key {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{what}: {path} is not YAML: {error}") from None
    if not isinstance(document, list):
        raise ValueError(f"{what}: {path} must hold a list of prices (model, inputPerMillion, ...)")
    prices = []
    for index, entry in enumerate(document):
        try:
            prices.append(ModelPrice.model_validate(entry))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in (index, *first["loc"]))
            raise ValueError(f"{what}: {path}: {where}: {first['msg']}") from None
    return tuple(prices)


def _vendor_key(
    ref: SecretKeyRef | None, secrets_dir: Path, inline: Mapping[str, Mapping[str, str]]
) -> str | None:
    """An upstream's apiKeySecretRef: the mounted file, else the route file's Secret document."""
    if ref is None:
        return None
    path = secrets_dir / ref.name / ref.key
    if not path.exists() and ref.key in inline.get(ref.name, {}):
        return _inline_value(inline[ref.name][ref.key], ref.name, ref.key)
    return _read_secret_file(path, "upstream.apiKeySecretRef", secrets_dir)


def _inline_value(value: str, name: str, key: str) -> str:
    log.info("vendor key from the route file's Secret", extra={"fields": {"secret": name}})
    if not value.strip():
        raise ValueError(f"upstream.apiKeySecretRef: Secret {name} in the route file has an empty {key}")
    return value.strip()


def _where_to_put(secrets_dir: Path, name: str) -> str:
    return (
        f"mount it there, pass --secrets-dir DIR (env LLMROUTE_SECRETS_DIR; now {secrets_dir}) holding "
        f"{name}/, or add a Secret document named {name} to the route file"
    )


def secret_files(route: LLMRoute, secrets_dir: Path) -> list[Path]:
    """The mounted files a route reads (vendor key, client key entries, JWKS, price table)."""
    spec = route.spec
    files = []
    for upstream in spec.routed_upstreams:
        if upstream.api_key_secret_ref is not None:
            ref = upstream.api_key_secret_ref
            files.append(secrets_dir / ref.name / ref.key)
    if spec.identity.jwt is not None and spec.identity.jwt.jwks_secret_ref is not None:
        ref = spec.identity.jwt.jwks_secret_ref
        files.append(secrets_dir / ref.name / ref.key)
    if spec.identity.keys_secret_ref is not None:
        directory = secrets_dir / spec.identity.keys_secret_ref.name
        if directory.is_dir():
            files.extend(sorted(p for p in directory.iterdir() if not p.name.startswith(".")))
    if spec.pricing_config_map_ref is not None:
        files.append(pricing_file(route, secrets_dir))
    return files


def _read_secret_file(path: Path, what: str, secrets_dir: Path | None = None) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        hint = f"; {_where_to_put(secrets_dir, path.parent.name)}" if secrets_dir is not None else ""
        raise ValueError(f"{what}: cannot read mounted secret {path}: {error.strerror}{hint}") from None
    if not value:
        raise ValueError(f"{what}: mounted secret {path} is empty")
    return value


def read_key_directory(directory: Path, secrets_dir: Path | None = None) -> dict[str, str]:
    """A mounted key Secret: each file is named sha256-hex(key) and holds the key's tier."""
    if not directory.is_dir():
        hint = f"; {_where_to_put(secrets_dir, directory.name)}" if secrets_dir is not None else ""
        raise ValueError(f"identity.keysSecretRef: mounted secret directory {directory} does not exist{hint}")
    entries = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in sorted(directory.iterdir())
        if not entry.name.startswith(".") and entry.is_file()
    ]
    return _key_entries(entries)


def _key_entries(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """sha256-hex(key) -> tier, skipping (with a warning) names that are not such a digest."""
    keys = {}
    for raw_name, tier in entries:
        name = raw_name.lower()
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            log.warning(
                "ignoring key entry that is not a sha256 hex digest", extra={"fields": {"entry": name}}
            )
            continue
        keys[name] = tier.strip()
    return keys


def client_key(headers: Mapping[str, str], header: str) -> str | None:
    """The client key from ``header``, a leading 'Bearer ' stripped."""
    raw = headers.get(header)
    if raw is None:
        return None
    scheme, _, rest = raw.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return raw.strip() or None


def identify(policy: RoutePolicy, headers: Mapping[str, str]) -> ClientIdentity:
    """Resolve the client's key and tier; raise a 401 ProxyError where keys are required."""
    spec = policy.route.spec
    if not policy.uses_api_keys:
        return ClientIdentity()
    raw = client_key(headers, spec.identity.header)
    if raw is None:
        raise unauthorized(
            "missing_api_key", f"this route needs a client key in the {spec.identity.header} header"
        )
    digest = sha256_hex(raw)
    if policy.keys is None:
        return ClientIdentity(digest, spec.identity.default_tier)
    # Look up by a digest prefix (its timing says nothing usable about keys), verify in constant time.
    stored = policy.key_index.get(digest[:LOOKUP_HEX])
    if stored is None or not hmac.compare_digest(stored[0], digest):
        raise unauthorized("invalid_api_key", "the client key is not known to this route")
    return ClientIdentity(digest, stored[1] or spec.identity.default_tier)


_LIMIT_FIELDS = (
    "requests_per_minute",
    "requests_per_hour",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
    "cost_per_day",
    "cost_per_month",
)
_MONEY_FIELDS = frozenset({"cost_per_day", "cost_per_month"})


def _merged(limit: Limit, tier: TierLimits | None) -> dict[str, int | None]:
    values: dict[str, int | float | None] = {name: getattr(limit, name) for name in _LIMIT_FIELDS}
    if tier is not None:
        for name in _LIMIT_FIELDS:
            if getattr(tier, name) is not None:
                values[name] = getattr(tier, name)
    return {
        name: (micros(value) if name in _MONEY_FIELDS else int(value)) if value is not None else None
        for name, value in values.items()
    }


def model_matches(model: str | None, patterns: Iterable[str]) -> bool:
    """True when ``model`` equals or matches (glob) one of ``patterns``; never for a missing model."""
    return model is not None and any(model == p or fnmatch.fnmatchcase(model, p) for p in patterns)


def build_checks(
    policy: RoutePolicy,
    identity: ClientIdentity,
    headers: Mapping[str, str],
    model: str | None = None,
    upstream: str | None = None,
) -> tuple[LimitCheck, ...]:
    """The limit checks that apply to one request (``model``: the body's model as the client sent it):
    the route's (``upstream`` None), or those attached to the upstream named ``upstream``
    (``limit.upstream``).

    A limit with ``models`` applies only to requests whose model matches one of them; a
    ``key: model`` limit counts each model name separately and leaves requests without one out.

    A header-keyed limit whose header is missing (or empty) follows its ``whenMissing``: 'reject'
    raises a 400 ProxyError (``missing_limit_header``), 'shared' counts the request in one common
    bucket, 'skip' leaves the limit out. Shadow limits never reject: 'reject' skips them. A
    claim-keyed limit does the same for a client without that claim (403 ``missing_limit_claim``).
    """
    spec = policy.route.spec
    checks = []
    cache = policy.checks_cache
    for limit in spec.limits:
        if limit.upstream != upstream:
            continue
        tier = None
        if limit.models and not model_matches(model, limit.models):
            continue
        if limit.key == "route":
            subject = ""
        elif limit.key == "model":
            if not model:
                continue
            subject = sha256_hex(model)[:SUBJECT_HEX]
        elif limit.key == "apiKey":
            subject = (identity.key_hash or NO_HEADER_SUBJECT)[:SUBJECT_HEX]
            tier = spec.tiers.get(identity.tier) if identity.tier else None
        else:
            claim = limit.claim_name
            value = identity.claims.get(claim) if claim is not None else headers.get(limit.header_name or "")
            if value and value.strip():
                subject = sha256_hex(value)[:SUBJECT_HEX]
            elif limit.when_missing is WhenMissing.SHARED:
                subject = NO_HEADER_SUBJECT
            elif limit.when_missing is WhenMissing.SKIP or limit.mode is LimitMode.SHADOW:
                continue
            else:
                raise missing_limit_claim(limit) if claim is not None else missing_limit_header(limit)
        cache_key = (limit.name, subject, identity.tier or "" if tier is not None else "")
        check = cache.get(cache_key)
        if check is None:
            values = _merged(limit, tier)
            if all(value is None for value in values.values()):
                continue
            check = LimitCheck(
                limit=limit.name,
                scope=limit.key,
                subject=subject,
                burst=limit.burst,
                shadow=limit.mode is LimitMode.SHADOW,
                **values,
            )
            if len(cache) >= CHECKS_CACHE_SIZE:
                cache.clear()
            cache[cache_key] = check
        checks.append(check)
    return tuple(checks)


def missing_limit_header(limit: Limit) -> ProxyError:
    """The 400 for a request without the header a ``whenMissing: reject`` limit is keyed by."""
    header = limit.header_name or ""
    return bad_request(
        "missing_limit_header",
        f"this route limits requests per {header} header value (limit '{limit.name}'); "
        f"send a non-empty {header} header",
    )


def missing_limit_claim(limit: Limit) -> ProxyError:
    """The 403 for a client whose token lacks the claim a ``whenMissing: reject`` limit is keyed by."""
    claim = limit.claim_name or ""
    return ProxyError(
        403,
        "missing_limit_claim",
        f"this route limits requests per value of the token claim {claim!r} (limit '{limit.name}'); "
        f"the client's credential carries no such claim (a string or integer)",
        "permission_error",
        "client_error",
    )
