"""How this operator process runs (flags and ``LLMROUTE_*`` environment) and its shared API client."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from llmroute_operator import kube
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.config import HostPort

log = logging.getLogger("llmroute.operator")


INDEX = "routes_by_namespace"
"""The name of the route index, as kopf passes it to handlers."""
DEFAULT_WEBHOOK_LISTEN = HostPort("0.0.0.0", 9443)
DEFAULT_METRICS_LISTEN = HostPort("127.0.0.1", 8081)
"""Local runs: loopback, off the sidecar's 8080/9090 (the chart passes ``0.0.0.0:8080`` explicitly)."""
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _metrics_listen(raw: str | None) -> HostPort | None:
    if raw is None or not raw.strip():
        return DEFAULT_METRICS_LISTEN
    if raw.strip().lower() in ("off", "none", "false", "0"):
        return None
    return HostPort.parse(raw, "--metrics-listen")


def _own_namespace(env: Mapping[str, str]) -> str | None:
    """LLMROUTE_OPERATOR_NAMESPACE, POD_NAMESPACE, or the service account's namespace file."""
    found = env.get("LLMROUTE_OPERATOR_NAMESPACE") or env.get("POD_NAMESPACE")
    if found:
        return found
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as file:
            return file.read().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class RuntimeConfig:
    """How this operator process runs: sidecar settings and its webhook endpoint."""

    settings: OperatorSettings
    webhook_listen: HostPort = DEFAULT_WEBHOOK_LISTEN
    webhook_insecure: bool = False
    webhook_host: str | None = None
    webhook_certfile: str | None = None
    webhook_keyfile: str | None = None
    webhook_tls_secret: str | None = None
    """Self-managed TLS: the Secret (operator namespace) with the CA and serving certificate."""
    webhook_service: str | None = None
    """The webhook Service's name: DNS names of the self-managed serving certificate."""
    webhook_configuration: str | None = None
    """Mutating/ValidatingWebhookConfiguration name whose caBundle self-managed TLS keeps current."""
    webhook_cert_dir: str = "/tmp/llmroute-webhook"
    """Where self-managed TLS writes the serving certificate and key for the webhook server."""
    operator_namespace: str | None = None
    """The namespace the operator runs in (its TLS Secret lives there)."""
    metrics_listen: HostPort | None = DEFAULT_METRICS_LISTEN
    """Prometheus /metrics and /healthz; None disables."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeConfig:
        env = os.environ if env is None else env
        listen = env.get("LLMROUTE_WEBHOOK_LISTEN") or "0.0.0.0:9443"
        return cls(
            settings=OperatorSettings.from_env(env),
            webhook_listen=HostPort.parse(listen, "LLMROUTE_WEBHOOK_LISTEN"),
            webhook_insecure=(env.get("LLMROUTE_WEBHOOK_INSECURE", "").lower() in ("1", "true", "yes")),
            webhook_host=env.get("LLMROUTE_WEBHOOK_HOST") or None,
            webhook_certfile=env.get("LLMROUTE_WEBHOOK_CERT_FILE") or None,
            webhook_keyfile=env.get("LLMROUTE_WEBHOOK_KEY_FILE") or None,
            webhook_tls_secret=env.get("LLMROUTE_WEBHOOK_TLS_SECRET") or None,
            webhook_service=env.get("LLMROUTE_WEBHOOK_SERVICE") or None,
            webhook_configuration=env.get("LLMROUTE_WEBHOOK_CONFIGURATION") or None,
            webhook_cert_dir=env.get("LLMROUTE_WEBHOOK_CERT_DIR") or "/tmp/llmroute-webhook",
            operator_namespace=_own_namespace(env),
            metrics_listen=_metrics_listen(env.get("LLMROUTE_METRICS_LISTEN")),
        )


_runtime: RuntimeConfig | None = None


def configure_runtime(config: RuntimeConfig) -> None:
    """Set the runtime configuration (the CLI does, before kopf starts)."""
    global _runtime
    _runtime = config


def runtime() -> RuntimeConfig:
    global _runtime
    if _runtime is None:
        _runtime = RuntimeConfig.from_env()
    return _runtime


_api: kube.Kube | None = None


def api() -> kube.Kube:
    """One API client per process (its connection pool is shared by handler threads)."""
    global _api
    if _api is None:
        _api = kube.Kube()
    return _api


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds, Z)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
