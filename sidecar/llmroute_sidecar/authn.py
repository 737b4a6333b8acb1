"""Authentication of the request path: static API keys (``policy.identify``) and JWTs (``identity.jwt``).

With ``identity.jwt`` set every request must authenticate: a credential shaped like a JWT is verified
as one (keys from ``jwksUrl``, kept fresh by a background loop, or from ``jwksSecretRef`` read with
the policy); any other credential is a static key, looked up in ``keysSecretRef`` (401
``malformed_token`` when the route has no key Secret). Without ``identity.jwt`` nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from llmroute_sidecar import errors
from llmroute_sidecar.api.spec import JwtIdentity
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.jwks import JwksCache
from llmroute_sidecar.jwt_identity import (
    KeySet,
    TokenError,
    claim_value,
    claim_values,
    looks_like_jwt,
    verify_token,
)
from llmroute_sidecar.policy import ClientIdentity, RoutePolicy, client_key, identify, sha256_hex

log = logging.getLogger("llmroute.authn")
#: How often the background loop looks for a due JWKS refresh.
REFRESH_TICK_SECONDS = 0.5
#: Prefix of a token subject before hashing, so a subject never shares a bucket with an equal API key.
SUBJECT_PREFIX = "jwt:"


def token_failure(error: TokenError) -> ProxyError:
    """The 401 for a token that does not authenticate, with RFC 6750's ``WWW-Authenticate``."""
    return ProxyError(
        401,
        error.code,
        error.message,
        "authentication_error",
        "unauthorized",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def token_identity(policy: RoutePolicy, claims: Mapping[str, Any], config: JwtIdentity) -> ClientIdentity:
    """Who a verified token's bearer is: hashed subject, tier from ``tierClaim``, limit-key claims."""
    spec = policy.route.spec
    subject = claim_value(claims, config.subject_claim) or ""
    tier = claim_value(claims, config.tier_claim) if config.tier_claim else None
    if tier not in spec.tiers:
        tier = spec.identity.default_tier
    return ClientIdentity(
        sha256_hex(SUBJECT_PREFIX + subject), tier, claim_values(claims, policy.limit_claims)
    )


class Authenticator:
    """Identifies each request's client; owns the JWKS caches and their refresh loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._caches: dict[str, JwksCache] = {}
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self, policy: Callable[[], RoutePolicy]) -> None:
        """Start the refresh loop: loads a route's jwksUrl at once, then every jwksRefreshSeconds."""
        self._loop_task = asyncio.create_task(self._refresh_loop(policy), name="jwks-refresh")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for cache in self._caches.values():
            await cache.close()
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def cache(self, config: JwtIdentity) -> JwksCache | None:
        """The cache of the route's jwksUrl (None for a Secret-held JWKS); one URL's cache is kept."""
        url = config.jwks_url
        if url is None:
            return None
        cache = self._caches.get(url)
        if cache is None:  # a new URL replaces the old one (a sidecar serves one route)
            cache = JwksCache(url, self.session, config.jwks_refresh_seconds, config.jwks_min_refresh_seconds)
            self._caches = {url: cache}
        cache.refresh_seconds = config.jwks_refresh_seconds  # a reload may change them
        cache.min_refresh_seconds = config.jwks_min_refresh_seconds
        return cache

    async def _refresh_loop(self, policy: Callable[[], RoutePolicy]) -> None:
        while True:
            config = policy().route.spec.identity.jwt
            cache = self.cache(config) if config is not None else None
            if cache is not None and cache.due():
                try:
                    await cache.refresh("interval" if cache.keys is not None else "start")
                except Exception:  # never let one bad fetch end the loop (fetch errors are logged)
                    log.exception("jwks refresh failed")
            await asyncio.sleep(REFRESH_TICK_SECONDS)

    async def identify(self, policy: RoutePolicy, headers: Mapping[str, str]) -> ClientIdentity:
        """The request's client; raises the 401 (or 503 ``jwks_unavailable``) ProxyError."""
        config = policy.route.spec.identity.jwt
        if config is None:
            return identify(policy, headers)
        header = policy.route.spec.identity.header
        credential = client_key(headers, header)
        if credential is None:
            raise errors.unauthorized("missing_api_key", f"this route needs a token in the {header} header")
        if not looks_like_jwt(credential):
            if policy.keys is None:
                raise token_failure(
                    TokenError("malformed_token", f"this route needs a JWT (Bearer) in the {header} header")
                )
            return identify(policy, headers)
        try:
            claims = await self._verify(policy, config, credential)
        except TokenError as error:
            raise token_failure(error) from None
        return token_identity(policy, claims, config)

    async def _verify(self, policy: RoutePolicy, config: JwtIdentity, token: str) -> dict[str, Any]:
        cache = self.cache(config)
        if cache is None:
            return verify_token(token, policy.jwks or KeySet(), config)
        if cache.keys is None and cache.may_refresh_early():
            await cache.refresh("start")
        if cache.keys is None:
            raise errors.overloaded(
                "jwks_unavailable", "the identity provider's signing keys (JWKS) could not be loaded yet"
            )
        try:
            return verify_token(token, cache.keys, config)
        except TokenError as error:
            if error.code != "unknown_key_id" or not cache.may_refresh_early():
                raise
        await cache.refresh("unknown_kid")  # rate-limited: a new key may have been published
        return verify_token(token, cache.keys, config)
