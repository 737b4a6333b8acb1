"""Self-managed webhook TLS with real operator processes against the emulator (no cert-manager).

The operator creates the CA and serving certificate in a Secret, publishes the CA in both webhook
configurations, and serves HTTPS that a client trusting only ``ca.crt`` verifies for the Service's
DNS name; replicas share one CA; the certificate is rotated and served; a caBundle reset (as a
``helm upgrade`` without ``lookup`` does) is repaired. The conflict paths (two replicas renewing at
once) are driven deterministically in-process against the same emulator.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography import x509

from llmroute_operator import certs, kube, webhook_tls
from tests.support.admission import admission_review
from tests.support.kube_emulator import EmulatorThread, write_kubeconfig
from tests.support.sidecar_procs import free_port, operator_command, stop_process, wait_for
from tests.test_operator_ha import PEERING, PEERING_PATH, peers
from tests.test_operator_kopf import NAMESPACE, Cluster, matching_labels, pod

OPERATOR_NAMESPACE = "llmroute-system"
SECRET = "llmroute-webhook-tls"
SERVICE = "llmroute-webhook"
CONFIGURATION = "llmroute"
HOSTNAME = f"{SERVICE}.{OPERATOR_NAMESPACE}.svc"
SECRET_PATH = f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
KINDS = {"mutatingwebhookconfigurations": "Mutating", "validatingwebhookconfigurations": "Validating"}


class Operator:
    """One ``llmroute-operator`` process with self-managed TLS; its HTTPS port, cert dir and log."""

    def __init__(self, name: str, tmp: Path, env: dict[str, str], peering: str | None = None) -> None:
        self.port = free_port()
        self.cert_dir = tmp / f"{name}-certs"
        self.log = tmp / f"{name}.log"
        tls = ["--webhook-tls-secret", SECRET, "--webhook-service", SERVICE]
        tls += ["--webhook-configuration", CONFIGURATION, "--webhook-cert-dir", str(self.cert_dir)]
        command = operator_command(NAMESPACE, self.port, None, peering, *tls, insecure=False)
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)

    def served_certificate(self, ca: bytes) -> x509.Certificate | None:
        """The certificate the webhook server presents, verified against ``ca`` for HOSTNAME."""
        context = ssl.create_default_context(cadata=ca.decode())
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                with context.wrap_socket(sock, server_hostname=HOSTNAME) as tls:
                    der = tls.getpeercert(binary_form=True)
        except OSError:  # not listening (yet, or restarting with a new certificate)
            return None
        return x509.load_der_x509_certificate(der) if der else None

    def review(self, ca: bytes, body: dict[str, Any]) -> dict[str, Any]:
        """An AdmissionReview to ``/inject`` over HTTPS, trusting only ``ca``, for HOSTNAME."""
        review = admission_review(body, NAMESPACE)
        connection = _VerifiedConnection(self.port, ssl.create_default_context(cadata=ca.decode()))
        try:
            connection.request(
                "POST", "/inject", json.dumps(review), headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            assert response.status == 200, response.read()
            answer = json.loads(response.read())
        finally:
            connection.close()
        assert answer["response"]["uid"] == review["request"]["uid"]
        return dict(answer["response"])

    def stop(self) -> None:
        stop_process(self.process)


class _VerifiedConnection(http.client.HTTPSConnection):
    """HTTPS to the loopback port, verifying the certificate for the Service's DNS name."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=5, context=context)
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=HOSTNAME)


class TLSCluster(Cluster):
    """The emulator with the chart's two webhook configurations, and the operators a test starts."""

    def __init__(self, emulator: EmulatorThread, tmp: Path) -> None:
        kubeconfig = write_kubeconfig(tmp / "kubeconfig", emulator.url, NAMESPACE)
        super().__init__(emulator, kubeconfig, "", tmp / "operator.log")
        self.tmp = tmp
        self.operators: list[Operator] = []
        for namespace in (NAMESPACE, OPERATOR_NAMESPACE):
            body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
            self.api("POST", "/api/v1/namespaces", body)

    def create_webhook_configurations(self) -> None:
        for plural, kind in KINDS.items():
            hook = {
                "name": f"{kind.lower()}.llmroute.dev",
                "clientConfig": {"service": {"name": SERVICE, "namespace": OPERATOR_NAMESPACE, "path": "/x"}},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }
            body = {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": f"{kind}WebhookConfiguration",
                "metadata": {"name": CONFIGURATION},
                "webhooks": [hook, {**hook, "name": f"second.{kind.lower()}.llmroute.dev"}],
            }
            self.api("POST", f"{ADMISSION}/{plural}", body)

    def start(self, name: str, peering: str | None = None, **env: str) -> Operator:
        base = {"KUBECONFIG": str(self.kubeconfig), "LLMROUTE_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE}
        operator = Operator(name, self.tmp, {**os.environ, **base, **env}, peering)
        self.operators.append(operator)
        return operator

    def secret(self) -> dict[str, Any] | None:
        found = self.api("GET", f"{SECRET_PATH}/{SECRET}")
        return dict(found) if found else None

    def data(self) -> dict[str, bytes]:
        return certs.decode_data((self.secret() or {}).get("data"))

    def ca_bundles(self) -> list[str | None]:
        """Every webhook's caBundle in both configurations."""
        found = []
        for plural in KINDS:
            configuration = self.api("GET", f"{ADMISSION}/{plural}/{CONFIGURATION}") or {}
            found += [(hook.get("clientConfig") or {}).get("caBundle") for hook in configuration["webhooks"]]
        return found

    def serving(self, operator: Operator) -> tuple[bytes, x509.Certificate]:
        """Once the Secret exists and ``operator`` serves HTTPS: the CA bundle and the served certificate."""

        def ready() -> Any:
            assert operator.process.poll() is None, operator.log.read_text()
            ca = self.data().get(certs.CA_CRT)
            served = operator.served_certificate(ca) if ca else None
            return served is not None and (ca, served)

        ca, served = wait_for(ready, timeout=30, what=f"HTTPS from {operator.log.name}")
        return ca, served


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[TLSCluster]:
    emulator = EmulatorThread().start()
    cluster: TLSCluster | None = None
    try:
        cluster = TLSCluster(emulator, tmp_path)
        yield cluster
    finally:
        for operator in cluster.operators if cluster is not None else []:
            operator.stop()
        emulator.stop()


def _encoded(ca: bytes) -> str:
    return base64.b64encode(ca).decode()


# -- real operator processes ----------------------------------------------------------------------


def test_the_operator_creates_the_ca_publishes_it_and_serves_verified_https(cluster: TLSCluster) -> None:
    cluster.create_webhook_configurations()
    operator = cluster.start("first")
    ca, served = cluster.serving(operator)

    secret = cluster.secret()
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt", "ca.key"}
    assert served == certs.load_certs(cluster.data()[certs.TLS_CRT])[0]
    assert certs.names_of(served) == set(certs.service_names(SERVICE, OPERATOR_NAMESPACE))
    wait_for(
        lambda: cluster.ca_bundles() == [_encoded(ca)] * 4, timeout=10, what="caBundle in all 4 webhooks"
    )

    answer = operator.review(ca, pod("tls-app", matching_labels()))
    assert answer["allowed"] is True
    assert (operator.cert_dir / "tls.crt").read_bytes() == cluster.data()[certs.TLS_CRT]
    assert oct((operator.cert_dir / "tls.key").stat().st_mode & 0o777) == "0o600"


def test_a_second_replica_reuses_the_ca_without_rewriting_the_secret(cluster: TLSCluster) -> None:
    cluster.create_webhook_configurations()
    first = cluster.start("first")
    ca, served = cluster.serving(first)
    version = (cluster.secret() or {})["metadata"]["resourceVersion"]

    second = cluster.start("second")
    second_ca, second_served = cluster.serving(second)
    assert (second_ca, second_served) == (ca, served)
    assert (cluster.secret() or {})["metadata"]["resourceVersion"] == version
    assert second.review(ca, pod("tls-app", matching_labels()))["allowed"] is True


def test_replicas_starting_together_agree_on_one_ca(cluster: TLSCluster) -> None:
    cluster.create_webhook_configurations()
    replicas = [cluster.start(f"replica-{index}") for index in range(2)]
    served = [cluster.serving(replica) for replica in replicas]
    ca = cluster.data()[certs.CA_CRT]
    assert len(certs.load_certs(ca)) == 1
    assert all(found_ca == ca for found_ca, _ in served)
    assert served[0][1] == served[1][1]  # one serving certificate, whoever created it
    wait_for(lambda: cluster.ca_bundles() == [_encoded(ca)] * 4, timeout=10, what="one CA published")


def test_the_certificate_is_rotated_and_the_new_one_served(cluster: TLSCluster) -> None:
    cluster.create_webhook_configurations()
    operator = cluster.start(
        "rotating",
        LLMROUTE_WEBHOOK_CERT_VALIDITY_SECONDS="8",
        LLMROUTE_WEBHOOK_CERT_RENEW_BEFORE_SECONDS="5",
        LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS="0.3",
    )
    ca, first = cluster.serving(operator)

    def rotated() -> Any:
        served = operator.served_certificate(ca)
        return served is not None and served.serial_number != first.serial_number and served

    second = wait_for(rotated, timeout=30, what="a new serving certificate served")
    assert second.not_valid_after_utc > first.not_valid_after_utc
    assert cluster.data()[certs.CA_CRT] == ca  # the same CA: clients notice nothing
    assert operator.review(ca, pod("tls-app", matching_labels()))["allowed"] is True


def test_the_standby_replica_keeps_its_certificate_current_too(cluster: TLSCluster) -> None:
    """kopf pauses a standby peer's handlers, yet the webhook Service sends it reviews: its TLS upkeep
    must go on. Here only the standby's own loop can change the certificate it serves."""
    cluster.create_webhook_configurations()
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    cluster.api("POST", PEERING_PATH, {**peering, "status": {}})
    short = {
        "LLMROUTE_WEBHOOK_CERT_VALIDITY_SECONDS": "8",
        "LLMROUTE_WEBHOOK_CERT_RENEW_BEFORE_SECONDS": "5",
        "LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS": "0.3",
    }
    active = cluster.start("active", PEERING, **short)
    cluster.serving(active)
    wait_for(lambda: len(peers(cluster)) == 1, timeout=20, what="the active replica in the peering object")
    standby = cluster.start("standby", PEERING, **short)
    ca, first = cluster.serving(standby)
    wait_for(lambda: len(peers(cluster)) == 2, timeout=20, what="both replicas in the peering object")

    def rotated() -> Any:
        served = standby.served_certificate(ca)
        return served is not None and served.serial_number != first.serial_number

    wait_for(rotated, timeout=30, what="the standby serving a renewed certificate")


def test_a_reset_ca_bundle_is_repaired(cluster: TLSCluster) -> None:
    cluster.create_webhook_configurations()
    operator = cluster.start("repairing", LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS="0.3")
    ca, _ = cluster.serving(operator)
    wait_for(lambda: cluster.ca_bundles() == [_encoded(ca)] * 4, timeout=10, what="caBundle published")

    # What `helm upgrade` does when the chart renders no caBundle: it is gone (or empty).
    cluster.api(
        "PATCH",
        f"{ADMISSION}/mutatingwebhookconfigurations/{CONFIGURATION}",
        [{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}],
        "application/json-patch+json",
    )
    cluster.api(
        "PATCH",
        f"{ADMISSION}/validatingwebhookconfigurations/{CONFIGURATION}",
        [{"op": "replace", "path": "/webhooks/1/clientConfig/caBundle", "value": ""}],
        "application/json-patch+json",
    )
    assert cluster.ca_bundles() != [_encoded(ca)] * 4
    wait_for(lambda: cluster.ca_bundles() == [_encoded(ca)] * 4, timeout=10, what="caBundle repaired")


def test_missing_webhook_configurations_are_a_warning_not_a_failure(cluster: TLSCluster) -> None:
    operator = cluster.start("local")
    ca, _ = cluster.serving(operator)
    assert operator.review(ca, pod("tls-app", matching_labels()))["allowed"] is True
    wait_for(lambda: "not found: caBundle not published" in operator.log.read_text(), timeout=10)


def test_an_unknown_operator_namespace_stops_the_operator_with_a_clear_message(cluster: TLSCluster) -> None:
    operator = cluster.start("lost", LLMROUTE_OPERATOR_NAMESPACE="", POD_NAMESPACE="")
    operator.process.wait(30)
    assert operator.process.returncode != 0
    assert "the operator namespace is unknown: pass --operator-namespace" in operator.log.read_text()
    assert cluster.secret() is None


def test_without_any_tls_source_the_server_still_starts_with_a_throwaway_certificate(
    cluster: TLSCluster,
) -> None:
    """No --webhook-tls-secret, no --webhook-cert, not --webhook-insecure: HTTPS with a certificate of
    its own (and a warning that nothing trusts it), rather than kopf's missing-dependency crash."""
    port, log = free_port(), cluster.tmp / "bare.log"
    extra = ["--webhook-cert-dir", str(cluster.tmp / "bare-certs")]
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with log.open("wb") as output:
        process = subprocess.Popen(
            operator_command(NAMESPACE, port, None, None, *extra, insecure=False),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:

        def presented() -> Any:
            assert process.poll() is None, log.read_text()
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    with context.wrap_socket(sock, server_hostname="localhost") as tls:
                        return tls.getpeercert(binary_form=True)
            except OSError:
                return None

        served = x509.load_der_x509_certificate(wait_for(presented, timeout=30, what="HTTPS"))
        assert "localhost" in certs.names_of(served)
        assert "throwaway self-signed certificate" in log.read_text()
        assert cluster.secret() is None  # nothing written to the cluster
    finally:
        stop_process(process)


# -- the conflict paths, in-process against the emulator -------------------------------------------


@pytest.fixture
def client(cluster: TLSCluster) -> kube.Kube:
    """``kube.Kube`` talking to the emulator from this process."""
    return kube.Kube(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=cluster.emulator.url)))


def target(tmp: Path, **policy: float) -> webhook_tls.Target:
    return webhook_tls.Target(
        namespace=OPERATOR_NAMESPACE,
        secret=SECRET,
        names=certs.service_names(SERVICE, OPERATOR_NAMESPACE),
        cert_dir=tmp / "certs",
        configuration=CONFIGURATION,
        policy=certs.Policy(**{key: datetime.timedelta(seconds=value) for key, value in policy.items()}),
    )


class _RacingKube(kube.Kube):
    """Another replica writes just before each of this one's writes (once per kind of write)."""

    def __init__(self, client: kube.Kube, competitor: webhook_tls.Target) -> None:
        super().__init__(client._api)
        self.other = client
        self.competitor = competitor
        self.raced: list[str] = []

    def create_secret(self, namespace: str, body: Any) -> dict[str, Any] | None:
        if "create" not in self.raced:
            self.raced.append("create")
            webhook_tls.ensure_secret(self.other, self.competitor, _now())
        return super().create_secret(namespace, body)

    def patch_secret(self, namespace: str, name: str, patch: Any) -> dict[str, Any] | None:
        if "patch" not in self.raced:
            self.raced.append("patch")
            webhook_tls.ensure_secret(self.other, self.competitor, _now())
        return super().patch_secret(namespace, name, patch)

    def patch_webhook_configuration(self, plural: str, name: str, patch: Any) -> None:
        if plural not in self.raced:
            self.raced.append(plural)
            path = f"{kube.ADMISSION_PATH}/{plural}/{name}"
            touch = {"metadata": {"labels": {"touched": "yes"}}}
            self.other.request("PATCH", path, touch, content_type="application/merge-patch+json")
        super().patch_webhook_configuration(plural, name, patch)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_a_replica_losing_the_create_race_uses_the_winners_ca(
    cluster: TLSCluster, client: kube.Kube, tmp_path: Path
) -> None:
    cluster.create_webhook_configurations()
    racing = _RacingKube(client, target(tmp_path / "winner"))
    outcome = webhook_tls.ensure(racing, target(tmp_path))
    assert "create" in racing.raced
    assert outcome.secret == "kept"  # the winner's Secret, as found
    data = cluster.data()
    assert len(certs.load_certs(data[certs.CA_CRT])) == 1
    assert (tmp_path / "certs" / "tls.crt").read_bytes() == data[certs.TLS_CRT]
    # The caBundle patch raced too (a concurrent edit bumped the resourceVersion): re-read, patched.
    assert set(outcome.patched) == set(KINDS) and set(KINDS) <= set(racing.raced)
    assert cluster.ca_bundles() == [_encoded(data[certs.CA_CRT])] * 4


def test_a_replica_losing_the_renewal_race_uses_the_winners_certificate(
    cluster: TLSCluster, client: kube.Kube, tmp_path: Path
) -> None:
    cluster.create_webhook_configurations()
    webhook_tls.ensure_secret(client, target(tmp_path, cert_validity=60, renew_before=1), _now())
    created = cluster.data()
    # Both replicas now find the serving certificate within their renewal window (3500 s).
    short = {"cert_validity": 3600.0, "renew_before": 3500.0}
    competitor = _RacingKube(client, target(tmp_path / "winner", **short))
    outcome = webhook_tls.ensure(competitor, target(tmp_path, **short))
    assert "patch" in competitor.raced
    renewed = cluster.data()
    assert renewed[certs.TLS_CRT] != created[certs.TLS_CRT]  # renewed once, by the winner ...
    assert renewed[certs.CA_KEY] == created[certs.CA_KEY]
    assert outcome.secret == "kept"  # ... whose certificate this replica adopted
    assert (tmp_path / "certs" / "tls.crt").read_bytes() == renewed[certs.TLS_CRT]


def test_ensure_rewrites_nothing_when_all_is_current(
    cluster: TLSCluster, client: kube.Kube, tmp_path: Path
) -> None:
    cluster.create_webhook_configurations()
    first = webhook_tls.ensure(client, target(tmp_path))
    assert first.secret == "created" and first.files_written and set(first.patched) == set(KINDS)
    again = webhook_tls.ensure(client, target(tmp_path))
    assert again == webhook_tls.Outcome("kept", (), False)
