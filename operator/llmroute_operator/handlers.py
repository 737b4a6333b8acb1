"""kopf handlers: I/O only; every decision is made by the pure functions in render/status/rollout.

Run with ``llmroute-operator`` (see ``cli.py``) or ``kopf run -m llmroute_operator.handlers`` (then the
``LLMROUTE_*`` environment configures it). Webhook paths: ``/inject`` (Pod mutation), ``/validate``
(LLMRoute validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import logging
import os
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import kopf
from aiohttp import web

from llmroute_operator import certs, hpa, kube, metrics, render, rollout, webhook_tls
from llmroute_operator import status as state
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL, LLMRoute, ManifestError
from llmroute_sidecar.api.spec import RolloutPolicy
from llmroute_sidecar.config import HostPort

log = logging.getLogger("llmroute.operator")

RESYNC_SECONDS = float(os.environ.get("LLMROUTE_RESYNC_SECONDS") or 30)
DEBOUNCE_SECONDS = 0.5
HINTS_PARALLELISM = 16
HINTS_TIMEOUT_SECONDS = 1.0
ROUTES_LIST_TIMEOUT = 3.0
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


_api: kube.Kube | None = None


def api() -> kube.Kube:
    """One API client per process (its connection pool is shared by handler threads)."""
    global _api
    if _api is None:
        _api = kube.Kube()
    return _api


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
    if listen is not None:
        _admin = await metrics.start_admin(listen)
        log.info("metrics and liveness at http://%s:%s/{metrics,healthz}", listen.host, listen.port)


@kopf.on.cleanup(id="admin-endpoint")
async def stop_admin_endpoint(**_: Any) -> None:
    global _admin
    if _admin is not None:
        await _admin.cleanup()
        _admin = None


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
    with metrics.observe_webhook("inject") as outcome:
        namespace = (body.get("metadata") or {}).get("namespace")
        routes = _valid_routes(await _routes_in(namespace, kwargs[INDEX])) if namespace else []
        plan = render.plan_injection(body, routes, runtime().settings)
        outcome[0] = "injected" if plan.patch else plan.reason.lower() or "skipped"
        if plan.reason == "Conflict":
            warnings.append(
                f"llmroute: no sidecar injected, routes {', '.join(plan.conflicts)} all select this pod"
            )
        warnings.extend(plan.notes)
        if plan.patch:
            ops = plan.patch
            patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
            metrics.PODS_INJECTED.inc()


async def _routes_in(namespace: str, index: Any) -> list[Mapping[str, Any]]:
    """The namespace's routes from the API server, falling back to the index when it is unreachable.

    Not the index first: kopf pauses watches in a standby replica (peering), so its index is stale,
    yet the webhook Service sends reviews to every replica.
    """
    try:
        found = await asyncio.wait_for(asyncio.to_thread(api().list_routes, namespace), ROUTES_LIST_TIMEOUT)
    except (kube.ApiError, OSError, TimeoutError, ValueError) as error:
        log.warning("listing LLMRoutes in %s failed (%s); deciding from the index", namespace, error)
        return list(index.get(namespace, []))
    return list(found)


@kopf.on.validate(API_GROUP, API_VERSION, PLURAL, id="validate", operations=["CREATE", "UPDATE"])
def validate(*, body: kopf.Body, **_: Any) -> None:
    """Reject semantically invalid routes with messages naming the field."""
    with metrics.observe_webhook("validate"):
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


def _fetch_hints(pods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each pod's ``/hints`` (admin port), fetched in parallel; pods that do not answer are skipped."""
    urls = [
        f"http://{ip}:{render.admin_port(pod)}/hints"
        for pod in pods
        if (ip := (pod.get("status") or {}).get("podIP"))
    ]
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(HINTS_PARALLELISM, len(urls))) as pool:
        return [hint for hint in pool.map(_fetch_hint, urls) if hint is not None]


def _fetch_hint(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=HINTS_TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _owners(client: kube.Kube, namespace: str, pods: Sequence[Mapping[str, Any]]) -> list[rollout.Workload]:
    """Workloads owning the pods (pod → ReplicaSet → Deployment; StatefulSet; DaemonSet)."""
    replicasets = {}
    for name in rollout.replicaset_names(pods):
        found = client.get_replicaset(namespace, name)
        if found is not None:
            replicasets[name] = found
    return rollout.rollout_targets(pods, replicasets)


def _rollout(
    client: kube.Kube, body: Any, route: LLMRoute, lacking: list[Mapping[str, Any]], sidecar_hash: str
) -> list[str]:
    """Restart owning workloads under rollout: auto; return the workloads left for a person."""
    namespace = route.metadata.namespace
    targets = _owners(client, namespace, lacking)
    if route.spec.rollout != RolloutPolicy.AUTO:
        return [str(target) for target in targets]
    pending = []
    for target in targets:
        workload = client.get_workload(target.kind, namespace, target.name)
        if workload is None:
            continue
        if rollout.already_restarted(workload, sidecar_hash):
            pending.append(str(target))
            continue
        client.patch_workload(
            target.kind, namespace, target.name, rollout.restart_patch(sidecar_hash, _now())
        )
        metrics.ROLLOUTS.labels(target.kind).inc()
        kopf.info(body, reason="RolloutRestarted", message=f"restarted {target} to inject the sidecar")
    return pending


def _ensure_hpa(
    client: kube.Kube, body: Any, route: LLMRoute, matched: Sequence[Mapping[str, Any]]
) -> str | None:
    """Create, update or delete the route's HPA; return the problem that prevents one, if any."""
    namespace, name = route.metadata.namespace, hpa.hpa_name(route)
    plan = hpa.plan_hpa(route, _owners(client, namespace, matched) if hpa.wants_hpa(route) else [])
    existing = client.get_hpa(namespace, name)
    if plan.desired is None:
        if existing is not None and not plan.problem and _owned_by(existing, route):
            client.delete_hpa(namespace, name)
            kopf.info(body, reason="AutoscalerDeleted", message=f"deleted HorizontalPodAutoscaler {name}")
        return plan.problem
    if existing is None:
        client.create_hpa(namespace, plan.desired)
        target = plan.desired["spec"]["scaleTargetRef"]
        kopf.info(
            body,
            reason="AutoscalerCreated",
            message=f"created HorizontalPodAutoscaler {name} for {target['kind']}/{target['name']}",
        )
    elif hpa.needs_update(existing, plan.desired):
        client.patch_hpa(
            namespace, name, {"metadata": plan.desired["metadata"], "spec": plan.desired["spec"]}
        )
    return None


def _owned_by(obj: Mapping[str, Any], route: LLMRoute) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("kind") == "LLMRoute" and ref.get("name") == route.metadata.name for ref in refs)


def _clean(value: Mapping[str, Any]) -> dict[str, Any]:
    return {key: item for key, item in value.items() if item is not None and key != "kopf"}


def desired_status(body: Any, previous: Mapping[str, Any], index: Any, *, hints: bool) -> dict[str, Any]:
    """Render, write, observe: the one reconcile path (create/update/resume and the observer daemon);
    returns the status to report and posts Events on transitions."""
    with metrics.observe_reconcile() as outcome:
        client = api()
        settings = runtime().settings
        try:
            route = state.parse_body(body)
        except ManifestError as error:
            outcome[0] = "invalid"
            new_status = state.invalid_status(body, str(error), previous, _now())
        else:
            _ensure_configmap(client, route)
            sidecar_hash = render.sidecar_hash(route, settings)
            pods = client.list_pods(
                route.metadata.namespace, render.label_selector_query(route.spec.selector)
            )
            others = _valid_routes(index.get(route.metadata.namespace, []))
            conflicts = state.find_conflicts(route, others, pods)
            lacking = [] if conflicts else state.pods_needing_rollout(route, pods, sidecar_hash)
            workloads = _rollout(client, body, route, list(lacking), sidecar_hash) if lacking else []
            matched = state.matched_pods(route, pods)
            current = [pod for pod in matched if state.is_current(pod, route, sidecar_hash)]
            observation = state.Observation(
                pods=pods,
                sidecar_hash=sidecar_hash,
                conflicts=conflicts,
                hints=_fetch_hints(current) if hints else None,
                workloads=workloads,
                autoscaling_problem=_ensure_hpa(client, body, route, matched),
            )
            new_status = state.route_status(route, observation, previous, _now())
        for kind, reason, message in state.transition_events(previous, new_status):
            kopf.event(body, type=kind, reason=reason, message=message)
        return new_status


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
def reconcile(*, body: kopf.Body, status: kopf.Status, patch: kopf.Patch, **kwargs: Any) -> None:
    """Route created, changed, or found at startup: ConfigMap, rollout, HPA, status, Events."""
    previous = dict(status)
    new_status = desired_status(body, previous, kwargs[INDEX], hints=False)
    if _clean(new_status) != _clean(previous):
        patch.status.update(new_status)
    _wake_neighbours(body, kwargs[INDEX])


def _wake_neighbours(body: Mapping[str, Any], index: Any) -> None:
    """Other routes in the namespace recheck now: a selector change may start or end a conflict."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    for other in index.get(namespace, []):
        other_name = (other.get("metadata") or {}).get("name")
        if other_name and other_name != name:
            _wake_threadsafe(str(namespace), str(other_name))


def _wake_threadsafe(namespace: str, name: str) -> None:
    wake = _wakeups.get((namespace, name))
    if wake is not None and _loop is not None:
        _loop.call_soon_threadsafe(wake.set)


_wakeups: dict[tuple[str, str], asyncio.Event] = {}
"""Per-route wake-up calls for the observer daemons, set by pod events and neighbouring routes."""
_loop: asyncio.AbstractEventLoop | None = None
"""The operator's event loop (handlers in threads wake daemons through it)."""


@kopf.daemon(API_GROUP, API_VERSION, PLURAL, cancellation_timeout=10)
async def observe(*, body: kopf.Body, name: str, namespace: str | None, stopped: Any, **kwargs: Any) -> None:
    """While the route exists: recount pods and collect load hints when its pods change (pod events)
    and at least every LLMROUTE_RESYNC_SECONDS (pods the webhook missed, hints)."""
    global _loop
    _loop = asyncio.get_running_loop()
    key = (namespace or "", name)
    wake = _wakeups.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), RESYNC_SECONDS)
            if stopped:
                break
            await asyncio.sleep(DEBOUNCE_SECONDS)  # one recount for a burst of pod events
            wake.clear()
            try:
                await asyncio.to_thread(_observe_once, body, kwargs[INDEX])
            except (kube.ApiError, OSError) as error:
                log.warning("observing LLMRoute %s/%s failed: %s", namespace, name, error)
    finally:
        if _wakeups.get(key) is wake:
            del _wakeups[key]


def _observe_once(body: kopf.Body, index: Any) -> None:
    previous = dict(body.get("status") or {})
    new_status = desired_status(body, previous, index, hints=True)
    if _clean(new_status) != _clean(previous):
        meta = body.get("metadata") or {}
        api().patch_status(str(meta.get("namespace")), str(meta.get("name")), {"status": new_status})


@kopf.on.event("v1", "pods", annotations={render.ANNOTATION_ROUTE: kopf.PRESENT})
def pod_changed(*, meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    """An injected pod appeared, changed (readiness) or went: wake its route's observer."""
    route = (meta.get("annotations") or {}).get(render.ANNOTATION_ROUTE)
    wake = _wakeups.get((namespace or "", str(route)))
    if wake is not None:
        wake.set()


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
def cleanup(*, namespace: str | None, name: str, body: kopf.Body, **kwargs: Any) -> None:
    """Finalizer: delete what the route owns; pods lose the sidecar on their next rollout."""
    _wake_neighbours(body, kwargs[INDEX])
    client, namespace = api(), namespace or "default"
    client.delete_configmap(namespace, render.configmap_name_for(name))
    autoscaler = client.get_hpa(namespace, render.configmap_name_for(name))
    if autoscaler is not None and any(
        ref.get("kind") == "LLMRoute" and ref.get("name") == name
        for ref in (autoscaler.get("metadata") or {}).get("ownerReferences") or []
    ):
        client.delete_hpa(namespace, render.configmap_name_for(name))
