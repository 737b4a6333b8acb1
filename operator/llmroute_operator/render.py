"""Desired state, computed without I/O: the route's ConfigMap, the sidecar container, the pod patch.

Everything here takes parsed routes (``llmroute_sidecar.api.LLMRoute``) and plain dicts and
returns plain dicts, so the kopf handlers only fetch, call these, and write.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import API_GROUP, API_VERSION, KIND, LLMRoute
from llmroute_sidecar.api.spec import LabelSelector
from llmroute_sidecar.config import CONFIGMAPS_SUBDIR, DEFAULT_SECRETS_DIR

SIDECAR_NAME = "llmroute-sidecar"
TRAFFIC_PORT = 8080
ADMIN_PORT = 9090
ROUTE_FILE_KEY = "route.yaml"
ROUTE_DIR = "/etc/llmroute/route"
SECRETS_DIR = DEFAULT_SECRETS_DIR
CONFIG_VOLUME = "llmroute-config"

ANNOTATION_ROUTE = f"{API_GROUP}/route"
"""Pod annotation: the name of the route whose sidecar the pod carries."""
ANNOTATION_CONFIG_HASH = f"{API_GROUP}/config-hash"
"""Pod annotation: hash of the injected sidecar (image, args, mounts, env); limits are not in it."""
ANNOTATION_INJECT = f"{API_GROUP}/inject"
"""Pod annotation: ``"false"`` opts the pod out of injection."""
ANNOTATION_RESTARTED_AT = f"{API_GROUP}/restartedAt"
"""Workload template annotation set to restart it (like ``kubectl rollout restart``)."""
ANNOTATION_RESTARTED_FOR = f"{API_GROUP}/restartedFor"
"""Workload template annotation: the sidecar hash a restart was for (never restart twice for one)."""

MANAGED_BY = "llmroute-operator"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _digest(value: Any, length: int = 16) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _bounded_name(prefix: str, name: str, limit: int) -> str:
    """``prefix + name`` if it fits in ``limit`` characters, else a truncated name with a hash."""
    full = prefix + name
    if len(full) <= limit:
        return full
    suffix = "-" + _digest(name, 8)
    return (full[: limit - len(suffix)].rstrip("-.")) + suffix


def labels(route: LLMRoute) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels of objects the operator creates for a route."""
    return {
        "app.kubernetes.io/name": "llmroute",
        "app.kubernetes.io/instance": _bounded_name("", route.metadata.name, 63),
        "app.kubernetes.io/component": "route-config",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def owner_reference(route: LLMRoute) -> dict[str, Any]:
    """An owner reference to the route (garbage collection deletes what it owns)."""
    extra = route.metadata.model_extra or {}
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": route.metadata.name,
        "uid": str(extra.get("uid", "")),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def configmap_name_for(route_name: str) -> str:
    """``llmroute-<route>``, shortened with a hash when too long for an object name."""
    return _bounded_name("llmroute-", route_name, 253)


def configmap_name(route: LLMRoute) -> str:
    """The name of the route's ConfigMap."""
    return configmap_name_for(route.metadata.name)


def route_document(route: LLMRoute) -> dict[str, Any]:
    """The manifest the sidecar reads: apiVersion, kind, metadata (name, namespace, generation), spec."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {
            "name": route.metadata.name,
            "namespace": route.metadata.namespace,
            "generation": route.metadata.generation,
        },
        "spec": route.spec.model_dump(by_alias=True, exclude_unset=True, mode="json"),
    }


def route_file_text(route: LLMRoute) -> str:
    """The ``route.yaml`` text, deterministic for equal routes."""
    return yaml.safe_dump(route_document(route), sort_keys=False)


def config_hash(route: LLMRoute) -> str:
    """Hash of the route file: what running sidecars pick up without a restart."""
    return hashlib.sha256(route_file_text(route).encode()).hexdigest()[:16]


def render_configmap(route: LLMRoute) -> dict[str, Any]:
    """The route's ConfigMap, owned by the route, holding ``route.yaml``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(route),
            "namespace": route.metadata.namespace,
            "labels": labels(route),
            "annotations": {f"{API_GROUP}/config-hash": config_hash(route)},
            "ownerReferences": [owner_reference(route)],
        },
        "data": {ROUTE_FILE_KEY: route_file_text(route)},
    }


def secret_names(route: LLMRoute) -> list[str]:
    """Secrets the sidecar reads (vendor key, client keys, JWKS), each mounted once, in a stable order."""
    spec = route.spec
    names: list[str] = []
    for upstream in spec.routed_upstreams:
        if upstream.api_key_secret_ref is not None:
            names.append(upstream.api_key_secret_ref.name)
    if spec.identity.keys_secret_ref is not None:
        names.append(spec.identity.keys_secret_ref.name)
    if spec.identity.jwt is not None and spec.identity.jwt.jwks_secret_ref is not None:
        names.append(spec.identity.jwt.jwks_secret_ref.name)
    return sorted(set(names))


def secret_volume_name(secret: str) -> str:
    """A pod volume name (a DNS label of at most 63 characters) for a Secret."""
    candidate = f"llmroute-secret-{secret}"
    if len(candidate) <= 63 and _DNS_LABEL.match(candidate):
        return candidate
    return f"llmroute-secret-{_digest(secret, 10)}"


def pricing_volume_name(configmap: str) -> str:
    """A pod volume name for the ConfigMap of spec.pricingConfigMapRef."""
    candidate = f"llmroute-pricing-{configmap}"
    if len(candidate) <= 63 and _DNS_LABEL.match(candidate):
        return candidate
    return f"llmroute-pricing-{_digest(configmap, 10)}"


def sidecar_volumes(route: LLMRoute) -> list[dict[str, Any]]:
    """Pod volumes the sidecar mounts: the route's ConfigMap, its Secrets, its price table ConfigMap."""
    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": configmap_name(route)}},
    ]
    volumes += [
        {"name": secret_volume_name(name), "secret": {"secretName": name}} for name in secret_names(route)
    ]
    pricing = route.spec.pricing_config_map_ref
    if pricing is not None:
        volumes.append({"name": pricing_volume_name(pricing.name), "configMap": {"name": pricing.name}})
    return volumes


def sidecar_container(
    route: LLMRoute,
    settings: OperatorSettings,
    traffic_port: int = TRAFFIC_PORT,
    admin_port: int = ADMIN_PORT,
) -> dict[str, Any]:
    """The sidecar container per the process contract (``llmroute-sidecar --route FILE ...``)."""
    env: list[dict[str, Any]] = [
        {"name": "LLMROUTE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "LLMROUTE_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if settings.redis_url:
        env.append({"name": "LLMROUTE_REDIS_URL", "value": settings.redis_url})
    mounts: list[dict[str, Any]] = [{"name": CONFIG_VOLUME, "mountPath": ROUTE_DIR, "readOnly": True}]
    mounts += [
        {"name": secret_volume_name(name), "mountPath": f"{SECRETS_DIR}/{name}", "readOnly": True}
        for name in secret_names(route)
    ]
    pricing = route.spec.pricing_config_map_ref
    if pricing is not None:
        mounts.append(
            {
                "name": pricing_volume_name(pricing.name),
                "mountPath": f"{SECRETS_DIR}/{CONFIGMAPS_SUBDIR}/{pricing.name}",
                "readOnly": True,
            }
        )
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "--route",
            f"{ROUTE_DIR}/{ROUTE_FILE_KEY}",
            "--listen",
            f"0.0.0.0:{traffic_port}",
            "--admin-listen",
            f"0.0.0.0:{admin_port}",
            "--secrets-dir",
            SECRETS_DIR,
        ],
        "ports": [
            {"name": "llmroute", "containerPort": traffic_port, "protocol": "TCP"},
            {"name": "llmroute-admin", "containerPort": admin_port, "protocol": "TCP"},
        ],
        "env": env,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": admin_port},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": admin_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": copy.deepcopy(settings.resources),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def sidecar_hash(route: LLMRoute, settings: OperatorSettings) -> str:
    """Hash of everything injection bakes into a pod; a change needs a rollout, limits do not.
    (Computed with the default ports: the ports a pod gets follow from the pod itself.)"""
    return _digest(
        {
            "container": sidecar_container(route, settings),
            "volumes": sidecar_volumes(route),
            "native": settings.native_sidecar,
        }
    )


# -- selectors ---------------------------------------------------------------------------------


def selector_matches(selector: LabelSelector | Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector (model or wire dict) selects these labels; an empty one selects none."""
    model = selector if isinstance(selector, LabelSelector) else LabelSelector.model_validate(selector)
    if not model.match_labels and not model.match_expressions:
        return False
    if any(labels.get(key) != value for key, value in model.match_labels.items()):
        return False
    for expression in model.match_expressions:
        present = expression.key in labels
        value = labels.get(expression.key)
        operator = expression.operator.value
        if operator == "In" and value not in expression.values:
            return False
        if operator == "NotIn" and present and value in expression.values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def label_selector_query(selector: LabelSelector) -> str:
    """The selector as a ``labelSelector`` query string (server-side pre-filter)."""
    parts = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for expression in selector.match_expressions:
        operator = expression.operator.value
        if operator == "Exists":
            parts.append(expression.key)
        elif operator == "DoesNotExist":
            parts.append(f"!{expression.key}")
        else:
            word = "in" if operator == "In" else "notin"
            parts.append(f"{expression.key} {word} ({','.join(expression.values)})")
    return ",".join(parts)


# -- pods --------------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def pod_labels(pod: Mapping[str, Any]) -> dict[str, str]:
    return dict(_meta(pod).get("labels") or {})


def pod_annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    return dict(_meta(pod).get("annotations") or {})


def opted_out(pod: Mapping[str, Any]) -> bool:
    """``llmroute.dev/inject: "false"`` on the pod."""
    return pod_annotations(pod).get(ANNOTATION_INJECT, "").strip().lower() == "false"


def has_sidecar(pod: Mapping[str, Any]) -> bool:
    """Whether the pod already runs an llmroute sidecar (as a container or an init container)."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    return any(container.get("name") == SIDECAR_NAME for container in containers)


TRAFFIC_PORT_CANDIDATES = (TRAFFIC_PORT, 15080, 18080, 28080)
ADMIN_PORT_CANDIDATES = (ADMIN_PORT, 15090, 19090, 29090)
ANNOTATION_TRAFFIC_PORT = f"{API_GROUP}/traffic-port"
"""Pod annotation: the port the sidecar's traffic listener uses in this pod."""
ANNOTATION_ADMIN_PORT = f"{API_GROUP}/admin-port"
"""Pod annotation: the port of the sidecar's admin endpoint in this pod."""


def _declared_ports(pod: Mapping[str, Any]) -> set[int]:
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    return {
        int(port["containerPort"])
        for container in containers
        if container.get("name") != SIDECAR_NAME
        for port in container.get("ports") or []
        if isinstance(port.get("containerPort"), int)
    }


def _annotated_port(pod: Mapping[str, Any], key: str) -> int | None:
    raw = pod_annotations(pod).get(key, "").strip()
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= 65535 else None


def sidecar_ports(pod: Mapping[str, Any]) -> tuple[int, int, list[str]]:
    """(traffic, admin) ports for the pod's sidecar, and notes for the person creating it.

    The pod's ``llmroute.dev/traffic-port`` / ``llmroute.dev/admin-port`` annotations win; otherwise
    the defaults (8080, 9090), moved to the next candidate when another container declares them
    (two listeners on one port would crash one of them)."""
    taken = _declared_ports(pod)
    notes: list[str] = []
    chosen: list[int] = []
    for key, candidates, what in (
        (ANNOTATION_TRAFFIC_PORT, TRAFFIC_PORT_CANDIDATES, "traffic"),
        (ANNOTATION_ADMIN_PORT, ADMIN_PORT_CANDIDATES, "admin"),
    ):
        port = _annotated_port(pod, key)
        if port is None:
            free = [
                candidate for candidate in candidates if candidate not in taken and candidate not in chosen
            ]
            port = free[0] if free else candidates[0]
            if port != candidates[0]:
                notes.append(
                    f"llmroute: port {candidates[0]} is declared by another container; the sidecar's {what} "
                    f"port is {port} (set the {key} annotation to choose)"
                )
        if port in taken or port in chosen:
            notes.append(f"llmroute: the sidecar's {what} port {port} is also used by another container")
        chosen.append(port)
    return chosen[0], chosen[1], notes


def admin_port(pod: Mapping[str, Any]) -> int:
    """The port of the pod's sidecar admin endpoint (its ``llmroute-admin`` port), else the default."""
    spec = pod.get("spec") or {}
    for container in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        if container.get("name") == SIDECAR_NAME:
            for port in container.get("ports") or []:
                if port.get("name") == "llmroute-admin" and isinstance(port.get("containerPort"), int):
                    return int(port["containerPort"])
    return ADMIN_PORT


def routes_selecting(pod: Mapping[str, Any], routes: Iterable[LLMRoute]) -> list[LLMRoute]:
    """Routes in the pod's namespace whose selector matches the pod, sorted by name."""
    namespace = _meta(pod).get("namespace")
    labels = pod_labels(pod)
    found = [
        route
        for route in routes
        if route.metadata.namespace == namespace and selector_matches(route.spec.selector, labels)
    ]
    return sorted(found, key=lambda route: route.metadata.name)


@dataclass(frozen=True)
class Injection:
    """What the webhook does to one pod: a JSONPatch (maybe empty) and why."""

    patch: list[dict[str, Any]] = field(default_factory=list)
    route: str | None = None
    reason: str = "NotSelected"
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Warnings for the admission response (e.g. the sidecar moved to a free port)."""


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def plan_injection(
    pod: Mapping[str, Any], routes: Sequence[LLMRoute], settings: OperatorSettings
) -> Injection:
    """Decide and render the injection of one pod (reasons: Injected, NotSelected, OptedOut,
    AlreadyInjected, Conflict)."""
    selecting = routes_selecting(pod, routes)
    if not selecting:
        return Injection(reason="NotSelected")
    if opted_out(pod):
        return Injection(reason="OptedOut")
    if len(selecting) > 1:
        return Injection(reason="Conflict", conflicts=[route.metadata.name for route in selecting])
    route = selecting[0]
    if has_sidecar(pod):
        return Injection(route=route.metadata.name, reason="AlreadyInjected")

    ops: list[dict[str, Any]] = []
    meta = _meta(pod)
    traffic_port, admin, notes = sidecar_ports(pod)
    annotations = {
        ANNOTATION_ROUTE: route.metadata.name,
        ANNOTATION_CONFIG_HASH: sidecar_hash(route, settings),
        ANNOTATION_TRAFFIC_PORT: str(traffic_port),
        ANNOTATION_ADMIN_PORT: str(admin),
    }
    if "metadata" not in pod:
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": annotations}})
    elif not meta.get("annotations"):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
    else:
        ops += [
            {"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value}
            for key, value in annotations.items()
        ]

    spec = pod.get("spec") or {}
    container = sidecar_container(route, settings, traffic_port, admin)
    if settings.native_sidecar:
        container["restartPolicy"] = "Always"
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": container})

    volumes = sidecar_volumes(route)
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": volume} for volume in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    return Injection(patch=ops, route=route.metadata.name, reason="Injected", notes=notes)


def pod_patch(
    pod: Mapping[str, Any], routes: Sequence[LLMRoute], settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The JSONPatch that injects the sidecar into a pod; empty when nothing is to be done."""
    return plan_injection(pod, routes, settings).patch
