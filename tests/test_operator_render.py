"""The operator's pure functions: ConfigMap, sidecar, pod patch, selectors, validation, status, rollout."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from llmroute_operator import render, rollout, status
from llmroute_operator.settings import OperatorSettings, SettingsError
from llmroute_sidecar.api import LLMRoute, parse_route
from llmroute_sidecar.api.manifest import parse_route_text

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = OperatorSettings(sidecar_image="registry.test/llmroute-sidecar", redis_url="redis://redis:6379/0")
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def route_body(name: str = "chat", labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": name, "namespace": "team-a", "generation": 3, "uid": f"uid-{name}"},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "chat-api"}},
            "upstream": {"url": "http://127.0.0.1:8000"},
            "limits": [{"name": "vendor", "requestsPerMinute": 60}],
            **spec,
        },
    }
    return body


def route(**kwargs: Any) -> LLMRoute:
    return status.parse_body(route_body(**kwargs))


def pod(
    name: str = "chat-1",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    namespace: str = "team-a",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {"app": "chat-api"}}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }


def inject(
    pod_: dict[str, Any], routes: list[LLMRoute], settings: OperatorSettings = SETTINGS
) -> dict[str, Any]:
    patched: dict[str, Any] = jsonpatch.apply_patch(pod_, render.pod_patch(pod_, routes, settings))
    return patched


# -- ConfigMap and hashes ----------------------------------------------------------------------


def test_configmap_holds_the_route_file_the_sidecar_reads_and_is_owned_by_the_route() -> None:
    chat = route()
    cm = render.render_configmap(chat)
    assert cm["metadata"]["name"] == "llmroute-chat"
    assert cm["metadata"]["namespace"] == "team-a"
    assert cm["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "llmroute.dev/v1alpha1",
            "kind": "LLMRoute",
            "name": "chat",
            "uid": "uid-chat",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "llmroute-operator"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == "chat"
    document = yaml.safe_load(cm["data"]["route.yaml"])
    assert set(document) == {"apiVersion", "kind", "metadata", "spec"}
    assert document["metadata"] == {"name": "chat", "namespace": "team-a", "generation": 3}
    # The sidecar's own parser reads it back as the same route.
    reread = parse_route_text(cm["data"]["route.yaml"])
    assert reread.spec == chat.spec
    assert reread.metadata.generation == 3


def test_every_example_renders_a_configmap_the_sidecar_accepts() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        parsed = parse_route_text(path.read_text(), source=str(path))
        text = render.render_configmap(parsed)["data"]["route.yaml"]
        assert parse_route_text(text).spec == parsed.spec, path.name


def test_config_hash_follows_limits_but_sidecar_hash_does_not() -> None:
    before = route()
    after = route(limits=[{"name": "vendor", "requestsPerMinute": 120}])
    assert render.config_hash(before) == render.config_hash(route())
    assert render.config_hash(before) != render.config_hash(after)
    assert render.sidecar_hash(before, SETTINGS) == render.sidecar_hash(after, SETTINGS)
    newer_image = OperatorSettings(sidecar_image="registry.test/llmroute-sidecar", sidecar_version="0.2.0")
    assert render.sidecar_hash(before, SETTINGS) != render.sidecar_hash(before, newer_image)


def test_long_names_are_shortened_into_valid_object_names() -> None:
    long = "a" * 250
    name = render.configmap_name_for(long)
    assert len(name) <= 253 and name.startswith("llmroute-a")
    assert render.configmap_name_for(long) == name
    assert len(render.secret_volume_name("x." * 40)) <= 63


# -- sidecar container -------------------------------------------------------------------------


def test_sidecar_container_follows_the_process_contract() -> None:
    outbound = route(
        upstream={"url": "https://api.openai.com", "apiKeySecretRef": {"name": "vendor", "key": "k"}}
    )
    container = render.sidecar_container(outbound, SETTINGS)
    assert container["name"] == "llmroute-sidecar"
    assert container["image"] == "registry.test/llmroute-sidecar:0.1.0"
    assert container["args"] == [
        "--route",
        "/etc/llmroute/route/route.yaml",
        "--listen",
        "0.0.0.0:8080",
        "--admin-listen",
        "0.0.0.0:9090",
        "--secrets-dir",
        "/etc/llmroute/secrets",
    ]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("llmroute", 8080),
        ("llmroute-admin", 9090),
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    env = {item["name"]: item for item in container["env"]}
    assert env["LLMROUTE_REDIS_URL"]["value"] == "redis://redis:6379/0"
    assert env["LLMROUTE_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["LLMROUTE_POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/llmroute/route": "llmroute-config",
        "/etc/llmroute/secrets/vendor": "llmroute-secret-vendor",
    }
    volumes = render.sidecar_volumes(outbound)
    assert volumes == [
        {"name": "llmroute-config", "configMap": {"name": "llmroute-chat"}},
        {"name": "llmroute-secret-vendor", "secret": {"secretName": "vendor"}},
    ]


def test_sidecar_without_redis_has_no_redis_env_and_a_full_image_reference_is_kept() -> None:
    settings = OperatorSettings(sidecar_image="registry.test/sidecar@sha256:abc")
    container = render.sidecar_container(route(), settings)
    assert container["image"] == "registry.test/sidecar@sha256:abc"
    assert "LLMROUTE_REDIS_URL" not in {item["name"] for item in container["env"]}


def test_keys_and_vendor_secrets_are_each_mounted_once() -> None:
    both = route(
        upstream={"url": "http://127.0.0.1:8000", "apiKeySecretRef": {"name": "keys", "key": "vendor"}},
        identity={"keysSecretRef": {"name": "keys"}},
    )
    assert render.secret_names(both) == ["keys"]
    assert [v["name"] for v in render.sidecar_volumes(both)] == ["llmroute-config", "llmroute-secret-keys"]


def test_a_price_table_configmap_is_mounted_where_the_sidecar_reads_it() -> None:
    priced = route(
        pricingConfigMapRef={"name": "keys", "key": "prices.yaml"},
        identity={"keysSecretRef": {"name": "keys"}},
    )
    volumes = render.sidecar_volumes(priced)
    assert volumes[-1] == {"name": "llmroute-pricing-keys", "configMap": {"name": "keys"}}
    mounts = render.sidecar_container(priced, OperatorSettings())["volumeMounts"]
    paths = {m["name"]: m["mountPath"] for m in mounts}
    assert paths["llmroute-pricing-keys"] == "/etc/llmroute/secrets/_configmaps/keys"  # never a Secret's path
    assert paths["llmroute-secret-keys"] == "/etc/llmroute/secrets/keys"
    assert len({v["name"] for v in volumes}) == len(volumes)


def test_a_jwks_secret_is_mounted_beside_the_key_secret() -> None:
    jwt = {
        "issuer": "https://idp",
        "audience": ["a"],
        "jwksSecretRef": {"name": "idp-jwks", "key": "jwks.json"},
    }
    both = route(identity={"keysSecretRef": {"name": "keys"}, "jwt": jwt})
    assert render.secret_names(both) == ["idp-jwks", "keys"]
    by_url = route(identity={"jwt": {**jwt, "jwksSecretRef": None, "jwksUrl": "https://idp/jwks.json"}})
    assert render.secret_names(by_url) == []


# -- pod patch ---------------------------------------------------------------------------------


def test_patch_injects_a_native_sidecar_with_volumes_and_annotations() -> None:
    chat = route()
    patched = inject(pod(), [chat])
    (sidecar,) = patched["spec"]["initContainers"]
    assert sidecar == {**render.sidecar_container(chat, SETTINGS), "restartPolicy": "Always"}
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    assert patched["spec"]["volumes"] == render.sidecar_volumes(chat)
    assert patched["metadata"]["annotations"] == {
        "llmroute.dev/route": "chat",
        "llmroute.dev/config-hash": render.sidecar_hash(chat, SETTINGS),
        "llmroute.dev/traffic-port": "8080",
        "llmroute.dev/admin-port": "9090",
    }


def test_patch_applied_twice_adds_nothing_the_second_time() -> None:
    chat = route()
    once = inject(pod(), [chat])
    assert render.pod_patch(once, [chat], SETTINGS) == []
    assert render.plan_injection(once, [chat], SETTINGS).reason == "AlreadyInjected"


def test_patch_keeps_existing_init_containers_volumes_and_annotations() -> None:
    chat = route()
    original = pod(annotations={"team": "a"})
    original["spec"]["initContainers"] = [{"name": "migrate", "image": "m:1"}]
    original["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    patched = inject(original, [chat])
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["llmroute-sidecar", "migrate"]
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["data", "llmroute-config"]
    assert patched["metadata"]["annotations"]["team"] == "a"
    assert patched["metadata"]["annotations"]["llmroute.dev/route"] == "chat"


def test_regular_container_when_native_sidecars_are_off() -> None:
    settings = OperatorSettings(native_sidecar=False)
    patched = inject(pod(), [route()], settings)
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", "llmroute-sidecar"]
    assert "restartPolicy" not in patched["spec"]["containers"][1]
    assert "initContainers" not in patched["spec"]


def test_non_matching_pods_and_other_namespaces_are_untouched() -> None:
    chat = route()
    assert render.pod_patch(pod(labels={"app": "other"}), [chat], SETTINGS) == []
    assert render.pod_patch(pod(namespace="team-b"), [chat], SETTINGS) == []
    assert render.plan_injection(pod(labels={"app": "other"}), [chat], SETTINGS).reason == "NotSelected"


def test_opt_out_annotation() -> None:
    opted = pod(annotations={"llmroute.dev/inject": "false"})
    plan = render.plan_injection(opted, [route()], SETTINGS)
    assert (plan.patch, plan.reason) == ([], "OptedOut")


def test_two_routes_selecting_one_pod_is_a_conflict_without_injection() -> None:
    first = route(name="chat")
    second = route(name="chat-shadow", labels={"app": "chat-api"})
    plan = render.plan_injection(pod(), [second, first], SETTINGS)
    assert plan.patch == []
    assert plan.reason == "Conflict"
    assert plan.conflicts == ["chat", "chat-shadow"]


# -- selectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"app": "a"}}, {"app": "a", "x": "y"}, True),
        ({"matchLabels": {"app": "a"}}, {"app": "b"}, False),
        (
            {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]},
            {"tier": "gold"},
            True,
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold"]}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]},
            {"tier": "gold"},
            False,
        ),
        ({"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, {"canary": ""}, True),
        ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}, {"canary": "1"}, False),
        (
            {
                "matchLabels": {"app": "a"},
                "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}],
            },
            {"app": "a"},
            True,
        ),
    ],
)
def test_selector_matches(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert render.selector_matches(selector, labels) is expected


def test_label_selector_query() -> None:
    selector = route(
        selector={
            "matchLabels": {"app": "a"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    ).spec.selector
    assert render.label_selector_query(selector) == "app=a,tier in (gold,silver),!canary"


# -- validation --------------------------------------------------------------------------------


def test_valid_routes_and_examples_have_no_problems() -> None:
    assert status.validate_route(route_body()) == []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "LLMRoute":
                assert status.validate_route(document) == [], path.name


def test_validation_messages_name_the_field_in_user_words() -> None:
    duplicate = route_body(
        limits=[{"name": "a", "requestsPerMinute": 1}, {"name": "a", "requestsPerMinute": 2}]
    )
    assert status.validate_route(duplicate) == ["spec: limit names must be unique; repeated: a"]
    undefined_tier = route_body(identity={"defaultTier": "gold"})
    (message,) = status.validate_route(undefined_tier)
    assert "identity.defaultTier 'gold' is not defined in tiers" in message
    empty_selector = route_body()
    empty_selector["spec"]["selector"] = {}
    (message,) = status.validate_route(empty_selector)
    assert message.startswith("spec.selector: selector is empty")
    bad_key = route_body(limits=[{"name": "a", "key": "client-ip", "requestsPerMinute": 1}])
    assert status.validate_route(bad_key) == [
        "spec.limits[0].key: 'client-ip' must be 'route', 'apiKey', 'header:<Header-Name>' "
        "or 'claim:<claim-name>'"
    ]


def test_status_written_by_the_operator_does_not_fail_validation() -> None:
    body = route_body()
    body["status"] = {"podSummary": "1/1", "observedGeneration": 3}
    assert status.validate_route(body) == []


# -- status ------------------------------------------------------------------------------------


def ready_pod(name: str, chat: LLMRoute, ready: bool = True) -> dict[str, Any]:
    injected = inject(pod(name), [chat])
    injected["status"] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return injected


def observe(chat: LLMRoute, pods: list[dict[str, Any]], **kwargs: Any) -> status.Observation:
    return status.Observation(pods=pods, sidecar_hash=render.sidecar_hash(chat, SETTINGS), **kwargs)


def test_status_counts_pods_and_reports_ready() -> None:
    chat = route()
    pods = [
        ready_pod("a", chat),
        ready_pod("b", chat, ready=False),
        pod("c"),
        pod("x", labels={"app": "other"}),
    ]
    result = status.route_status(chat, observe(chat, pods), None, NOW)
    assert result["observedGeneration"] == 3
    assert result["pods"] == {"matched": 3, "injected": 2, "ready": 1}
    assert result["podSummary"] == "1/3"
    assert result["configHash"] == render.config_hash(chat)
    assert result["podsNeedingRollout"] == ["c"]
    ready, degraded = result["conditions"]
    assert ready["type"] == "Ready" and ready["status"] == "True" and ready["reason"] == "Reconciled"
    assert ready["observedGeneration"] == 3 and ready["lastTransitionTime"] == NOW
    assert degraded["type"] == "Degraded" and degraded["status"] == "True"
    assert degraded["reason"] == "PodsWithoutSidecar" and "c" in degraded["message"]
    # The status is valid per the CRD's status model.
    from llmroute_sidecar.api import LLMRouteStatus

    LLMRouteStatus.model_validate({k: v for k, v in result.items() if k != "podSummary"})


def test_conditions_keep_last_transition_time_while_status_is_unchanged() -> None:
    chat = route()
    first = status.route_status(chat, observe(chat, [ready_pod("a", chat)]), None, NOW)
    again = status.route_status(
        chat, observe(chat, [ready_pod("a", chat), ready_pod("b", chat)]), first, LATER
    )
    assert [c["lastTransitionTime"] for c in again["conditions"]] == [NOW, NOW]
    assert status.transition_events(first, again) == []
    worse = status.route_status(chat, observe(chat, [ready_pod("a", chat), pod("c")]), again, LATER)
    assert worse["conditions"][0]["lastTransitionTime"] == NOW
    assert worse["conditions"][1]["lastTransitionTime"] == LATER
    assert status.transition_events(again, worse) == [
        ("Warning", "PodsWithoutSidecar", worse["conditions"][1]["message"])
    ]


def test_first_status_posts_one_ready_event() -> None:
    chat = route()
    first = status.route_status(chat, observe(chat, []), None, NOW)
    assert status.transition_events(None, first) == [
        ("Normal", "Reconciled", first["conditions"][0]["message"])
    ]


def test_selector_conflict_and_invalid_spec_are_ready_false() -> None:
    chat = route()
    other = route(name="shadow")
    conflicts = status.find_conflicts(chat, [chat, other], [pod("a")])
    assert conflicts == ["shadow"]
    result = status.route_status(chat, observe(chat, [pod("a")], conflicts=conflicts), None, NOW)
    assert result["conditions"][0]["status"] == "False"
    assert result["conditions"][0]["reason"] == "SelectorConflict"
    invalid = status.invalid_status(route_body(), "spec: limit names must be unique", result, LATER)
    assert invalid["conditions"][0]["reason"] == "InvalidSpec"
    assert invalid["conditions"][0]["lastTransitionTime"] == NOW  # was already False
    assert invalid["observedGeneration"] == 3


def test_recommended_replicas_from_hints_clamped() -> None:
    scaled = route(autoscaling={"targetInFlightPerPod": 10, "minReplicas": 2, "maxReplicas": 5})
    assert status.recommended_replicas(scaled, [{"inflightAvg": 12.5}, {"inflightAvg": 13}]) == 3
    assert status.recommended_replicas(scaled, [{"inflightAvg": 0}]) == 2
    assert status.recommended_replicas(scaled, [{"inflightAvg": 400}]) == 5
    assert status.recommended_replicas(scaled, []) is None
    assert status.recommended_replicas(route(), [{"inflightAvg": 3}]) is None
    hints = [{"inflightAvg": 25, "generation": 3}]
    result = status.route_status(scaled, observe(scaled, [ready_pod("a", scaled)], hints=hints), None, NOW)
    assert result["recommendedReplicas"] == 3
    assert result["configGeneration"] == 3
    kept = status.route_status(scaled, observe(scaled, [ready_pod("a", scaled)]), result, LATER)
    assert kept["recommendedReplicas"] == 3  # no hints collected this time: keep the last one


# -- rollout -----------------------------------------------------------------------------------


def owned(obj: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [{"kind": kind, "name": name, "controller": True}]
    return obj


def test_rollout_targets_follow_owner_references() -> None:
    pods = [
        owned(pod("web-1"), "ReplicaSet", "web-5d8f"),
        owned(pod("web-2"), "ReplicaSet", "web-5d8f"),
        owned(pod("db-0"), "StatefulSet", "db"),
        owned(pod("job-1"), "Job", "once"),
        owned(pod("orphan-rs"), "ReplicaSet", "bare"),
    ]
    replicasets = {
        "web-5d8f": owned({"metadata": {"name": "web-5d8f"}}, "Deployment", "web"),
        "bare": {"metadata": {"name": "bare"}},
    }
    assert rollout.replicaset_names(pods) == ["bare", "web-5d8f"]
    assert [str(w) for w in rollout.rollout_targets(pods, replicasets)] == [
        "Deployment/web",
        "StatefulSet/db",
    ]


def test_restart_patch_is_recorded_so_one_hash_restarts_once() -> None:
    patch = rollout.restart_patch("abc", NOW)
    deployment = {"spec": {"template": {"metadata": {"annotations": {}}}}}
    assert not rollout.already_restarted(deployment, "abc")
    annotations = patch["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"llmroute.dev/restartedAt": NOW, "llmroute.dev/restartedFor": "abc"}
    assert rollout.already_restarted(patch, "abc")
    assert not rollout.already_restarted(patch, "def")


# -- settings ----------------------------------------------------------------------------------


def test_settings_from_env_and_overrides() -> None:
    env = {
        "LLMROUTE_SIDECAR_IMAGE": "r/s",
        "LLMROUTE_REDIS_URL": "redis://r:6379/0",
        "LLMROUTE_NATIVE_SIDECAR": "false",
        "LLMROUTE_WEBHOOK_FAILURE_POLICY": "Fail",
    }
    settings = OperatorSettings.from_env(env)
    assert (settings.image, settings.redis_url, settings.native_sidecar) == (
        "r/s:0.1.0",
        "redis://r:6379/0",
        False,
    )
    assert settings.webhook_failure_policy == "Fail"
    assert OperatorSettings.from_env(env, sidecar_image="x/y:2", redis_url=None).image == "x/y:2"
    with pytest.raises(SettingsError, match="Ignore or Fail"):
        OperatorSettings.from_env({"LLMROUTE_WEBHOOK_FAILURE_POLICY": "Maybe"})
    with pytest.raises(SettingsError, match="true or false"):
        OperatorSettings.from_env({"LLMROUTE_NATIVE_SIDECAR": "perhaps"})


def test_parse_body_ignores_status() -> None:
    body = route_body()
    body["status"] = {"podSummary": "0/0"}
    assert status.parse_body(body) == parse_route(route_body())


def test_the_sidecar_moves_off_ports_the_app_declares() -> None:
    app_on_8080 = pod()
    app_on_8080["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}, {"containerPort": 15090}]
    plan = render.plan_injection(app_on_8080, [route()], SETTINGS)
    patched = jsonpatch.apply_patch(app_on_8080, plan.patch)
    (sidecar,) = patched["spec"]["initContainers"]
    assert sidecar["args"][sidecar["args"].index("--listen") + 1] == "0.0.0.0:15080"
    assert sidecar["args"][sidecar["args"].index("--admin-listen") + 1] == "0.0.0.0:9090"
    assert {"name": "llmroute", "containerPort": 15080, "protocol": "TCP"} in sidecar["ports"]
    assert patched["metadata"]["annotations"]["llmroute.dev/traffic-port"] == "15080"
    assert render.admin_port(patched) == 9090
    (note,) = plan.notes
    assert "port 8080 is declared by another container" in note and "15080" in note
    # The rollout hash does not depend on the ports a pod gets: no restart loop for such pods.
    hash_annotation = patched["metadata"]["annotations"]["llmroute.dev/config-hash"]
    assert hash_annotation == render.sidecar_hash(route(), SETTINGS)


def test_port_annotations_choose_the_sidecars_ports() -> None:
    chosen = pod()
    chosen["metadata"]["annotations"] = {
        "llmroute.dev/traffic-port": "7000",
        "llmroute.dev/admin-port": "7001",
    }
    plan = render.plan_injection(chosen, [route()], SETTINGS)
    (sidecar,) = jsonpatch.apply_patch(chosen, plan.patch)["spec"]["initContainers"]
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 7001
    assert "0.0.0.0:7000" in sidecar["args"]
    assert plan.notes == []
    clash = pod()
    clash["spec"]["containers"][0]["ports"] = [{"containerPort": 7000}]
    clash["metadata"]["annotations"] = {"llmroute.dev/traffic-port": "7000"}
    (note,) = render.plan_injection(clash, [route()], SETTINGS).notes
    assert "traffic port 7000 is also used by another container" in note
