"""Self-managed webhook TLS, the pure part: a self-signed CA, serving certificates, and the decision
what (if anything) to renew in the Secret that holds them.

The Secret (type ``kubernetes.io/tls``) carries ``tls.crt`` (serving certificate), ``tls.key``,
``ca.crt`` (the CA *bundle* clients trust: the signing CA first, then older CAs until they expire) and
``ca.key`` (so any operator replica can renew). No I/O here: ``webhook_tls`` reads and writes.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_CRT, TLS_KEY, CA_CRT, CA_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"
SECRET_TYPE = "kubernetes.io/tls"

DAY = datetime.timedelta(days=1)
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are valid from this long before their issuance (nodes' clocks differ)."""

Name = x509.DNSName | x509.IPAddress


class Action(enum.Enum):
    """What the Secret needs."""

    NONE = "none"
    PRUNE = "prune"
    """Drop expired or foreign certificates from the CA bundle."""
    ISSUE = "issue"
    """A new serving certificate from the current CA."""
    NEW_CA = "new-ca"
    """A new CA (the old one, while valid, stays in the bundle) and a serving certificate from it."""


@dataclass(frozen=True)
class Plan:
    action: Action
    reason: str


@dataclass(frozen=True)
class Policy:
    """Lifetimes: the CA's, the serving certificate's, and how long before expiry either is renewed."""

    ca_validity: datetime.timedelta = 5 * 365 * DAY
    cert_validity: datetime.timedelta = 365 * DAY
    renew_before: datetime.timedelta = 30 * DAY

    def __post_init__(self) -> None:
        if self.renew_before <= datetime.timedelta(0):
            raise ValueError("the renewal window must be positive")
        if self.renew_before >= min(self.cert_validity, self.ca_validity):
            raise ValueError(
                f"the renewal window ({self.renew_before}) must be shorter than the certificate's "
                f"({self.cert_validity}) and the CA's ({self.ca_validity}) validity"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Policy:
        """``LLMROUTE_WEBHOOK_{CA_,CERT_}VALIDITY_SECONDS``, ``…_CERT_RENEW_BEFORE_SECONDS``."""
        default = cls()

        def seconds(key: str, fallback: datetime.timedelta) -> datetime.timedelta:
            raw = env.get(key)
            if not raw:
                return fallback
            try:
                return datetime.timedelta(seconds=float(raw))
            except ValueError:
                raise ValueError(f"{key}: not a number of seconds: {raw!r}") from None

        return cls(
            ca_validity=seconds("LLMROUTE_WEBHOOK_CA_VALIDITY_SECONDS", default.ca_validity),
            cert_validity=seconds("LLMROUTE_WEBHOOK_CERT_VALIDITY_SECONDS", default.cert_validity),
            renew_before=seconds("LLMROUTE_WEBHOOK_CERT_RENEW_BEFORE_SECONDS", default.renew_before),
        )


def service_names(service: str, namespace: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names the API server may use for a Service, plus ``extra`` (deduplicated, in order)."""
    names = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]
    names += [f"{service}.{namespace}.svc.cluster.local", *extra]
    return tuple(dict.fromkeys(name for name in names if name))


# -- PEM ------------------------------------------------------------------------------------------


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def load_certs(pem: bytes | None) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; empty when missing or unreadable."""
    if not pem:
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def load_key(pem: bytes | None) -> ec.EllipticCurvePrivateKey | None:
    """An EC private key from PEM; None when missing, unreadable or of another type."""
    if not pem:
        return None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def decode_data(data: Mapping[str, str] | None) -> dict[str, bytes]:
    """A Secret's ``data`` (base64) as bytes; undecodable entries are left out."""
    decoded = {}
    for key, value in (data or {}).items():
        try:
            decoded[key] = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError):
            continue
    return decoded


def encode_data(data: Mapping[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}


# -- issuing --------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_bytes(key: object) -> bytes | None:
    """An EC key's public half (DER), for comparing keys; None for anything else."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_ca(now: datetime.datetime, validity: datetime.timedelta) -> tuple[x509.Certificate, bytes]:
    """A self-signed ECDSA P-256 CA (certificate, key PEM), unique name ``llmroute-webhook-ca@<time>``."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"llmroute-webhook-ca@{now.timestamp():.6f}")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key_pem(key)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures (TLS with ECDSA keys); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _san(name: str) -> Name:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(
    ca: x509.Certificate,
    ca_key_pem: bytes,
    names: Sequence[str],
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> tuple[x509.Certificate, bytes]:
    """A serving certificate for ``names`` (DNS names or IPs) signed by ``ca``; never outlives the CA."""
    if not names:
        raise ValueError("a serving certificate needs at least one name")
    ca_key = load_key(ca_key_pem)
    if ca_key is None:
        raise ValueError("the CA key is unreadable")
    key = _new_key()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - CLOCK_SKEW, ca.not_valid_before_utc))
        .not_valid_after(min(now + validity, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(name) for name in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key_pem(key)


# -- deciding -------------------------------------------------------------------------------------


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``cert`` (and the names chain)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def names_of(cert: x509.Certificate) -> set[str]:
    """The certificate's DNS and IP subject alternative names, as strings."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(name) for name in sans.get_values_for_type(x509.DNSName)} | {
        str(address) for address in sans.get_values_for_type(x509.IPAddress)
    }


def signing_ca(data: Mapping[str, bytes]) -> x509.Certificate | None:
    """The bundle's CA certificate that belongs to ``ca.key``, if any."""
    key = _public_bytes(load_key(data.get(CA_KEY)))
    if key is None:
        return None
    for cert in load_certs(data.get(CA_CRT)):
        if is_ca(cert) and _public_bytes(cert.public_key()) == key:
            return cert
    return None


def _when(moment: datetime.datetime) -> str:
    return moment.replace(microsecond=0).isoformat()


def plan(data: Mapping[str, bytes], now: datetime.datetime, names: Sequence[str], policy: Policy) -> Plan:
    """What the Secret's data needs so that the webhook serves a valid certificate for ``names``."""
    ca = signing_ca(data)
    if ca is None:
        return Plan(Action.NEW_CA, "no usable CA (ca.crt/ca.key missing, unreadable or not a pair)")
    if ca.not_valid_after_utc - policy.renew_before <= now:
        return Plan(Action.NEW_CA, f"the CA expires at {_when(ca.not_valid_after_utc)}")
    if ca.not_valid_before_utc > now:
        return Plan(Action.NEW_CA, f"the CA is not valid before {_when(ca.not_valid_before_utc)}")
    leaf = next(iter(load_certs(data.get(TLS_CRT))), None)
    key = _public_bytes(load_key(data.get(TLS_KEY)))
    if leaf is None or key is None:
        return Plan(Action.ISSUE, "no readable serving certificate and key (tls.crt/tls.key)")
    if _public_bytes(leaf.public_key()) != key:
        return Plan(Action.ISSUE, "tls.key does not belong to tls.crt")
    if not signed_by(leaf, ca):
        return Plan(Action.ISSUE, "the serving certificate was not issued by the current CA")
    if names_of(leaf) != set(names):
        return Plan(Action.ISSUE, f"the serving certificate's names {sorted(names_of(leaf))} differ")
    if leaf.not_valid_after_utc - policy.renew_before <= now:
        return Plan(Action.ISSUE, f"the serving certificate expires at {_when(leaf.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > now:
        since = _when(leaf.not_valid_before_utc)
        return Plan(Action.ISSUE, f"the serving certificate is not valid before {since}")
    if _trusted(data, now) != load_certs(data.get(CA_CRT)):
        return Plan(Action.PRUNE, "the CA bundle holds expired or non-CA certificates")
    return Plan(Action.NONE, "up to date")


def _trusted(data: Mapping[str, bytes], now: datetime.datetime) -> list[x509.Certificate]:
    """The bundle's CA certificates that are still valid."""
    return [cert for cert in load_certs(data.get(CA_CRT)) if is_ca(cert) and cert.not_valid_after_utc > now]


def renew(
    data: Mapping[str, bytes],
    decision: Plan,
    now: datetime.datetime,
    names: Sequence[str],
    policy: Policy,
) -> dict[str, bytes]:
    """The Secret data after carrying out ``decision``. A new CA goes first in ``ca.crt``; older CAs
    stay in it until they expire, so clients that still hold the old bundle keep verifying."""
    if decision.action is Action.NONE:
        return dict(data)
    old = _trusted(data, now)
    if decision.action is Action.NEW_CA:
        ca, ca_key = new_ca(now, policy.ca_validity)
    else:
        found = signing_ca(data)
        if found is None:
            raise ValueError("no usable CA to renew with; plan a new one")
        ca, ca_key = found, data[CA_KEY]
    bundle = [ca, *(cert for cert in old if cert != ca)]
    if decision.action is Action.PRUNE:
        leaf_pem, leaf_key = data[TLS_CRT], data[TLS_KEY]
    else:
        leaf, leaf_key = issue(ca, ca_key, names, now, policy.cert_validity)
        leaf_pem = cert_pem(leaf)
    return {TLS_CRT: leaf_pem, TLS_KEY: leaf_key, CA_CRT: cert_pem(*bundle), CA_KEY: ca_key}
