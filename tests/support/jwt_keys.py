"""Signing keys and tokens made in the test: an RSA, EC P-256 or Ed25519 key, its JWK, signed JWTs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test/"
AUDIENCE = "llm-gateway"


@dataclass
class SigningKey:
    """A private key with its ``kid`` and algorithm."""

    kid: str
    algorithm: str = "RS256"
    private: Any = field(init=False)

    def __post_init__(self) -> None:
        if self.algorithm == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        elif self.algorithm == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(self.algorithm)

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK with ``kid``, ``use`` and ``alg``."""
        codec = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[self.algorithm]
        data = json.loads(codec.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def token(self, lifetime: float = 300, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token signed with this key: iss, aud, sub, iat, exp by default, ``claims`` on top
        (a claim given as None is left out)."""
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + int(lifetime)}
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(
            payload, self.private, algorithm=self.algorithm, headers={"kid": self.kid, **(headers or {})}
        )


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """A JWKS document publishing ``keys``."""
    return {"keys": [key.jwk() for key in keys]}
