"""kopf startup and cleanup handlers, in every replica (peering pauses only resource handlers):
kopf's storage settings, the webhook server and its self-managed TLS, peering, the admin endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from llmroute_operator import certs, kube, metrics, webhook_tls
from llmroute_operator.runtime import api, runtime
from llmroute_sidecar.api import API_GROUP

log = logging.getLogger("llmroute.operator")


class NamespacedWebhookServer(kopf.WebhookServer):
    """kopf's webhook server; fills ``metadata.namespace`` from the review when the object lacks it
    (pods created from a ``generateName`` template may arrive without one)."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: Any, **kwargs: Any) -> Any:
            review = request.get("request") or {}
            obj = review.get("object")
            if isinstance(obj, dict) and review.get("namespace"):
                obj.setdefault("metadata", {}).setdefault("namespace", review["namespace"])
            return await fn(request, **kwargs)

        async for client_config in super().__call__(with_namespace):
            yield client_config


# -- startup --------------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: Any, **_: Any) -> None:
    """Storage under llmroute.dev annotations (the status schema is ours), our finalizer, webhooks."""
    kube.load_config()
    config = runtime()
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own Events only, not every handler log line
    settings.admission.managed = None  # the chart owns the webhook configurations (selectors, CA)
    certfile, pkeyfile = config.webhook_certfile, config.webhook_keyfile
    file_check_interval = 60.0
    tls = _webhook_tls_target()
    if tls is not None:
        # Before kopf starts the webhook server (after the startup handlers): its files must exist.
        try:
            outcome = webhook_tls.ensure(api(), tls)
        except Exception as error:
            raise kopf.TemporaryError(f"webhook TLS: {error}", delay=5) from error
        log.info("webhook TLS from Secret %s/%s: %s", tls.namespace, tls.secret, outcome)
        certfile = pkeyfile = str(tls.server_file)  # key and certificate in one file, replaced atomically
        file_check_interval = min(file_check_interval, _webhook_tls_check_seconds())
    elif not config.webhook_insecure and not (certfile and pkeyfile):
        names = sorted(
            {config.webhook_host or "localhost", config.webhook_listen.host, "127.0.0.1"} - {"0.0.0.0"}
        )
        certfile = pkeyfile = str(webhook_tls.throwaway(Path(config.webhook_cert_dir), names))
        log.warning(
            "webhook TLS: no --webhook-tls-secret, --webhook-cert/--webhook-key or --webhook-insecure; "
            "serving a throwaway self-signed certificate for %s that no API server trusts (in a cluster, "
            "install with the chart; locally, use --webhook-insecure)",
            ", ".join(names),
        )
    settings.admission.server = NamespacedWebhookServer(
        addr=config.webhook_listen.host,
        port=config.webhook_listen.port,
        host=config.webhook_host,
        insecure=config.webhook_insecure,
        certfile=certfile,
        pkeyfile=pkeyfile,
        file_check_interval=file_check_interval,
    )


def _webhook_tls_target() -> webhook_tls.Target | None:
    """Self-managed TLS (``--webhook-tls-secret``, not insecure): what to keep current; None otherwise."""
    config = runtime()
    if not config.webhook_tls_secret or config.webhook_insecure:
        return None
    namespace, service, problems = config.operator_namespace, config.webhook_service, []
    if config.webhook_certfile or config.webhook_keyfile:
        problems.append("--webhook-cert/--webhook-key (externally managed TLS) exclude --webhook-tls-secret")
    if not namespace:
        problems.append("the operator namespace is unknown: pass --operator-namespace or set POD_NAMESPACE")
    if not service:
        problems.append("--webhook-service is required (the certificate's DNS names)")
    try:
        policy = certs.Policy.from_env(os.environ)
        _webhook_tls_check_seconds()
    except ValueError as error:
        problems.append(str(error))
    if problems or not namespace or not service:
        raise kopf.PermanentError("webhook TLS (--webhook-tls-secret): " + "; ".join(problems))
    extra = [config.webhook_host] if config.webhook_host else []
    return webhook_tls.Target(
        namespace=namespace,
        secret=config.webhook_tls_secret,
        names=certs.service_names(service, namespace, extra),
        cert_dir=Path(config.webhook_cert_dir),
        configuration=config.webhook_configuration,
        policy=policy,
    )


def _webhook_tls_check_seconds() -> float:
    return webhook_tls.check_seconds(os.environ)


_webhook_tls_task: asyncio.Task[None] | None = None


@kopf.on.startup(id="webhook-tls")
async def start_webhook_tls(**_: Any) -> None:
    """Self-managed TLS upkeep in every replica (peering pauses only resource handlers, not this):
    renew the certificate, repair the caBundle (e.g. after ``helm upgrade``), refresh the files."""
    global _webhook_tls_task
    tls = _webhook_tls_target()
    if tls is not None and _webhook_tls_task is None:
        period = _webhook_tls_check_seconds()
        _webhook_tls_task = asyncio.create_task(webhook_tls.maintain(api(), tls, period), name="webhook-tls")
        log.info("webhook TLS: checking Secret %s/%s every %ss", tls.namespace, tls.secret, period)


@kopf.on.cleanup(id="webhook-tls")
async def stop_webhook_tls(**_: Any) -> None:
    global _webhook_tls_task
    task, _webhook_tls_task = _webhook_tls_task, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@kopf.on.startup(id="peering")
def configure_peering(settings: Any, **_: Any) -> None:
    """LLMROUTE_PEERING_LIFETIME_SECONDS: how long a silent peer counts as alive (kopf: 60 s); a
    standby replica takes over that long after the active one died without saying goodbye."""
    lifetime = os.environ.get("LLMROUTE_PEERING_LIFETIME_SECONDS")
    if lifetime:
        settings.peering.lifetime = int(lifetime)


_admin: web.AppRunner | None = None


@kopf.on.startup(id="admin-endpoint")
async def start_admin_endpoint(**_: Any) -> None:
    """``/metrics`` and ``/healthz`` in every replica (active or standing by)."""
    global _admin
    listen = runtime().metrics_listen
    if listen is None:
        return
    try:
        _admin = await metrics.start_admin(listen)
    except OSError as error:  # e.g. the port is taken on a workstation: run on, without the endpoint
        log.error("metrics and liveness endpoint not started on %s:%s: %s", listen.host, listen.port, error)
        return
    log.info("metrics and liveness at http://%s:%s/{metrics,healthz}", listen.host, listen.port)


@kopf.on.cleanup(id="admin-endpoint")
async def stop_admin_endpoint(**_: Any) -> None:
    global _admin
    if _admin is not None:
        await _admin.cleanup()
        _admin = None
