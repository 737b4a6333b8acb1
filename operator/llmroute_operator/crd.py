"""Generate the LLMRoute CustomResourceDefinition from the pydantic models (``make crds``).

Pydantic emits JSON Schema (2020-12, with ``$defs``); Kubernetes wants a *structural* OpenAPI v3
schema: every node typed, no references, no ``additionalProperties: false``, boolean exclusive bounds.
This module translates one into the other; tests check the result against the structural rules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llmroute_sidecar.api.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    LLMRouteSpec,
)
from llmroute_sidecar.api.status import LLMRouteStatus

CRD_FILENAME = f"{API_GROUP}_{PLURAL}.yaml"
CATEGORIES = ["llmroute"]
#: Lists whose items are identified by a key: the API server rejects duplicate keys.
LIST_MAP_KEYS: dict[tuple[str, ...], list[str]] = {
    ("spec", "limits"): ["name"],
    ("status", "conditions"): ["type"],
}
_DROPPED_KEYS = {"title", "propertyNames", "$defs"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Pods", "type": "string", "jsonPath": ".status.podSummary", "description": "ready/matched pods"},
    {
        "name": "Recommended",
        "type": "integer",
        "jsonPath": ".status.recommendedReplicas",
        "description": "Recommended replicas",
    },
    {"name": "Upstream", "type": "string", "jsonPath": ".spec.upstream.url", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural_schema(json_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a pydantic JSON schema into a Kubernetes structural OpenAPI v3 schema."""
    definitions: Mapping[str, Any] = json_schema.get("$defs", {})
    return _convert(json_schema, definitions, path=())


def _resolve(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    """Inline ``$ref`` (and single-item ``allOf``) keeping the referring node's own keywords."""
    merged = dict(node)
    if "allOf" in merged and len(merged["allOf"]) == 1:
        merged = {**merged.pop("allOf")[0], **merged}
    if "$ref" in merged:
        target = definitions[merged.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**_resolve(target, definitions), **merged}
    return merged


def _convert(
    node: Mapping[str, Any], definitions: Mapping[str, Any], path: tuple[str, ...]
) -> dict[str, Any]:
    node = _resolve(node, definitions)
    nullable = False
    if "anyOf" in node:
        branches = [_resolve(b, definitions) for b in node["anyOf"]]
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"{'.'.join(path)}: unions other than Optional[X] are not structural")
        nullable = len(non_null) < len(branches)
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**non_null[0], **rest}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, definitions, (*path, name)) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, definitions, (*path, "[]"))
        elif key == "additionalProperties":
            if isinstance(value, Mapping):
                out[key] = _convert(value, definitions, (*path, "{}"))
        elif key == "patternProperties":
            # Key patterns cannot be expressed structurally; the models (and the webhook) check keys.
            (sub,) = value.values()
            out["additionalProperties"] = _convert(sub, definitions, (*path, "{}"))
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key == "default" and isinstance(value, Mapping | list) and not value:
            continue
        else:
            out[key] = value
    if nullable:
        out["nullable"] = True
    if "type" not in out:
        raise ValueError(f"{'.'.join(path) or '(root)'}: schema node has no type")
    if out["type"] == "object" and "properties" in out:
        out.pop("additionalProperties", None)
    if "description" in out:
        out["description"] = " ".join(str(out["description"]).split())
    list_keys = LIST_MAP_KEYS.get(path)
    if list_keys:
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = list_keys
    first: dict[str, Any] = {key: out[key] for key in ("type", "description") if key in out}
    return {**first, **{key: value for key, value in out.items() if key not in first}}


def openapi_schema() -> dict[str, Any]:
    """The whole object's schema: apiVersion, kind, metadata, spec and status."""
    spec = _convert(LLMRouteSpec.model_json_schema(by_alias=True), _defs(LLMRouteSpec), ("spec",))
    status = _convert(LLMRouteStatus.model_json_schema(by_alias=True), _defs(LLMRouteStatus), ("status",))
    status["properties"]["podSummary"] = {
        "type": "string",
        "description": "ready/matched pods, for kubectl get (e.g. 3/3).",
    }
    return {
        "type": "object",
        "description": "LLMRoute puts the LLM traffic of the pods it selects under fleet-wide control: "
        "a sidecar in each pod enforces the route's limits across all replicas, owns readiness and "
        "publishes replica hints.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def _defs(model: type[LLMRouteSpec] | type[LLMRouteStatus]) -> Mapping[str, Any]:
    defs: Mapping[str, Any] = model.model_json_schema(by_alias=True).get("$defs", {})
    return defs


def custom_resource_definition() -> dict[str, Any]:
    """The complete ``apiextensions.k8s.io/v1`` CRD manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "llmroute",
                "app.kubernetes.io/part-of": "llmroute",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render_yaml() -> str:
    """The CRD as the YAML committed in ``crds/``."""
    header = "# Generated from the pydantic models by `make crds` (llmroute_operator.crd). Do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the CRD files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outputs", nargs="+", type=Path, help="directories to write the CRD YAML into")
    parser.add_argument("--check", action="store_true", help="fail if a file differs instead of writing")
    args = parser.parse_args(argv)
    text = render_yaml()
    stale = []
    for directory in args.outputs:
        target = directory / CRD_FILENAME
        if args.check:
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                stale.append(str(target))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if stale:
        print(f"stale CRD (run `make crds`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
