"""identity.jwt: token verification (every failure mode), JWKS parsing and caching, claim-keyed limits,
how JWTs and static keys coexist, and the ``keys`` CLI. Real-process tests: tests/test_jwt_sidecar.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from llmroute_sidecar.api.manifest import ManifestError, parse_route_text
from llmroute_sidecar.api.spec import JwtIdentity
from llmroute_sidecar.authn import SUBJECT_PREFIX, Authenticator
from llmroute_sidecar.errors import ProxyError
from llmroute_sidecar.jwt_identity import (
    KeySet,
    TokenError,
    claim_value,
    looks_like_jwt,
    parse_jwks,
    verify_token,
)
from llmroute_sidecar.keys_cli import run as keys_run
from llmroute_sidecar.policy import RoutePolicy, build_checks, identify, load_policy, sha256_hex
from tests.support.jwks_server import JwksServer
from tests.support.jwt_keys import AUDIENCE, ISSUER, SigningKey, jwks

CONFIG = JwtIdentity.model_validate(
    {"issuer": ISSUER, "audience": [AUDIENCE], "jwksUrl": "http://127.0.0.1:9/jwks.json"}
)


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("rsa-1", "RS256")


@pytest.fixture(scope="module")
def keyset(rsa_key: SigningKey) -> KeySet:
    return parse_jwks(json.dumps(jwks(rsa_key)))


def _code(token: str, keys: KeySet, config: JwtIdentity = CONFIG) -> str:
    with pytest.raises(TokenError) as caught:
        verify_token(token, keys, config)
    return caught.value.code


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_each_algorithm_verifies_and_returns_the_claims(algorithm: str) -> None:
    key = SigningKey(f"{algorithm}-key", algorithm)
    claims = verify_token(key.token(org_id="acme"), parse_jwks(json.dumps(jwks(key))), CONFIG)
    assert claims["sub"] == "user-1" and claims["org_id"] == "acme"


def test_expired_and_future_tokens_are_refused_outside_the_clock_skew(
    rsa_key: SigningKey, keyset: KeySet
) -> None:
    assert _code(rsa_key.token(lifetime=-60), keyset) == "token_expired"
    verify_token(rsa_key.token(lifetime=-10), keyset, CONFIG)  # within the default 30 s skew
    strict = CONFIG.model_copy(update={"clock_skew_seconds": 0})
    assert _code(rsa_key.token(lifetime=-10), keyset, strict) == "token_expired"
    assert _code(rsa_key.token(nbf=int(time.time()) + 120), keyset) == "token_not_yet_valid"
    assert _code(rsa_key.token(iat=int(time.time()) + 120), keyset) == "token_not_yet_valid"


def test_a_signature_by_another_key_with_the_same_kid_is_refused(keyset: KeySet) -> None:
    impostor = SigningKey("rsa-1", "RS256")
    assert _code(impostor.token(), keyset) == "invalid_signature"


def test_unknown_kid_wrong_issuer_wrong_audience(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert _code(SigningKey("other", "ES256").token(), keyset) == "unknown_key_id"
    assert _code(rsa_key.token(iss="https://evil.test/"), keyset) == "invalid_issuer"
    assert _code(rsa_key.token(aud="someone-else"), keyset) == "invalid_audience"
    assert verify_token(rsa_key.token(aud=["x", AUDIENCE]), keyset, CONFIG)["aud"] == ["x", AUDIENCE]


def test_missing_required_claims(rsa_key: SigningKey, keyset: KeySet) -> None:
    for claim in ("exp", "iss", "aud", "sub"):
        assert _code(rsa_key.token(**{claim: None}), keyset) == "missing_token_claim", claim
    assert _code(rsa_key.token(sub=["a", "b"]), keyset) == "missing_token_claim"
    by_email = CONFIG.model_copy(update={"subject_claim": "email"})
    assert _code(rsa_key.token(), keyset, by_email) == "missing_token_claim"
    assert verify_token(rsa_key.token(email="a@b.test"), keyset, by_email)["email"] == "a@b.test"


def test_malformed_tokens(rsa_key: SigningKey, keyset: KeySet) -> None:
    assert _code("abc.def.ghi", keyset) == "malformed_token"
    not_json = jwt.api_jws.encode(b"not json", rsa_key.private, "RS256", headers={"kid": "rsa-1"})
    assert _code(not_json, keyset) == "malformed_token"  # signed, but the payload is no claim set
    assert _code(_b64({"alg": "RS256", "kid": 7}) + "." + _b64({"sub": "x"}) + ".c2ln", keyset) == (
        "malformed_token"
    )


def test_none_and_hmac_with_the_public_key_never_verify(rsa_key: SigningKey, keyset: KeySet) -> None:
    unsigned = _b64({"alg": "none", "kid": "rsa-1"}) + "." + _b64({"iss": ISSUER, "aud": AUDIENCE}) + "."
    assert _code(unsigned, keyset) == "unsupported_token_algorithm"
    public_pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60}
    # PyJWT itself refuses a PEM as an HMAC secret; sign by hand as an attacker would.
    header = _b64({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"})
    signing_input = f"{header}.{_b64(payload)}".encode()
    mac = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    forged = signing_input.decode() + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert _code(forged, keyset) == "unsupported_token_algorithm"


def test_the_allow_list_and_the_keys_own_algorithm_are_enforced(rsa_key: SigningKey) -> None:
    ec_key = SigningKey("ec-1", "ES256")
    keys = parse_jwks(json.dumps(jwks(rsa_key, ec_key)))
    rsa_only = CONFIG.model_copy(update={"algorithms": ["RS256"]})
    assert _code(ec_key.token(), keys, rsa_only) == "unsupported_token_algorithm"
    # an ES256 token naming the RSA key's kid: the key is only ever used with RS256
    confused = ec_key.token(headers={"kid": "rsa-1"})
    assert _code(confused, keys) == "invalid_signature"


def test_a_token_without_kid_needs_exactly_one_key_of_its_algorithm(rsa_key: SigningKey) -> None:
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        rsa_key.private,
        algorithm="RS256",
    )
    one = parse_jwks(json.dumps(jwks(rsa_key)))
    assert verify_token(token, one, CONFIG)["sub"] == "x"
    two = parse_jwks(json.dumps(jwks(rsa_key, SigningKey("rsa-2", "RS256"))))
    assert _code(token, two) == "unknown_key_id"


# -- JWKS parsing and shapes --------------------------------------------------------------------


def test_parse_jwks_keeps_only_asymmetric_signing_keys(rsa_key: SigningKey) -> None:
    document = jwks(rsa_key)
    document["keys"] += [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**SigningKey("enc", "ES256").jwk(), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
    ]
    assert parse_jwks(json.dumps(document)).kids == ["rsa-1"]
    with pytest.raises(ValueError, match="no usable signing key"):
        parse_jwks(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_jwks("{nope")
    with pytest.raises(ValueError, match='"keys" list'):
        parse_jwks("[]")


def test_what_looks_like_a_jwt() -> None:
    assert looks_like_jwt("eyJh.eyJz.c2ln") and looks_like_jwt("a.b.")
    assert not looks_like_jwt("sk-live-123") and not looks_like_jwt("a.b") and not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a b.c.d")


def test_claim_values_usable_as_keys() -> None:
    claims = {"s": "acme", "i": 42, "b": True, "l": ["x"], "e": " ", "f": 1.5}
    assert [claim_value(claims, name) for name in ("s", "i", "b", "l", "e", "f", "none")] == [
        "acme",
        "42",
        None,
        None,
        None,
        None,
        None,
    ]


# -- the route: validation, identity, claim-keyed limits ----------------------------------------

ROUTE = """\
apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata: {name: r, namespace: t}
spec:
  selector: {matchLabels: {app: x}}
  upstream: {url: "http://127.0.0.1:9"}
  identity:
    jwt: {issuer: "%(issuer)s", audience: [%(audience)s], %(source)s,
          tierClaim: plan, jwksMinRefreshSeconds: 1}
    defaultTier: free
  tiers: {free: {requestsPerMinute: 2}, pro: {requestsPerMinute: 100}}
  limits:
    - {name: per-client, key: apiKey}
    - {name: per-org, key: "claim:org_id", requestsPerMinute: 50%(when)s}
"""


def _route_text(source: str, when: str = "", extra: str = "") -> str:
    text = ROUTE % {"issuer": ISSUER, "audience": AUDIENCE, "source": source, "when": when}
    return text.replace("    defaultTier: free\n", "    defaultTier: free\n" + extra)


def _policy(
    tmp_path: Path, keys: list[SigningKey], when: str = "", extra: str = "", **files: str
) -> RoutePolicy:
    text = _route_text("jwksSecretRef: {name: idp, key: jwks.json}", when, extra)
    route = parse_route_text(text)
    secrets = {"idp": {"jwks.json": json.dumps(jwks(*keys))}, **{k: {"x": v} for k, v in files.items()}}
    return load_policy(route, tmp_path, file_secrets=secrets)


def test_route_validation_of_jwt_and_claim_keys() -> None:
    both = _route_text('jwksUrl: "http://a/j", jwksSecretRef: {name: a, key: b}')
    with pytest.raises(ManifestError, match="exactly one of jwksUrl and jwksSecretRef"):
        parse_route_text(both)
    with pytest.raises(ManifestError, match="exactly one of jwksUrl and jwksSecretRef"):
        parse_route_text(_route_text("clockSkewSeconds: 5"))
    plain = (
        "apiVersion: llmroute.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n"
        "  selector: {matchLabels: {app: x}}\n  upstream: {url: 'http://a'}\n"
        "  limits: [{name: o, key: 'claim:org_id', requestsPerMinute: 1}]\n"
    )
    with pytest.raises(ManifestError, match=r"'claim:org_id', which needs identity\.jwt"):
        parse_route_text(plain)
    with pytest.raises(ManifestError, match=r"'claim:' must be 'route', 'apiKey', 'header:<Header-Name>' or"):
        parse_route_text(plain.replace("claim:org_id", "claim:"))
    with pytest.raises(ManifestError, match="algorithms"):
        parse_route_text(_route_text('jwksUrl: "http://a/j", algorithms: [HS256]'))


async def test_tier_subject_and_claims_from_a_verified_token(tmp_path: Path, rsa_key: SigningKey) -> None:
    policy = _policy(tmp_path, [rsa_key])
    auth = Authenticator()
    try:
        pro = await auth.identify(policy, {"Authorization": f"Bearer {rsa_key.token(plan='pro', org_id=7)}"})
        unknown_plan = await auth.identify(policy, {"Authorization": f"Bearer {rsa_key.token(plan='gold')}"})
    finally:
        await auth.close()
    assert pro.tier == "pro" and unknown_plan.tier == "free"
    assert pro.key_hash == sha256_hex(SUBJECT_PREFIX + "user-1") != sha256_hex("user-1")
    assert pro.claims == {"org_id": "7"} and unknown_plan.claims == {}
    checks = {check.limit: check for check in build_checks(policy, pro, {})}
    assert checks["per-client"].requests_per_minute == 100  # the pro tier's value
    assert checks["per-org"].subject == sha256_hex("7")[:32]
    assert "7" not in {check.subject for check in checks.values()}


@pytest.mark.parametrize(
    ("when", "expected"), [("", "reject"), (", whenMissing: shared", "-"), (", whenMissing: skip", None)]
)
async def test_when_missing_for_claim_keys(
    tmp_path: Path, rsa_key: SigningKey, when: str, expected: str | None
) -> None:
    policy = _policy(tmp_path, [rsa_key], when)
    auth = Authenticator()
    try:
        identity = await auth.identify(policy, {"Authorization": f"Bearer {rsa_key.token()}"})
    finally:
        await auth.close()
    if expected == "reject":
        with pytest.raises(ProxyError) as caught:
            build_checks(policy, identity, {})
        assert (caught.value.status, caught.value.code) == (403, "missing_limit_claim")
        assert "org_id" in caught.value.message and "per-org" in caught.value.message
        return
    subjects = {check.limit: check.subject for check in build_checks(policy, identity, {})}
    assert subjects.get("per-org") == expected


async def test_jwt_and_static_keys_coexist(tmp_path: Path, rsa_key: SigningKey) -> None:
    keys_dir = tmp_path / "static"
    keys_dir.mkdir()
    (keys_dir / sha256_hex("sk-static")).write_text("pro")
    extra = "    keysSecretRef: {name: static}\n"
    with_keys = _policy(tmp_path, [rsa_key], ", whenMissing: shared", extra)
    jwt_only = _policy(tmp_path, [rsa_key], ", whenMissing: shared")
    auth = Authenticator()
    try:
        static = await auth.identify(with_keys, {"Authorization": "Bearer sk-static"})
        token = await auth.identify(with_keys, {"Authorization": f"Bearer {rsa_key.token()}"})
        failures = {}
        for name, policy, value in [
            ("unknown static key", with_keys, "Bearer sk-unknown"),
            ("static key on a JWT-only route", jwt_only, "Bearer sk-static"),
            ("no credential", jwt_only, None),
            ("bad token", with_keys, f"Bearer {rsa_key.token(lifetime=-120)}"),
        ]:
            with pytest.raises(ProxyError) as caught:
                await auth.identify(policy, {"Authorization": value} if value else {})
            failures[name] = (caught.value.status, caught.value.code, caught.value.type)
            assert caught.value.headers.get("WWW-Authenticate", "").startswith("Bearer") or name in (
                "unknown static key",
                "no credential",
            )
    finally:
        await auth.close()
    assert (static.tier, static.key_hash, static.claims) == ("pro", sha256_hex("sk-static"), {})
    assert token.key_hash == sha256_hex(SUBJECT_PREFIX + "user-1")
    assert failures == {
        "unknown static key": (401, "invalid_api_key", "authentication_error"),
        "static key on a JWT-only route": (401, "malformed_token", "authentication_error"),
        "no credential": (401, "missing_api_key", "authentication_error"),
        "bad token": (401, "token_expired", "authentication_error"),
    }
    # a static-key client has no claims: the claim-keyed limit counts it in the shared bucket
    assert {c.limit: c.subject for c in build_checks(with_keys, static, {})}["per-org"] == "-"


def test_an_invalid_jwks_secret_stops_the_policy_naming_it(tmp_path: Path) -> None:
    route = parse_route_text(_route_text("jwksSecretRef: {name: idp, key: jwks.json}"))
    with pytest.raises(ValueError, match=r"identity.jwt.jwksSecretRef: Secret idp/jwks.json: .*no usable"):
        load_policy(route, tmp_path, file_secrets={"idp": {"jwks.json": '{"keys": []}'}})
    with pytest.raises(ValueError, match=r"identity.jwt.jwksSecretRef: cannot read mounted secret"):
        load_policy(route, tmp_path)


# -- a JWKS URL: first load, unknown kid, rate limit, interval, outage ----------------------------


@pytest.fixture
def jwks_server(rsa_key: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(jwks(rsa_key)).start()
    try:
        yield server
    finally:
        server.stop()


def _url_policy(url: str, refresh: int = 300, min_refresh: int = 1) -> RoutePolicy:
    source = f'jwksUrl: "{url}", jwksRefreshSeconds: {refresh}'
    text = _route_text(source).replace("jwksMinRefreshSeconds: 1", f"jwksMinRefreshSeconds: {min_refresh}")
    return load_policy(parse_route_text(text), Path("/nonexistent"))


@pytest.fixture
async def auth() -> AsyncIterator[Authenticator]:
    authenticator = Authenticator()
    try:
        yield authenticator
    finally:
        await authenticator.close()


async def _code_of(auth: Authenticator, policy: RoutePolicy, token: str) -> str:
    try:
        await auth.identify(policy, {"Authorization": f"Bearer {token}"})
    except ProxyError as error:
        return error.code
    return "ok"


async def test_unknown_kid_refreshes_at_most_once_per_min_refresh(
    auth: Authenticator, jwks_server: JwksServer, rsa_key: SigningKey
) -> None:
    policy = _url_policy(jwks_server.url, min_refresh=60)
    assert await _code_of(auth, policy, rsa_key.token()) == "ok"  # the first request loads the keys
    assert jwks_server.requests == 1
    rotated = SigningKey("rsa-2", "RS256")
    for _ in range(5):  # unknown kids: the first one is allowed no early refresh (loaded < 60 s ago)
        assert await _code_of(auth, policy, rotated.token()) == "unknown_key_id"
    assert jwks_server.requests == 1


async def test_rotation_new_kid_accepted_and_removed_kid_rejected_without_restart(
    auth: Authenticator, jwks_server: JwksServer, rsa_key: SigningKey
) -> None:
    policy = _url_policy(jwks_server.url, min_refresh=1)
    old_token = rsa_key.token()
    assert await _code_of(auth, policy, old_token) == "ok"
    rotated = SigningKey("rsa-2", "RS256")
    jwks_server.publish(jwks(rotated))
    deadline = time.monotonic() + 10
    while (code := await _code_of(auth, policy, rotated.token())) != "ok" and time.monotonic() < deadline:
        assert code == "unknown_key_id"
        await auth_pause()
    assert code == "ok"  # the unknown kid triggered a refresh once the rate limit allowed it
    assert await _code_of(auth, policy, old_token) == "unknown_key_id"
    fetches = jwks_server.requests
    assert await _code_of(auth, policy, old_token) == "unknown_key_id"
    assert jwks_server.requests == fetches  # the rate limit holds: no fetch per bad token


async def test_the_refresh_loop_picks_up_a_new_key_set_on_its_interval(
    auth: Authenticator, jwks_server: JwksServer, rsa_key: SigningKey
) -> None:
    policy = _url_policy(jwks_server.url, refresh=1, min_refresh=3600)
    await auth.start(lambda: policy)
    deadline = time.monotonic() + 10
    while jwks_server.requests == 0 and time.monotonic() < deadline:  # loaded at start, no request yet
        await auth_pause()
    assert jwks_server.requests >= 1
    assert await _code_of(auth, policy, rsa_key.token()) == "ok"
    jwks_server.publish(jwks(SigningKey("rsa-3", "RS256")))
    while (code := await _code_of(auth, policy, rsa_key.token())) == "ok" and time.monotonic() < deadline:
        await auth_pause()
    assert code == "unknown_key_id"


async def test_an_unreachable_jwks_is_a_503_until_it_loads_then_outages_keep_the_keys(
    auth: Authenticator, jwks_server: JwksServer, rsa_key: SigningKey
) -> None:
    policy = _url_policy(jwks_server.url, refresh=1, min_refresh=1)
    jwks_server.status = 500
    with pytest.raises(ProxyError) as caught:
        await auth.identify(policy, {"Authorization": f"Bearer {rsa_key.token()}"})
    assert (caught.value.status, caught.value.code) == (503, "jwks_unavailable")
    jwks_server.status = 200
    deadline = time.monotonic() + 10
    while (code := await _code_of(auth, policy, rsa_key.token())) != "ok" and time.monotonic() < deadline:
        await auth_pause()
    assert code == "ok"
    jwks_server.status = 500  # an outage after a load: the cached keys keep working
    cache = auth.cache(policy.route.spec.identity.jwt)  # type: ignore[arg-type]
    assert cache is not None and not await cache.refresh("test")
    assert await _code_of(auth, policy, rsa_key.token()) == "ok"


async def auth_pause() -> None:
    """Yield to the event loop briefly between polls (polling with a deadline, not a fixed wait)."""
    await asyncio.sleep(0.05)


# -- the keys CLI -------------------------------------------------------------------------------


def test_keys_hash_prints_the_sha256_of_each_key() -> None:
    assert keys_run(["hash", "demo-free-key", "k2"]).splitlines() == [
        sha256_hex("demo-free-key"),
        sha256_hex("k2"),
    ]


def test_keys_secret_yaml_is_a_secret_the_sidecar_reads(tmp_path: Path) -> None:
    manifest = yaml.safe_load(
        keys_run(["secret", "--name", "llm-keys", "--tier", "pro", "--yaml", "k1", "k2"])
    )
    assert manifest["kind"] == "Secret" and manifest["metadata"] == {"name": "llm-keys"}
    assert "k1" not in json.dumps(manifest)
    route = parse_route_text(
        "apiVersion: llmroute.dev/v1alpha1\nkind: LLMRoute\nmetadata: {name: r}\nspec:\n"
        "  selector: {matchLabels: {app: x}}\n  upstream: {url: 'http://a'}\n"
        "  identity: {keysSecretRef: {name: llm-keys}}\n  tiers: {pro: {requestsPerMinute: 5}}\n"
        "  limits: [{name: k, key: apiKey}]\n"
    )
    policy = load_policy(route, tmp_path, file_secrets={"llm-keys": manifest["stringData"]})
    assert identify(policy, {"Authorization": "Bearer k2"}).tier == "pro"


def test_keys_secret_kubectl_command_and_errors() -> None:
    command = keys_run(["secret", "--name", "llm-keys", "-n", "team-a", "--tier", "free", "k1"])
    assert command == (
        f"kubectl create secret generic llm-keys -n team-a --from-literal={sha256_hex('k1')}=free"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmroute_sidecar.cli",
            "keys",
            "secret",
            "--name",
            "x",
            "--tier",
            "Gold",
            "k",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--tier 'Gold' must be a tier name" in done.stderr
    assert "Traceback" not in done.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "llmroute_sidecar.cli", "keys", "hash"],
        input="k1\n\nk2\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 0 and piped.stdout.split() == [sha256_hex("k1"), sha256_hex("k2")]
