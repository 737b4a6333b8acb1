"""kopf handlers: I/O only; every decision is made by the pure functions in render/status/rollout.

Run with ``llmroute-operator`` (see ``cli.py``) or ``kopf run -m llmroute_operator.handlers`` (then the
``LLMROUTE_*`` environment configures it). Webhook paths: ``/inject`` (Pod mutation), ``/validate``
(LLMRoute validation).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch
import kopf

from llmroute_operator import kube, render, rollout
from llmroute_operator import status as state
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL, LLMRoute, ManifestError
from llmroute_sidecar.api.spec import RolloutPolicy
from llmroute_sidecar.config import HostPort

log = logging.getLogger("llmroute.operator")

RESYNC_SECONDS = float(os.environ.get("LLMROUTE_RESYNC_SECONDS") or 30)
HINTS_TIMEOUT_SECONDS = 1.0
INDEX = "routes_by_namespace"
"""The name of the route index, as kopf passes it to handlers."""
DEFAULT_WEBHOOK_LISTEN = HostPort("0.0.0.0", 9443)
DEFAULT_METRICS_LISTEN = HostPort("0.0.0.0", 8080)
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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
    settings.admission.server = NamespacedWebhookServer(
        addr=config.webhook_listen.host,
        port=config.webhook_listen.port,
        host=config.webhook_host,
        insecure=config.webhook_insecure,
        certfile=config.webhook_certfile,
        pkeyfile=config.webhook_keyfile,
    )


# -- the route index (used by the webhook and for conflicts) --------------------------------------


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def routes_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, Any]:
    """Every route's body, by namespace."""
    return {namespace: copy.deepcopy(dict(body))}


def _valid_routes(bodies: Iterable[Mapping[str, Any]]) -> list[LLMRoute]:
    routes = []
    for body in bodies:
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            continue
        try:
            routes.append(state.parse_body(body))
        except ManifestError:
            continue
    return routes


# -- admission ------------------------------------------------------------------------------------


@kopf.on.mutate(
    "v1",
    "pods",
    id="inject",
    operations=["CREATE"],
    side_effects=False,
    ignore_failures=OperatorSettings.from_env().webhook_failure_policy == "Ignore",
)
async def inject(*, body: kopf.Body, patch: kopf.Patch, warnings: list[str], **kwargs: Any) -> None:
    """Add the sidecar to a pod its namespace's route selects (pure decision in render)."""
    namespace = (body.get("metadata") or {}).get("namespace")
    routes = _valid_routes(kwargs[INDEX].get(namespace, []) if namespace else [])
    plan = render.plan_injection(body, routes, runtime().settings)
    if plan.reason == "Conflict":
        warnings.append(
            f"llmroute: no sidecar injected, routes {', '.join(plan.conflicts)} all select this pod"
        )
    if plan.patch:
        ops = plan.patch
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))


@kopf.on.validate(API_GROUP, API_VERSION, PLURAL, id="validate", operations=["CREATE", "UPDATE"])
def validate(*, body: kopf.Body, **_: Any) -> None:
    """Reject semantically invalid routes with messages naming the field."""
    problems = state.validate_route(body)
    if problems:
        raise kopf.AdmissionError("invalid LLMRoute: " + "; ".join(problems), code=422)


# -- reconciliation -------------------------------------------------------------------------------


def _ensure_configmap(api: kube.Kube, route: LLMRoute) -> None:
    desired = render.render_configmap(route)
    namespace, name = route.metadata.namespace, desired["metadata"]["name"]
    existing = api.get_configmap(namespace, name)
    if existing is None:
        api.create_configmap(namespace, desired)
    elif existing.get("data") != desired["data"] or not (existing.get("metadata") or {}).get(
        "ownerReferences"
    ):
        api.patch_configmap(namespace, name, {"metadata": desired["metadata"], "data": desired["data"]})


def _fetch_hints(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    hints = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if not ip:
            continue
        try:
            url = f"http://{ip}:{render.ADMIN_PORT}/hints"
            with urllib.request.urlopen(url, timeout=HINTS_TIMEOUT_SECONDS) as response:
                hints.append(json.loads(response.read()))
        except (OSError, ValueError):
            continue
    return hints


def _rollout(
    api: kube.Kube, body: Any, route: LLMRoute, lacking: list[Mapping[str, Any]], sidecar_hash: str
) -> list[str]:
    """Restart owning workloads under rollout: auto; return the workloads left for a person."""
    namespace = route.metadata.namespace
    replicasets = {}
    for name in rollout.replicaset_names(lacking):
        found = api.get_replicaset(namespace, name)
        if found is not None:
            replicasets[name] = found
    targets = rollout.rollout_targets(lacking, replicasets)
    if route.spec.rollout != RolloutPolicy.AUTO:
        return [str(target) for target in targets]
    pending = []
    for target in targets:
        workload = api.get_workload(target.kind, namespace, target.name)
        if workload is None:
            continue
        if rollout.already_restarted(workload, sidecar_hash):
            pending.append(str(target))
            continue
        api.patch_workload(target.kind, namespace, target.name, rollout.restart_patch(sidecar_hash, _now()))
        kopf.info(body, reason="RolloutRestarted", message=f"restarted {target} to inject the sidecar")
    return pending


def _clean(value: Mapping[str, Any]) -> dict[str, Any]:
    return {key: item for key, item in value.items() if item is not None and key != "kopf"}


def _reconcile(body: Any, previous: Mapping[str, Any], patch: Any, index: Any, *, hints: bool) -> None:
    """Render, write, observe, report: the one reconcile path for create/update/resume/timer."""
    api = kube.Kube()
    settings = runtime().settings
    try:
        route = state.parse_body(body)
    except ManifestError as error:
        new_status = state.invalid_status(body, str(error), previous, _now())
    else:
        _ensure_configmap(api, route)
        sidecar_hash = render.sidecar_hash(route, settings)
        pods = api.list_pods(route.metadata.namespace, render.label_selector_query(route.spec.selector))
        others = _valid_routes(index.get(route.metadata.namespace, []))
        conflicts = state.find_conflicts(route, others, pods)
        lacking = [] if conflicts else state.pods_needing_rollout(route, pods, sidecar_hash)
        workloads = _rollout(api, body, route, list(lacking), sidecar_hash) if lacking else []
        matched = state.matched_pods(route, pods)
        observation = state.Observation(
            pods=pods,
            sidecar_hash=sidecar_hash,
            conflicts=conflicts,
            hints=_fetch_hints(p for p in matched if state.is_current(p, route, sidecar_hash))
            if hints
            else None,
            workloads=workloads,
        )
        new_status = state.route_status(route, observation, previous, _now())
    for kind, reason, message in state.transition_events(previous, new_status):
        kopf.event(body, type=kind, reason=reason, message=message)
    if _clean(new_status) != _clean(previous):
        patch.status.update(new_status)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
def reconcile(*, body: kopf.Body, status: kopf.Status, patch: kopf.Patch, **kwargs: Any) -> None:
    """Route created, changed, or found at startup: ConfigMap, rollout, status, Events."""
    _reconcile(body, dict(status), patch, kwargs[INDEX], hints=False)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(*, body: kopf.Body, status: kopf.Status, patch: kopf.Patch, **kwargs: Any) -> None:
    """Periodically: recount pods (webhook failures, new pods), collect load hints."""
    _reconcile(body, dict(status), patch, kwargs[INDEX], hints=True)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
def cleanup(*, namespace: str | None, name: str, **_: Any) -> None:
    """Finalizer: delete what the route owns; pods lose the sidecar on their next rollout."""
    kube.Kube().delete_configmap(namespace or "default", render.configmap_name_for(name))
