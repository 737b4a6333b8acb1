"""kopf handlers: I/O only; every decision is made by the pure functions in render/status/rollout.

Run with ``llmroute-operator`` (see ``cli.py``) or ``kopf run -m llmroute_operator.handlers`` (then the
``LLMROUTE_*`` environment configures it). Webhook paths: ``/inject`` (Pod mutation), ``/validate``
(LLMRoute validation).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from llmroute_operator import admission, budgets, hpa, kube, metrics, render, rollout, startup
from llmroute_operator import status as state
from llmroute_operator.runtime import INDEX, RuntimeConfig, api, configure_runtime, now, runtime
from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL, LLMRoute, ManifestError
from llmroute_sidecar.api.spec import RolloutPolicy

log = logging.getLogger("llmroute.operator")

__all__ = ["INDEX", "RuntimeConfig", "configure_runtime", "runtime"]

REGISTERED = (admission, startup)
"""Modules whose kopf handlers register when imported: this module loads them all."""

RESYNC_SECONDS = float(os.environ.get("LLMROUTE_RESYNC_SECONDS") or 30)
DEBOUNCE_SECONDS = 0.5
HINTS_PARALLELISM = 16
HINTS_TIMEOUT_SECONDS = 1.0
BUDGET_READ_SECONDS = 2.0
"""Bound of one status pass's budget read from Redis."""


# -- the route index (used by the webhook and for conflicts) --------------------------------------


@kopf.index(API_GROUP, API_VERSION, PLURAL)
def routes_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, Any]:
    """Every route's body, by namespace."""
    return {namespace: copy.deepcopy(dict(body))}


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
        try:
            client.patch_workload(
                target.kind, namespace, target.name, rollout.restart_patch(sidecar_hash, now())
            )
        except kube.ApiError as error:  # e.g. forbidden: reported, and the workload stays listed
            kopf.warn(body, reason="RolloutFailed", message=f"could not restart {target}: {error}")
            pending.append(str(target))
            continue
        metrics.ROLLOUTS.labels(target.kind).inc()
        kopf.info(body, reason="RolloutRestarted", message=f"restarted {target} to inject the sidecar")
    return pending


def _ensure_hpa(
    client: kube.Kube, body: Any, route: LLMRoute, matched: Sequence[Mapping[str, Any]]
) -> str | None:
    """Create, update or delete the route's HPA; return the problem that prevents one, if any (an API
    failure here is reported in status rather than failing the whole reconcile)."""
    try:
        return _apply_hpa(client, body, route, matched)
    except kube.ApiError as error:
        if not hpa.wants_hpa(route) and error.status == 403:
            return None  # not allowed to look, and nothing asked for: nothing to report
        return f"autoscaling: the HorizontalPodAutoscaler could not be managed: {error}"


def _apply_hpa(
    client: kube.Kube, body: Any, route: LLMRoute, matched: Sequence[Mapping[str, Any]]
) -> str | None:
    namespace, name = route.metadata.namespace, hpa.hpa_name(route)
    plan = hpa.plan_hpa(route, _owners(client, namespace, matched) if hpa.wants_hpa(route) else [])
    existing = client.get_hpa(namespace, name)
    if plan.desired is None:
        if existing is not None and not plan.problem and hpa.owned_by(existing, route.metadata.name):
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


def _read_budgets(url: str | None, route: LLMRoute) -> list[dict[str, Any]] | None:
    """``status.budgets`` from Redis (observer passes only, in their worker thread); None without a
    Redis URL, without budgets, or when Redis cannot be read (the previous figures stay)."""
    queries = budgets.budget_queries(route)
    if not url or not queries:
        return None
    try:
        reads = asyncio.run(
            asyncio.wait_for(budgets.read_budgets(url, route.key, queries), BUDGET_READ_SECONDS)
        )
    except Exception as error:  # Redis down or slow: status keeps its last figures
        log.warning("reading budgets of LLMRoute %s failed: %s", route.key, error)
        return None
    return budgets.budget_status(reads)


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
            new_status = state.invalid_status(body, str(error), previous, now())
        else:
            _ensure_configmap(client, route)
            sidecar_hash = render.sidecar_hash(route, settings)
            pods = client.list_pods(
                route.metadata.namespace, render.label_selector_query(route.spec.selector)
            )
            others = state.valid_routes(index.get(route.metadata.namespace, []))
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
                budgets=_read_budgets(settings.redis_url, route) if hints else None,
            )
            new_status = state.route_status(route, observation, previous, now())
            metrics.record_route_status(route.key, new_status)
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
    metrics.forget_route(f"{namespace}/{name}")
    client.delete_configmap(namespace, render.configmap_name_for(name))
    autoscaler = client.get_hpa(namespace, hpa.hpa_name_for(name))
    if autoscaler is not None and hpa.owned_by(autoscaler, name):
        client.delete_hpa(namespace, hpa.hpa_name_for(name))
