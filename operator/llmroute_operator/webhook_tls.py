"""Self-managed webhook TLS, the I/O part: keep the Secret, the webhook configurations' ``caBundle``
and the webhook server's certificate files in step (decisions in ``certs``).

Runs in every replica (each serves webhooks), not only the active peer: replicas race safely
through the API server — the Secret is created once (409: another replica won, use its CA) and
renewed with optimistic concurrency (409: use the winner's certificate).

Order matters during a CA rotation: the Secret first, then the ``caBundle`` (old and new CA), and only
then the files the server loads, so no client is ever served a certificate it cannot verify yet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmroute_operator import certs, kube

log = logging.getLogger("llmroute.operator.tls")

DEFAULT_CHECK_SECONDS = 300.0
ATTEMPTS = 5
"""Re-reads after a conflict before giving up until the next check."""
SERVER_FILE = "tls-server.pem"
"""Key and certificate in one file, replaced atomically: the server never loads a new certificate with
the old key. ``tls.crt`` and ``tls.key`` are written next to it for people and tools."""


@dataclass(frozen=True)
class Target:
    """Where the Secret lives, what the certificate names, what to keep current."""

    namespace: str
    secret: str
    names: tuple[str, ...]
    cert_dir: Path
    configuration: str | None = None
    policy: certs.Policy = field(default_factory=certs.Policy)

    @property
    def server_file(self) -> Path:
        return self.cert_dir / SERVER_FILE


@dataclass(frozen=True)
class Outcome:
    """What one ``ensure`` did."""

    secret: str
    """"created", "renewed: <reason>" or "kept" (as found, possibly just created or renewed by another
    replica)."""
    patched: tuple[str, ...] = ()
    """The webhook configuration kinds whose caBundle was updated."""
    files_written: bool = False

    def __str__(self) -> str:
        published = f"caBundle published in {', '.join(self.patched)}" if self.patched else "caBundle current"
        files = "new certificate files" if self.files_written else "files current"
        return f"Secret {self.secret}; {published}; {files}"


def check_seconds(env: Mapping[str, str]) -> float:
    """``LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS``: the maintenance period."""
    raw = env.get("LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS")
    value = float(raw) if raw else DEFAULT_CHECK_SECONDS
    if value <= 0:
        raise ValueError(f"LLMROUTE_WEBHOOK_TLS_CHECK_SECONDS must be positive, not {raw}")
    return value


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def secret_body(target: Target, data: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": certs.SECRET_TYPE,
        "metadata": {
            "name": target.secret,
            "namespace": target.namespace,
            "labels": {"app.kubernetes.io/managed-by": "llmroute-operator"},
        },
        "data": certs.encode_data(data),
    }


def ensure(client: kube.Kube, target: Target, now: datetime.datetime | None = None) -> Outcome:
    """One pass: the Secret valid, the caBundle published, the server's files current."""
    data, what = ensure_secret(client, target, now or _utcnow())
    patched = publish_ca_bundle(client, target.configuration, data[certs.CA_CRT])
    written = write_files(target.cert_dir, data)
    return Outcome(what, patched, written)


def ensure_secret(client: kube.Kube, target: Target, now: datetime.datetime) -> tuple[dict[str, bytes], str]:
    """The Secret's data once it needs nothing: created, renewed, or another replica's result."""
    for _ in range(ATTEMPTS):
        secret = client.get_secret(target.namespace, target.secret)
        if secret is None:
            fresh = certs.Plan(certs.Action.NEW_CA, "no Secret")
            data = certs.renew({}, fresh, now, target.names, target.policy)
            try:
                client.create_secret(target.namespace, secret_body(target, data))
            except kube.ApiError as error:
                if error.status != 409:
                    raise
                log.info("Secret %s/%s was created by another replica", target.namespace, target.secret)
                continue
            log.info("created Secret %s/%s with a new CA", target.namespace, target.secret)
            return data, "created"
        data = certs.decode_data(secret.get("data"))
        decision = certs.plan(data, now, target.names, target.policy)
        if decision.action is certs.Action.NONE:
            return data, "kept"
        renewed = certs.renew(data, decision, now, target.names, target.policy)
        version = (secret.get("metadata") or {}).get("resourceVersion")
        patch = {"metadata": {"resourceVersion": version}, "data": certs.encode_data(renewed)}
        try:
            client.patch_secret(target.namespace, target.secret, patch)
        except kube.ApiError as error:
            if error.status != 409:
                raise
            log.info("Secret %s/%s changed meanwhile; re-reading", target.namespace, target.secret)
            continue
        log.info(
            "renewed Secret %s/%s (%s): %s",
            target.namespace,
            target.secret,
            decision.action.value,
            decision.reason,
        )
        return renewed, f"renewed: {decision.reason}"
    raise RuntimeError(f"Secret {target.namespace}/{target.secret} kept changing; trying again later")


_missing: set[str] = set()
"""Webhook configurations reported missing (warned about once, not every period)."""


def publish_ca_bundle(client: kube.Kube, configuration: str | None, bundle: bytes) -> tuple[str, ...]:
    """Set ``clientConfig.caBundle`` of every webhook in the Mutating- and ValidatingWebhookConfiguration
    named ``configuration`` where it differs; returns the kinds patched. A missing one is a warning."""
    if not configuration:
        return ()
    wanted = base64.b64encode(bundle).decode("ascii")
    patched = []
    for plural in kube.WEBHOOK_CONFIGURATIONS:
        for _ in range(ATTEMPTS):
            found = client.get_webhook_configuration(plural, configuration)
            if found is None:
                if plural not in _missing:
                    log.warning("%s %s not found: caBundle not published", plural, configuration)
                    _missing.add(plural)
                break
            _missing.discard(plural)
            ops = ca_bundle_patch(found, wanted)
            if not ops:
                break
            try:
                client.patch_webhook_configuration(plural, configuration, ops)
            except kube.ApiError as error:
                if error.status not in (409, 422):
                    raise
                continue  # changed meanwhile (the resourceVersion test failed): re-read
            log.info("published the CA bundle in %s %s", plural, configuration)
            patched.append(plural)
            break
        else:
            raise RuntimeError(f"{plural} {configuration} kept changing; trying again later")
    return tuple(patched)


def ca_bundle_patch(configuration: Mapping[str, Any], wanted: str) -> list[dict[str, Any]]:
    """JSON patch setting each webhook's caBundle to ``wanted``, conditional on the resourceVersion;
    empty when all are current."""
    ops: list[dict[str, Any]] = []
    for index, hook in enumerate(configuration.get("webhooks") or []):
        client_config = hook.get("clientConfig")
        path = f"/webhooks/{index}/clientConfig"
        if not isinstance(client_config, dict):
            ops.append({"op": "add", "path": path, "value": {"caBundle": wanted}})
        elif client_config.get("caBundle") != wanted:
            ops.append({"op": "add", "path": f"{path}/caBundle", "value": wanted})
    if not ops:
        return []
    version = (configuration.get("metadata") or {}).get("resourceVersion")
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]


def write_files(cert_dir: Path, data: Mapping[str, bytes]) -> bool:
    """Write ``tls.crt``, ``tls.key`` and the server's combined file where they differ (atomically,
    key files 0600); True when the server's file changed (kopf's server then restarts with it)."""
    cert_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = data[certs.TLS_CRT], data[certs.TLS_KEY]
    _write_if_changed(cert_dir / certs.TLS_CRT, cert, 0o644)
    _write_if_changed(cert_dir / certs.TLS_KEY, key, 0o600)
    return _write_if_changed(cert_dir / SERVER_FILE, key + cert, 0o600)


def _write_if_changed(path: Path, content: bytes, mode: int) -> bool:
    with contextlib.suppress(OSError):
        if path.read_bytes() == content:
            return False
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return True


def throwaway(cert_dir: Path, names: Sequence[str], now: datetime.datetime | None = None) -> Path:
    """A self-signed certificate for this process only (no Secret, no caBundle): the server can start
    with TLS, but no API server trusts it. Returns the server's combined key+certificate file."""
    moment = now or _utcnow()
    ca, ca_key = certs.new_ca(moment, datetime.timedelta(days=30))
    cert, key = certs.issue(ca, ca_key, list(names), moment, datetime.timedelta(days=30))
    write_files(cert_dir, {certs.TLS_CRT: certs.cert_pem(cert, ca), certs.TLS_KEY: key})
    return cert_dir / SERVER_FILE


async def maintain(client: kube.Kube, target: Target, period: float) -> None:
    """Every ``period`` seconds, ``ensure`` (in a thread); errors are logged and retried next time."""
    while True:
        await asyncio.sleep(period)
        try:
            outcome = await asyncio.to_thread(ensure, client, target)
        except Exception as error:  # the loop outlives any failure: the next period tries again
            log.warning("webhook TLS maintenance failed (next try in %ss): %s", period, error)
            continue
        if outcome.secret != "kept" or outcome.patched or outcome.files_written:
            log.info("webhook TLS: %s", outcome)
