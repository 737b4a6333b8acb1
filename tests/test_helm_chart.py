"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) for the default values and the
variants people use, and checked against the code it deploys: the operator's CLI parses every
argument, the code reads every ``LLMROUTE_*`` variable, RBAC grants exactly the operator's API calls
and kopf's needs, the webhook rules are the operator's registered handlers, and ``lookup`` keeps a
live caBundle across upgrades (against the Kubernetes emulator)."""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import re
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import helm_python as helm
import kopf
import pytest
import yaml

from llmroute_operator import cli, crd, kube
from llmroute_operator import handlers as operator_handlers
from llmroute_operator.render import ANNOTATION_INJECT, selector_matches
from llmroute_operator.settings import OperatorSettings
from llmroute_sidecar.api import API_GROUP, API_VERSION, PLURAL
from tests.support.kube_emulator import EmulatorThread, write_kubeconfig
from tests.support.kube_schema import structural_violations

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llmroute"
RELEASE, NAMESPACE = "llmroute", "llmroute-system"
FULLNAME = "llmroute"  # the release name already contains the chart name
DIGEST = "sha256:" + "ab" * 32

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "one-replica": {"replicaCount": 1},
    "fail-closed": {"webhook": {"failurePolicy": "Fail"}},
    "everything-set": {
        "image": {"repository": "registry.local:5000/op", "digest": DIGEST},
        "sidecar": {
            "image": {"repository": "registry.local:5000/sc", "tag": "1.2.3"},
            "native": False,
            "redisUrl": "redis://redis.infra:6379/0",
        },
        "resyncSeconds": 5,
        "peering": {"name": "llmroute-b", "lifetimeSeconds": 20},
        "verbose": True,
        "extraArgs": ["--liveness", "http://0.0.0.0:8081/healthz"],
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
        },
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "alertLabels": {"team": "ml"}},
        "webhook": {
            "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
            "excludeNamespaces": ["legacy"],
            "namespaceSelector": {"matchLabels": {"llmroute.dev/injection": "enabled"}},
        },
    },
}


# -- rendering -------------------------------------------------------------------------------------


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def _documents(manifests: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@functools.cache
def _rendered(variant: str) -> tuple[dict[str, Any], ...]:
    manifests = _chart().render(VARIANTS[variant], name=RELEASE, namespace=NAMESPACE, is_install=True)
    return tuple(_documents(manifests))


def render(variant: str) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(doc)) for doc in _rendered(variant)]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = of_kind(docs, kind)
    return found


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def parsed_args(docs: list[dict[str, Any]]) -> Any:
    args = operator_container(docs)["args"]
    assert all(isinstance(arg, str) for arg in args), args
    try:
        return cli.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"llmroute-operator rejects the chart's arguments {args}")


def plain_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in operator_container(docs)["env"] if "value" in e}


all_variants = pytest.mark.parametrize("variant", list(VARIANTS))


# -- the chart as a package --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chart_lints_clean(variant: str) -> None:
    report = helm.lint(str(CHART), VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_versions_follow_the_package() -> None:
    meta = _chart().metadata
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == version("llmroute") == OperatorSettings().sidecar_version


def test_values_schema_rejects_what_the_operator_would_reject() -> None:
    chart = _chart()
    for bad in (
        {"webhook": {"failurePolicy": "Sometimes"}},
        {"replicaCount": 0},
        {"watchNamespaces": ["Team_A"]},
        {"webhook": {"timeoutSeconds": 31}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def _crds() -> dict[str, dict[str, Any]]:
    docs = [doc for entry in _chart().crds for doc in yaml.safe_load_all(entry["data"]) if doc]
    return {doc["metadata"]["name"]: doc for doc in docs}


def test_chart_ships_the_generated_crd_and_kopfs_peering_crds() -> None:
    crds = _crds()
    assert set(crds) == {f"{PLURAL}.{API_GROUP}", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert crds[f"{PLURAL}.{API_GROUP}"] == crd.custom_resource_definition()


def test_peering_crds_serve_what_kopf_looks_for() -> None:
    from kopf._cogs.structs import references  # the selectors kopf's peering uses

    crds = _crds()
    for selector, scope in (
        (references.CLUSTER_PEERINGS_K, "Cluster"),
        (references.NAMESPACED_PEERINGS_K, "Namespaced"),
    ):
        definition = crds[f"{selector.any_name}.{selector.group}"]
        spec = definition["spec"]
        assert (spec["group"], spec["names"]["plural"], spec["scope"]) == (
            selector.group,
            selector.any_name,
            scope,
        )
        (served,) = spec["versions"]
        assert served["name"] == selector.version and served["served"] and served["storage"]
        schema = served["schema"]["openAPIV3Schema"]
        assert list(structural_violations(schema)) == []
        # kopf writes its keep-alives into .status with a plain patch of the object itself
        assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
        assert "status" not in served.get("subresources", {})


def _keys(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Every dotted key of the values and whether it is a leaf (a scalar, a list or an empty map)."""
    for key, value in values.items():
        branch = isinstance(value, dict) and bool(value)
        yield prefix + key, not branch
        if branch:
            yield from _keys(value, f"{prefix}{key}.")


def _commented_keys(text: str) -> set[str]:
    """Dotted keys of values.yaml with a ``# --`` comment block right above them (helm-docs style)."""
    stack: list[tuple[int, str]] = []
    commented, pending = set(), False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending = pending or stripped.startswith("# --")
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if match:
            while stack and stack[-1][0] >= len(match[1]):
                stack.pop()
            stack.append((len(match[1]), match[2]))
            if pending:
                commented.add(".".join(key for _, key in stack))
        pending = False
    return commented


def test_every_value_is_commented_and_in_the_install_docs_table() -> None:
    text = (CHART / "values.yaml").read_text()
    keys = dict(_keys(yaml.safe_load(text)))
    table = (ROOT / "docs" / "install.md").read_text().split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", table, re.M))
    assert documented - set(keys) == set(), "docs/install.md documents values the chart does not have"
    assert documented == _commented_keys(text), "the table and the values.yaml comments differ"
    for key, leaf in keys.items():
        parts = key.split(".")
        covered = any(".".join(parts[:n]) in documented for n in range(1, len(parts) + 1))
        assert covered or not leaf, f"value {key} is not documented"


# -- the Deployment ---------------------------------------------------------------------------------


@all_variants
def test_every_argument_parses_with_the_operator_cli(variant: str) -> None:
    docs = render(variant)
    args = parsed_args(docs)
    values = _chart().merge_values(VARIANTS[variant])
    assert args.peering == values["peering"]["name"] and not args.standalone
    assert args.namespace == values["watchNamespaces"]
    assert args.all_namespaces is (not values["watchNamespaces"])
    assert args.webhook_listen == "0.0.0.0:9443" and args.metrics_listen == "0.0.0.0:8080"
    assert not args.webhook_insecure
    assert args.verbose is values["verbose"]


def test_self_managed_tls_names_the_objects_the_chart_renders() -> None:
    docs = render("default")
    args = parsed_args(docs)
    assert args.webhook_service == one(docs, "Service")["metadata"]["name"]
    assert args.webhook_configuration == one(docs, "MutatingWebhookConfiguration")["metadata"]["name"]
    assert args.webhook_configuration == one(docs, "ValidatingWebhookConfiguration")["metadata"]["name"]
    assert args.webhook_cert_dir.startswith("/tmp/")  # the writable emptyDir
    (secret_rule,) = [r for r in _all_rules(docs) if r.resource == "secrets" and r.verb == "patch"]
    assert secret_rule.names == (args.webhook_tls_secret,)
    assert args.webhook_cert is None and args.webhook_key is None


@pytest.mark.parametrize("variant", ["cert-manager", "everything-set"])
def test_cert_manager_mode_serves_the_certificates_secret(variant: str) -> None:
    docs = render(variant)
    args = parsed_args(docs)
    assert args.webhook_tls_secret is None and args.webhook_configuration is None
    certificate = one(docs, "Certificate")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName"))
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    (mount,) = [m for m in operator_container(docs)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert args.webhook_cert == f"{mount['mountPath']}/tls.crt"
    assert args.webhook_key == f"{mount['mountPath']}/tls.key"
    service = one(docs, "Service")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        annotations = one(docs, kind)["metadata"]["annotations"]
        assert (
            annotations["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{certificate['metadata']['name']}"
        )
    issuers = of_kind(docs, "Issuer")
    if VARIANTS[variant]["webhook"]["certManager"].get("issuerRef"):
        assert issuers == []
        assert certificate["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}
    else:
        (issuer,) = issuers
        assert issuer["spec"] == {"selfSigned": {}}
        assert certificate["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]


@all_variants
def test_every_llmroute_variable_the_chart_sets_is_read_by_the_code(variant: str) -> None:
    sources = "\n".join(
        path.read_text()
        for package in ("operator/llmroute_operator", "sidecar/llmroute_sidecar")
        for path in (ROOT / package).rglob("*.py")
    )
    names = [e["name"] for e in operator_container(render(variant))["env"]]
    assert len(names) == len(set(names))
    ours = [name for name in names if name.startswith("LLMROUTE_")]
    assert ours
    for name in ours:
        assert re.search(rf"[\"']{name}[\"']", sources), f"the chart sets {name}, which no code reads"
    namespace = next(
        e for e in operator_container(render(variant))["env"] if e["name"] == "LLMROUTE_OPERATOR_NAMESPACE"
    )
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_the_operator_resolves_the_charts_sidecar_settings() -> None:
    default = OperatorSettings.from_env(plain_env(render("default")))
    assert default.image == "ghcr.io/llmroute/llmroute-sidecar:0.1.0"
    assert (default.native_sidecar, default.redis_url, default.webhook_failure_policy) == (
        True,
        None,
        "Ignore",
    )

    custom = plain_env(render("everything-set"))
    settings = OperatorSettings.from_env(custom)
    assert settings.image == "registry.local:5000/sc:1.2.3"
    assert (settings.native_sidecar, settings.redis_url) == (False, "redis://redis.infra:6379/0")
    assert (custom["LLMROUTE_RESYNC_SECONDS"], custom["LLMROUTE_PEERING_LIFETIME_SECONDS"]) == ("5", "20")
    assert operator_container(render("everything-set"))["image"] == f"registry.local:5000/op@{DIGEST}"

    digest = {"sidecar": {"image": {"digest": DIGEST}}}
    manifests = _chart().render(digest, name=RELEASE, namespace=NAMESPACE)
    env = plain_env(_documents(manifests))
    assert OperatorSettings.from_env(env).image == f"ghcr.io/llmroute/llmroute-sidecar@{DIGEST}"

    assert OperatorSettings.from_env(plain_env(render("fail-closed"))).webhook_failure_policy == "Fail"


@all_variants
def test_containers_run_non_root_on_a_read_only_filesystem(variant: str) -> None:
    docs = render(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        # the only writable place: an emptyDir at /tmp (the self-managed certificate files go there)
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert not [
            m for m in container["volumeMounts"] if m["mountPath"] != "/tmp" and not m.get("readOnly")
        ]


def _container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


@all_variants
def test_ports_probes_and_service_line_up(variant: str) -> None:
    docs = render(variant)
    container, args = operator_container(docs), parsed_args(docs)
    webhook_port = int(args.webhook_listen.rsplit(":", 1)[1])
    metrics_port = int(args.metrics_listen.rsplit(":", 1)[1])
    assert _container_port(container, "webhook") == webhook_port
    assert _container_port(container, "metrics") == metrics_port
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz" and _container_port(container, liveness["port"]) == metrics_port
    # no webhook traffic to a replica that does not listen with a certificate yet
    assert _container_port(container, container["readinessProbe"]["tcpSocket"]["port"]) == webhook_port

    service = one(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["webhook"]["port"] == 443
    assert _container_port(container, ports["webhook"]["targetPort"]) == webhook_port
    assert _container_port(container, ports["metrics"]["targetPort"]) == metrics_port
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


@all_variants
def test_replicas_spread_and_a_disruption_budget_only_with_two_or_more(variant: str) -> None:
    docs = render(variant)
    deployment = one(docs, "Deployment")
    replicas = deployment["spec"]["replicas"]
    assert replicas == _chart().merge_values(VARIANTS[variant])["replicaCount"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert selector_matches(anti[0]["podAffinityTerm"]["labelSelector"], pod["metadata"]["labels"])
    for constraint in pod["spec"]["topologySpreadConstraints"]:
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert selector_matches(constraint["labelSelector"], pod["metadata"]["labels"])
    budgets = of_kind(docs, "PodDisruptionBudget")
    if replicas > 1:
        (budget,) = budgets
        assert selector_matches(budget["spec"]["selector"], pod["metadata"]["labels"])
        assert budget["spec"]["maxUnavailable"] < replicas
    else:
        assert budgets == []


@all_variants
def test_every_object_carries_the_recommended_labels(variant: str) -> None:
    for doc in render(variant):
        labels = doc["metadata"]["labels"]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "llmroute", where
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/version"] == _chart().metadata["appVersion"], where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert labels["app.kubernetes.io/part-of"] == "llmroute", where
        assert labels["app.kubernetes.io/component"] in ("operator", "webhook", "monitoring"), where


def test_service_monitor_only_on_request_and_scraping_the_metrics_port() -> None:
    assert of_kind(render("default"), "ServiceMonitor") == []
    docs = render("everything-set")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (
        endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    )
    assert monitor["metadata"]["labels"]["release"] == "prom"


# -- RBAC ----------------------------------------------------------------------------------------------


class Grant(NamedTuple):
    """One (apiGroup, resource, verb) a rule grants, with its resourceNames and where it applies."""

    scope: str
    group: str
    resource: str
    verb: str
    names: tuple[str, ...]


def _all_rules(docs: list[dict[str, Any]]) -> list[Grant]:
    """Every grant of every role that is bound to the operator's ServiceAccount; the scope is
    "cluster" for a ClusterRole bound by a ClusterRoleBinding, else the namespace of the binding."""
    account = one(docs, "ServiceAccount")["metadata"]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    grants = []
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
        namespace = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])]
        scope = namespace or "cluster"
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        grants.append(
                            Grant(scope, group, resource, verb, tuple(rule.get("resourceNames", [])))
                        )
    bound = {
        (b["roleRef"]["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"])
        for b in docs
        if "roleRef" in b
    }
    unbound = {key for key in roles if key[0] in ("Role", "ClusterRole")} - {
        (kind, ns if kind == "Role" else None, name) for kind, ns, name in bound
    }
    assert unbound == set(), "roles nobody is bound to"
    return grants


# The operator's work on routes, pods and workloads (docs/install.md, "RBAC").
NAMESPACED_TABLE = {
    ("llmroute.dev", "llmroutes"): {"get", "list", "watch", "patch"},
    ("llmroute.dev", "llmroutes/status"): {"get", "patch"},
    ("", "configmaps"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("apps", "replicasets"): {"get"},
    ("apps", "deployments"): {"get", "patch"},
    ("apps", "statefulsets"): {"get", "patch"},
    ("apps", "daemonsets"): {"get", "patch"},
    ("", "events"): {"create"},
    ("events.k8s.io", "events"): {"create"},
    ("autoscaling", "horizontalpodautoscalers"): {"get", "create", "patch", "delete"},
}
KOPF_CLUSTER_TABLE = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}
PEERING_VERBS = {"get", "list", "watch", "patch"}
WEBHOOK_CONFIGS = ("mutatingwebhookconfigurations", "validatingwebhookconfigurations")


def _expand(scope: str, table: dict[tuple[str, str], set[str]], names: tuple[str, ...] = ()) -> set[Any]:
    return {
        (scope, group, resource, verb, names) for (group, resource), verbs in table.items() for verb in verbs
    }


def _expected_grants(variant: str) -> set[Any]:
    values = _chart().merge_values(VARIANTS[variant])
    watched = values["watchNamespaces"]
    expected = _expand("cluster", KOPF_CLUSTER_TABLE)
    if watched:
        for namespace in watched:
            expected |= _expand(namespace, NAMESPACED_TABLE)
            expected |= _expand(namespace, {("kopf.dev", "kopfpeerings"): PEERING_VERBS})
    else:
        expected |= _expand("cluster", NAMESPACED_TABLE)
        expected |= _expand("cluster", {("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS})
    if not values["webhook"]["certManager"]["enabled"]:
        configs = {("admissionregistration.k8s.io", name): {"get", "patch"} for name in WEBHOOK_CONFIGS}
        expected |= _expand("cluster", configs, (FULLNAME,))
        expected |= _expand(
            NAMESPACE, {("", "secrets"): {"get", "update", "patch"}}, (f"{FULLNAME}-webhook-tls",)
        )
        expected |= _expand(NAMESPACE, {("", "secrets"): {"create"}})
    return expected


@all_variants
def test_rbac_grants_exactly_the_table(variant: str) -> None:
    grants = _all_rules(render(variant))
    assert not [tuple(g) for g in grants if "*" in (g.group, g.resource, g.verb)]
    keys = [tuple(g) for g in grants]
    assert len(keys) == len(set(keys)), "a grant repeated"
    assert set(keys) == _expected_grants(variant)


@all_variants
def test_secrets_only_the_tls_secret_only_in_the_release_namespace(variant: str) -> None:
    for grant in _all_rules(render(variant)):
        if grant.resource == "secrets":
            assert grant.scope == NAMESPACE
            assert grant.names == (f"{FULLNAME}-webhook-tls",) or grant.verb == "create"
            assert not VARIANTS[variant].get("webhook", {}).get("certManager", {}).get("enabled")


class _Recorder(kube.Kube):
    """``kube.Kube`` whose single choke point records the calls instead of making them."""

    def __init__(self) -> None:
        super().__init__(api_client=object())
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        self.calls.append((method, path.split("?")[0]))
        return None


def _operator_api_calls() -> set[tuple[str, str, str, bool]]:
    """(group, resource, verb, namespaced) of every call ``kube.Kube`` can make: each public method
    called once per workload kind / webhook configuration it accepts, through a recording ``request``."""
    recorder = _Recorder()
    fills = {"namespace": "ns", "name": "n", "body": {}, "patch": {}, "label_selector": "a=b"}
    choices = {
        "kind": list(kube.WORKLOAD_PATHS),
        "plural": list(getattr(kube, "WEBHOOK_CONFIGURATIONS", WEBHOOK_CONFIGS)),
    }
    for name, method in inspect.getmembers(recorder, inspect.ismethod):
        if name.startswith("_") or name == "request":
            continue
        params = [
            p.name
            for p in inspect.signature(method).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        options = [choices.get(param, [fills.get(param, "x")]) for param in params]
        for combination in itertools.product(*options):
            method(**dict(zip(params, combination, strict=True)))
    found = set()
    for http, path in recorder.calls:
        parts = path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        namespaced = rest[0] == "namespaces"
        rest = rest[2:] if namespaced else rest
        resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
        named = len(rest) > 1
        verb = {"GET": "get" if named else "list", "POST": "create", "PATCH": "patch", "PUT": "update"}.get(
            http, "delete"
        )
        found.add((group, resource, verb, namespaced))
    return found


def _kopf_needs() -> set[tuple[str, str, str]]:
    """What kopf does for the registered handlers: list+watch what they observe; patch (finalizers,
    progress annotations, status) what the changing handlers handle."""
    registry = kopf.get_default_registry()
    needs = set()
    for part in (registry._watching, registry._spawning, registry._indexing, registry._changing):
        for handler in part.get_all_handlers():
            selector = handler.selector
            needs |= {
                (selector.group, selector.any_name, "list"),
                (selector.group, selector.any_name, "watch"),
            }
    for handler in registry._changing.get_all_handlers():
        selector = handler.selector
        needs |= {
            (selector.group, selector.any_name, "patch"),
            (selector.group, f"{selector.any_name}/status", "patch"),
        }
    return needs


@all_variants
def test_rbac_covers_every_call_of_the_operator_and_kopf(variant: str) -> None:
    assert operator_handlers.INDEX  # the handlers module registered kopf's handlers
    grants = _all_rules(render(variant))
    watched = _chart().merge_values(VARIANTS[variant])["watchNamespaces"] or ["cluster"]
    granted_everywhere = {
        (g.group, g.resource, g.verb)
        for g in grants
        if not g.names and (g.scope == "cluster" or all(_granted_in(grants, ns, g) for ns in watched))
    }
    calls = _operator_api_calls()
    assert {("", "configmaps", "create", True), ("apps", "deployments", "patch", True)} <= calls
    cert_manager = _chart().merge_values(VARIANTS[variant])["webhook"]["certManager"]["enabled"]
    for group, resource, verb, namespaced in calls:
        if resource in ("secrets", *WEBHOOK_CONFIGS):
            # self-managed TLS: its Secret in the operator's namespace, the webhook configurations
            if not cert_manager:
                scope = NAMESPACE if namespaced else "cluster"
                assert (scope, group, resource, verb) in {g[:4] for g in grants}, f"{verb} {resource}"
        elif namespaced:
            assert (group, resource, verb) in granted_everywhere, f"{verb} {resource} is not granted"
        else:
            assert ("cluster", group, resource, verb) in {g[:4] for g in grants}, f"{verb} {resource}"
    for need in _kopf_needs():
        assert need in granted_everywhere, f"kopf needs {need}"


def _granted_in(grants: list[Grant], namespace: str, grant: Grant) -> bool:
    return any(
        g.scope in (namespace, "cluster")
        and (g.group, g.resource, g.verb) == (grant.group, grant.resource, grant.verb)
        for g in grants
    )


# -- webhooks -----------------------------------------------------------------------------------------


def _webhook(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (hook,) = one(docs, kind)["webhooks"]
    assert isinstance(hook, dict)
    return hook


@all_variants
def test_webhooks_are_the_operators_handlers_behind_the_service(variant: str) -> None:
    docs = render(variant)
    service = one(docs, "Service")
    registered = {h.id: h for h in kopf.get_default_registry()._webhooks.get_all_handlers()}
    values = _chart().merge_values(VARIANTS[variant])
    for kind, handler_id in (
        ("MutatingWebhookConfiguration", "inject"),
        ("ValidatingWebhookConfiguration", "validate"),
    ):
        hook = _webhook(docs, kind)
        handler = registered[handler_id]
        target = hook["clientConfig"]["service"]
        assert target == {
            "name": service["metadata"]["name"],
            "namespace": NAMESPACE,
            "path": f"/{handler_id}",  # kopf serves each admission handler at /<id>
            "port": next(p["port"] for p in service["spec"]["ports"] if p["name"] == "webhook"),
        }
        (rule,) = hook["rules"]
        assert rule["operations"] == list(handler.operations)
        assert (rule["apiGroups"], rule["apiVersions"], rule["resources"]) == (
            [handler.selector.group],
            [handler.selector.version],
            [handler.selector.any_name],
        )
        assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
        assert hook["failurePolicy"] == values["webhook"]["failurePolicy"]
        assert 1 <= hook["timeoutSeconds"] <= 30
        assert "caBundle" not in hook["clientConfig"]  # nothing to carry over offline
    assert (
        registered["validate"].selector.group == API_GROUP
        and registered["validate"].selector.version == API_VERSION
    )
    mutating = _webhook(docs, "MutatingWebhookConfiguration")
    assert mutating["name"] == "inject.llmroute.dev" and mutating["reinvocationPolicy"] == "Never"
    assert plain_env(docs)["LLMROUTE_WEBHOOK_FAILURE_POLICY"] == mutating["failurePolicy"]


def _namespace_selected(hook: dict[str, Any], namespace: str, labels: dict[str, str] | None = None) -> bool:
    return selector_matches(
        hook["namespaceSelector"], {"kubernetes.io/metadata.name": namespace, **(labels or {})}
    )


@all_variants
def test_pod_webhook_never_sees_system_namespaces_or_the_operators_own(variant: str) -> None:
    hook = _webhook(render(variant), "MutatingWebhookConfiguration")
    for namespace in ("kube-system", "kube-node-lease", NAMESPACE):
        assert not _namespace_selected(hook, namespace, {"llmroute.dev/injection": "enabled"})
    labels = {"llmroute.dev/injection": "enabled"}
    if variant == "watch-namespaces":
        assert _namespace_selected(hook, "team-a") and _namespace_selected(hook, "team-b")
        assert not _namespace_selected(hook, "team-c")
        validating = _webhook(render(variant), "ValidatingWebhookConfiguration")
        assert _namespace_selected(validating, "team-a") and not _namespace_selected(validating, "team-c")
    elif variant == "everything-set":
        assert _namespace_selected(hook, "team-a", labels) and not _namespace_selected(hook, "team-a")
        assert not _namespace_selected(hook, "legacy", labels)
    else:
        assert _namespace_selected(hook, "team-a") and _namespace_selected(hook, "default")
        assert "namespaceSelector" not in _webhook(render(variant), "ValidatingWebhookConfiguration")


def test_pods_labelled_out_are_never_sent_to_the_webhook() -> None:
    hook = _webhook(render("default"), "MutatingWebhookConfiguration")
    assert selector_matches(hook["objectSelector"], {"app": "chat"})
    assert not selector_matches(hook["objectSelector"], {"app": "chat", ANNOTATION_INJECT: "false"})


@all_variants
def test_peering_objects_are_where_kopf_looks(variant: str) -> None:
    docs = render(variant)
    args = parsed_args(docs)
    peerings = of_kind(docs, "ClusterKopfPeering") + of_kind(docs, "KopfPeering")
    assert {p["apiVersion"] for p in peerings} == {"kopf.dev/v1"}
    assert {p["metadata"]["name"] for p in peerings} == {args.peering}
    if args.namespace:
        assert [p["kind"] for p in peerings] == ["KopfPeering"] * len(args.namespace)
        assert sorted(p["metadata"]["namespace"] for p in peerings) == sorted(args.namespace)
    else:
        assert [p["kind"] for p in peerings] == ["ClusterKopfPeering"]


# -- lookup against an API server: helm upgrade keeps the caBundle the operator patched in -----------


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmulatorThread, Path]]:
    emulator = EmulatorThread().start()
    try:
        yield (
            emulator,
            write_kubeconfig(tmp_path_factory.mktemp("helm") / "kubeconfig", emulator.url, NAMESPACE),
        )
    finally:
        emulator.stop()


def _create(emulator: EmulatorThread, plural: str, body: dict[str, Any]) -> None:
    url = f"{emulator.url}/apis/admissionregistration.k8s.io/v1/{plural}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status in (200, 201)


def test_upgrade_carries_the_live_ca_bundle_over(api_server: tuple[EmulatorThread, Path]) -> None:
    emulator, kubeconfig = api_server
    chart = _chart()
    with helm.Config(kubeconfig_path=str(kubeconfig), namespace=NAMESPACE) as config:
        fresh = _documents(config.render(chart, name=RELEASE, namespace=NAMESPACE, is_install=True))
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            assert "caBundle" not in _webhook(fresh, kind)["clientConfig"]

        # what the operator leaves behind: the configurations with its CA patched in
        for kind, plural, bundle in (
            ("MutatingWebhookConfiguration", "mutatingwebhookconfigurations", "TVVUQVRJTkc="),
            ("ValidatingWebhookConfiguration", "validatingwebhookconfigurations", "VkFMSURBVElORw=="),
        ):
            live = _webhook(fresh, kind)
            live["clientConfig"]["caBundle"] = bundle
            _create(
                emulator,
                plural,
                {
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": kind,
                    "metadata": {"name": FULLNAME},
                    "webhooks": [live],
                },
            )

        upgrade = _documents(config.render(chart, name=RELEASE, namespace=NAMESPACE, is_upgrade=True))
        assert _webhook(upgrade, "MutatingWebhookConfiguration")["clientConfig"]["caBundle"] == "TVVUQVRJTkc="
        assert (
            _webhook(upgrade, "ValidatingWebhookConfiguration")["clientConfig"]["caBundle"]
            == "VkFMSURBVElORw=="
        )

        # cert-manager's CA injector owns caBundle there: nothing carried over, the annotation instead
        managed = _documents(
            config.render(chart, VARIANTS["cert-manager"], name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
        )
        for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            assert "caBundle" not in _webhook(managed, kind)["clientConfig"]
