"""Self-managed webhook TLS, the pure part (``llmroute_operator.certs``): the CA, serving certificates
verified the way a client verifies them, and every decision ``plan`` makes about the Secret's data."""

from __future__ import annotations

import base64
import datetime
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from llmroute_operator import certs
from llmroute_operator.certs import CA_CRT, CA_KEY, TLS_CRT, TLS_KEY, Action

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
NAMES = certs.service_names("llmroute-webhook", "llmroute-system")
POLICY = certs.Policy()
DAY = datetime.timedelta(days=1)


def fresh(now: datetime.datetime = NOW, policy: certs.Policy = POLICY) -> dict[str, bytes]:
    """Secret data as the operator creates it."""
    return certs.renew({}, certs.Plan(Action.NEW_CA, "test"), now, NAMES, policy)


def leaf(data: dict[str, bytes]) -> x509.Certificate:
    return certs.load_certs(data[TLS_CRT])[0]


def bundle(data: dict[str, bytes]) -> list[x509.Certificate]:
    return certs.load_certs(data[CA_CRT])


def handshake(tmp_path: Path, data: dict[str, bytes], hostname: str) -> dict[str, object]:
    """A real TLS handshake in memory: the server loads key and certificate from one file (as the
    operator's server does), the client trusts only ``ca.crt``; returns the verified peer cert."""
    combined = tmp_path / "tls-server.pem"
    combined.write_bytes(data[TLS_KEY] + data[TLS_CRT])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(combined, combined)
    client_context = ssl.create_default_context(cadata=data[CA_CRT].decode())
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(to_server, from_server, server_side=True)
    client = client_context.wrap_bio(to_client, from_client, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if all(done.values()):
            peer = client.getpeercert()
            assert peer is not None
            return peer
    raise AssertionError("the handshake did not finish")


# -- issuing --------------------------------------------------------------------------------------


def test_service_names_cover_every_form_the_api_server_may_use() -> None:
    assert certs.service_names("svc", "ns", ["svc.example", "10.0.0.1", "svc"]) == (
        "svc",
        "svc.ns",
        "svc.ns.svc",
        "svc.ns.svc.cluster.local",
        "svc.example",
        "10.0.0.1",
    )


def test_the_ca_is_a_self_signed_certificate_signing_ca() -> None:
    (ca,) = bundle(fresh())
    assert certs.is_ca(ca) and certs.signed_by(ca, ca)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc == NOW + POLICY.ca_validity
    assert certs.signing_ca(fresh()) is not None


def test_the_serving_certificate_is_signed_by_the_ca_for_the_service_names() -> None:
    data = fresh()
    cert = leaf(data)
    (ca,) = bundle(data)
    assert certs.signed_by(cert, ca)
    assert not certs.is_ca(cert)
    assert certs.names_of(cert) == set(NAMES)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert cert.not_valid_after_utc == NOW + POLICY.cert_validity
    assert cert.not_valid_before_utc < NOW  # tolerates clock skew between nodes


def test_a_client_trusting_only_ca_crt_verifies_the_served_certificate(tmp_path: Path) -> None:
    data = fresh(datetime.datetime.now(datetime.UTC))
    for name in (
        "llmroute-webhook.llmroute-system.svc",
        "llmroute-webhook.llmroute-system.svc.cluster.local",
    ):
        peer = handshake(tmp_path, data, name)
        assert ("DNS", name) in peer["subjectAltName"]  # type: ignore[operator]
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, data, "elsewhere.example")
    other = fresh(datetime.datetime.now(datetime.UTC))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, {**data, CA_CRT: other[CA_CRT]}, "llmroute-webhook.llmroute-system.svc")


def test_extra_names_may_be_ip_addresses() -> None:
    names = certs.service_names("svc", "ns", ["127.0.0.1"])
    data = certs.renew({}, certs.Plan(Action.NEW_CA, "test"), NOW, names, POLICY)
    assert "127.0.0.1" in certs.names_of(leaf(data))
    assert certs.plan(data, NOW, names, POLICY).action is Action.NONE


def test_a_serving_certificate_never_outlives_its_ca() -> None:
    data = fresh()
    (ca,) = bundle(data)
    cert, _ = certs.issue(ca, data[CA_KEY], NAMES, ca.not_valid_after_utc - 2 * DAY, 365 * DAY)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc
    with pytest.raises(ValueError, match="unreadable"):
        certs.issue(ca, b"garbage", NAMES, NOW, DAY)


def test_secret_data_round_trips_and_undecodable_entries_are_dropped() -> None:
    data = fresh()
    assert certs.decode_data(certs.encode_data(data)) == data
    assert certs.decode_data({"tls.crt": "!!not base64!!", "ca.crt": base64.b64encode(b"x").decode()}) == {
        "ca.crt": b"x"
    }
    assert certs.decode_data(None) == {}


# -- plan -----------------------------------------------------------------------------------------


def test_fresh_data_needs_nothing() -> None:
    data = fresh()
    assert certs.plan(data, NOW, NAMES, POLICY) == certs.Plan(Action.NONE, "up to date")
    assert certs.renew(data, certs.plan(data, NOW, NAMES, POLICY), NOW, NAMES, POLICY) == data


CORRUPT_PEM = b"-----BEGIN CERTIFICATE-----\ncorrupt\n-----END CERTIFICATE-----\n"
CA_DAMAGE: dict[str, Callable[[dict[str, bytes]], None]] = {
    "empty": lambda data: data.clear(),
    "no ca.key": lambda data: data.pop(CA_KEY) and None,
    "no ca.crt": lambda data: data.pop(CA_CRT) and None,
    "corrupt ca.key": lambda data: data.update({CA_KEY: CORRUPT_PEM.replace(b"CERTIFICATE", b"PRIVATE KEY")}),
    "corrupt ca.crt": lambda data: data.update({CA_CRT: CORRUPT_PEM}),
    "another CA's key": lambda data: data.update({CA_KEY: fresh()[CA_KEY]}),
    "ca.crt is no CA": lambda data: data.update({CA_CRT: data[TLS_CRT]}),
}


@pytest.mark.parametrize("damage", list(CA_DAMAGE))
def test_missing_or_corrupt_ca_means_a_new_ca(damage: str) -> None:
    data = fresh()
    CA_DAMAGE[damage](data)
    decision = certs.plan(data, NOW, NAMES, POLICY)
    assert decision.action is Action.NEW_CA, decision
    renewed = certs.renew(data, decision, NOW, NAMES, POLICY)
    assert certs.plan(renewed, NOW, NAMES, POLICY).action is Action.NONE
    assert certs.signed_by(leaf(renewed), bundle(renewed)[0])


def _issue_for(
    data: dict[str, bytes], names: tuple[str, ...], now: datetime.datetime = NOW
) -> dict[str, bytes]:
    ca = certs.signing_ca(data)
    assert ca is not None
    cert, key = certs.issue(ca, data[CA_KEY], names, now, POLICY.cert_validity)
    return {TLS_CRT: certs.cert_pem(cert), TLS_KEY: key}


SERVING_DAMAGE: dict[str, tuple[Callable[[dict[str, bytes]], None], str]] = {
    "no tls.crt": (lambda data: data.pop(TLS_CRT) and None, "no readable serving certificate"),
    "corrupt tls.key": (lambda data: data.update({TLS_KEY: b"garbage"}), "no readable serving certificate"),
    "key of another certificate": (
        lambda data: data.update({TLS_CRT: _issue_for(data, NAMES)[TLS_CRT]}),
        "does not belong",
    ),
    "issued by another CA": (
        lambda data: data.update({k: v for k, v in fresh().items() if k in (TLS_CRT, TLS_KEY)}),
        "not issued by the current CA",
    ),
    "other names": (lambda data: data.update(_issue_for(data, ("old-service", "old-service.ns"))), "names"),
    "not yet valid": (lambda data: data.update(_issue_for(data, NAMES, NOW + 2 * DAY)), "not valid before"),
}


@pytest.mark.parametrize("damage", list(SERVING_DAMAGE))
def test_a_bad_serving_certificate_is_reissued_by_the_same_ca(damage: str) -> None:
    data = fresh()
    change, reason = SERVING_DAMAGE[damage]
    change(data)
    decision = certs.plan(data, NOW, NAMES, POLICY)
    assert decision.action is Action.ISSUE and reason in decision.reason, decision
    renewed = certs.renew(data, decision, NOW, NAMES, POLICY)
    assert (renewed[CA_CRT], renewed[CA_KEY]) == (data[CA_CRT], data[CA_KEY])  # same CA: no rotation
    assert certs.plan(renewed, NOW, NAMES, POLICY).action is Action.NONE


def test_the_serving_certificate_is_renewed_within_the_window_only() -> None:
    data = fresh()
    expiry = leaf(data).not_valid_after_utc
    assert certs.plan(data, expiry - POLICY.renew_before - DAY, NAMES, POLICY).action is Action.NONE
    later = expiry - POLICY.renew_before + datetime.timedelta(seconds=1)
    decision = certs.plan(data, later, NAMES, POLICY)
    assert decision.action is Action.ISSUE and "expires" in decision.reason
    renewed = certs.renew(data, decision, later, NAMES, POLICY)
    assert leaf(renewed).not_valid_after_utc == later.replace(microsecond=0) + POLICY.cert_validity
    assert renewed[CA_KEY] == data[CA_KEY]
    assert certs.plan(renewed, later, NAMES, POLICY).action is Action.NONE


def test_ca_rotation_keeps_the_old_ca_trusted_until_it_expires() -> None:
    data = fresh()
    (old_ca,) = bundle(data)
    rotation = old_ca.not_valid_after_utc - POLICY.renew_before + datetime.timedelta(seconds=1)
    decision = certs.plan(data, rotation, NAMES, POLICY)
    assert decision.action is Action.NEW_CA and "CA expires" in decision.reason
    rotated = certs.renew(data, decision, rotation, NAMES, POLICY)
    new_ca, kept = bundle(rotated)
    assert kept == old_ca and new_ca != old_ca  # the bundle holds both; the signing CA first
    assert certs.signing_ca(rotated) == new_ca and rotated[CA_KEY] != data[CA_KEY]
    assert certs.signed_by(leaf(rotated), new_ca)
    assert certs.plan(rotated, rotation, NAMES, POLICY).action is Action.NONE

    # Clients given the new bundle still trust replicas serving a certificate from the old CA.
    assert certs.signed_by(leaf(data), kept)

    # Until the old CA expires nothing changes; then it leaves the bundle.
    just_before = old_ca.not_valid_after_utc - datetime.timedelta(seconds=1)
    assert certs.plan(rotated, just_before, NAMES, POLICY).action is Action.NONE
    after = old_ca.not_valid_after_utc + datetime.timedelta(seconds=1)
    decision = certs.plan(rotated, after, NAMES, POLICY)
    assert decision.action is Action.PRUNE
    pruned = certs.renew(rotated, decision, after, NAMES, POLICY)
    assert bundle(pruned) == [new_ca]
    assert (pruned[TLS_CRT], pruned[TLS_KEY], pruned[CA_KEY]) == (
        rotated[TLS_CRT],
        rotated[TLS_KEY],
        rotated[CA_KEY],
    )
    assert certs.plan(pruned, after, NAMES, POLICY).action is Action.NONE


def test_non_ca_certificates_are_pruned_from_the_bundle() -> None:
    data = fresh()
    data[CA_CRT] += data[TLS_CRT]
    decision = certs.plan(data, NOW, NAMES, POLICY)
    assert decision.action is Action.PRUNE
    assert len(bundle(certs.renew(data, decision, NOW, NAMES, POLICY))) == 1


def test_policy_from_env_and_its_limits() -> None:
    assert certs.Policy.from_env({}) == certs.Policy()
    policy = certs.Policy.from_env(
        {
            "LLMROUTE_WEBHOOK_CERT_VALIDITY_SECONDS": "10",
            "LLMROUTE_WEBHOOK_CERT_RENEW_BEFORE_SECONDS": "4",
            "LLMROUTE_WEBHOOK_CA_VALIDITY_SECONDS": "3600",
        }
    )
    assert (policy.cert_validity, policy.renew_before, policy.ca_validity) == (
        datetime.timedelta(seconds=10),
        datetime.timedelta(seconds=4),
        datetime.timedelta(hours=1),
    )
    with pytest.raises(ValueError, match="renewal window"):
        certs.Policy.from_env({"LLMROUTE_WEBHOOK_CERT_VALIDITY_SECONDS": "60"})  # 30 days before expiry
    with pytest.raises(ValueError, match="not a number"):
        certs.Policy.from_env({"LLMROUTE_WEBHOOK_CERT_RENEW_BEFORE_SECONDS": "soon"})
