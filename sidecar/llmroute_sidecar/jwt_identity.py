"""JWT verification for ``identity.jwt``: pure functions over a token, a key set and the route's settings.

No I/O here: key sets are parsed from JWKS documents (``parse_jwks``) that ``jwks.py`` fetches or the
policy reads from a Secret. Every failure is a ``TokenError`` whose code is one of the documented 401
codes. Tokens and claim values never appear in messages: clients get the reason, not their input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from llmroute_sidecar.api.spec import JwtAlgorithm, JwtIdentity

#: Three base64url parts (the signature may be empty only to be rejected as unsigned).
JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
#: What a key in a JWKS may be used for: asymmetric signing only, never HMAC ('oct') keys.
SIGNING_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
SUPPORTED_ALGORITHMS = frozenset(algorithm.value for algorithm in JwtAlgorithm)


@dataclass(frozen=True)
class TokenError(Exception):
    """A token that does not authenticate its bearer; ``code`` is the 401's error code."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class KeySet:
    """The signing keys of a JWKS: by ``kid``, and those without one."""

    by_kid: Mapping[str, jwt.PyJWK] = field(default_factory=dict)
    unnamed: tuple[jwt.PyJWK, ...] = ()

    @property
    def kids(self) -> list[str]:
        return sorted(self.by_kid)

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.unnamed)

    def find(self, kid: object, algorithm: str) -> jwt.PyJWK:
        """The key a token's header names; a token without ``kid`` needs exactly one key for its alg."""
        if isinstance(kid, str):
            key = self.by_kid.get(kid)
            if key is None:
                raise TokenError("unknown_key_id", "the token's key id (kid) is not in the route's key set")
            if key.algorithm_name != algorithm:
                raise TokenError(
                    "invalid_signature",
                    f"the token's key (kid) is a {key.algorithm_name} key; the token claims {algorithm}",
                )
            return key
        if kid is not None:
            raise TokenError("malformed_token", "the token's kid header is not a string")
        matching = [key for key in (*self.by_kid.values(), *self.unnamed) if key.algorithm_name == algorithm]
        if len(matching) != 1:
            raise TokenError(
                "unknown_key_id",
                f"the token names no key id (kid) and the key set holds {len(matching)} {algorithm} keys",
            )
        return matching[0]


def parse_jwks(document: str | bytes) -> KeySet:
    """A JWKS (``{"keys": [...]}``) as a ``KeySet`` of its asymmetric signing keys.

    Keys that cannot sign tokens here (HMAC 'oct' keys, 'use: enc', algorithms other than RS256, ES256,
    EdDSA, malformed parameters) are left out; a document without any usable key is a ``ValueError``.
    """
    try:
        data = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the JWKS is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('the JWKS is not an object with a "keys" list')
    by_kid: dict[str, jwt.PyJWK] = {}
    unnamed: list[jwt.PyJWK] = []
    for entry in data["keys"]:
        key = _signing_key(entry)
        if key is None:
            continue
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid[kid] = key
        else:
            unnamed.append(key)
    if not by_kid and not unnamed:
        supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
        raise ValueError(f"the JWKS holds no usable signing key ({supported}; RSA, EC P-256 or Ed25519)")
    return KeySet(by_kid, tuple(unnamed))


def _signing_key(entry: object) -> jwt.PyJWK | None:
    if not isinstance(entry, dict) or entry.get("kty") not in SIGNING_KEY_TYPES:
        return None
    if entry.get("use", "sig") != "sig":
        return None
    try:
        key = jwt.PyJWK(entry)
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return key if key.algorithm_name in SUPPORTED_ALGORITHMS else None


def looks_like_jwt(credential: str) -> bool:
    """True for a credential shaped like a JWS compact token: three dot-separated base64url parts."""
    return JWT_SHAPE.match(credential) is not None


def unverified_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, not yet trusted; ``malformed_token`` when it does not decode."""
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed_token", "the bearer token is not a well-formed JWT") from None


def verify_token(token: str, keys: KeySet, config: JwtIdentity) -> dict[str, Any]:
    """The token's claims once signature, algorithm, issuer, audience and time claims all check out.

    Requires ``exp``, ``iss``, ``aud`` and the subject claim; 'none' and HS* never verify (the
    allow-list only holds asymmetric algorithms, and a key verifies with its own algorithm only).
    """
    header = unverified_header(token)
    algorithm = header.get("alg")
    allowed = [str(a) for a in config.algorithms]
    if not isinstance(algorithm, str) or algorithm not in allowed:
        raise TokenError(
            "unsupported_token_algorithm",
            f"the token's signature algorithm is not accepted here (accepted: {', '.join(allowed)})",
        )
    key = keys.find(header.get("kid"), algorithm)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key.key,  # find() checked it is a key of this algorithm
            algorithms=[algorithm],
            audience=list(config.audience),
            issuer=config.issuer,
            leeway=config.clock_skew_seconds,
            options={"require": ["exp", "iss", "aud", config.subject_claim], "verify_sub": False},
        )
    except jwt.PyJWTError as error:
        raise _token_error(error, config) from None
    if claim_value(claims, config.subject_claim) is None:
        raise TokenError(
            "missing_token_claim", f"the token's {config.subject_claim!r} claim is not a string or integer"
        )
    return claims


def _token_error(error: jwt.PyJWTError, config: JwtIdentity) -> TokenError:
    """The documented code for a PyJWT failure (most specific exception classes first)."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return TokenError("token_expired", "the token has expired")
    if isinstance(error, jwt.ImmatureSignatureError):
        return TokenError("token_not_yet_valid", "the token is not valid yet (nbf or iat in the future)")
    if isinstance(error, jwt.InvalidSignatureError):
        return TokenError("invalid_signature", "the token's signature does not verify")
    if isinstance(error, jwt.InvalidAudienceError):
        expected = ", ".join(config.audience)
        return TokenError(
            "invalid_audience", f"the token's audience (aud) is not accepted (expected {expected})"
        )
    if isinstance(error, jwt.InvalidIssuerError):
        return TokenError("invalid_issuer", f"the token's issuer (iss) is not {config.issuer}")
    if isinstance(error, jwt.MissingRequiredClaimError):
        return TokenError("missing_token_claim", f"the token has no {error.claim!r} claim")
    if isinstance(error, jwt.InvalidAlgorithmError):
        return TokenError("unsupported_token_algorithm", "the token's signature algorithm is not accepted")
    return TokenError("malformed_token", "the bearer token is not a well-formed JWT")


def claim_value(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim usable as an identity or limit key: a non-empty string or an integer, as text."""
    value = claims.get(name)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def claim_values(claims: Mapping[str, Any], names: Sequence[str]) -> dict[str, str]:
    """The usable values of ``names`` (claims without one are left out)."""
    found = {name: claim_value(claims, name) for name in names}
    return {name: value for name, value in found.items() if value is not None}
