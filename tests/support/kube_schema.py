"""Check objects and schemas the way the Kubernetes API server would, without an API server.

- ``validate_object``: OpenAPI v3 validation of a CRD schema (Draft 4 semantics, ``nullable``), with
  kubectl's strict field validation (unknown fields are errors) and ``x-kubernetes-list-type: map``
  key uniqueness.
- ``structural_violations``: the structural-schema rules of apiextensions.k8s.io/v1.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema

#: OpenAPI keywords a structural CRD schema may use.
ALLOWED_KEYWORDS = {
    "type",
    "description",
    "properties",
    "items",
    "additionalProperties",
    "required",
    "enum",
    "default",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "nullable",
    "example",
    "title",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-validations",
}
#: Formats the API server understands (k8s.io/apiextensions-apiserver supported formats).
KUBE_FORMATS = {
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_violations(schema: Mapping[str, Any], path: str = "") -> Iterator[str]:
    """Yield a message for each place that breaks the structural-schema rules."""
    where = path or "(root)"
    for keyword in schema:
        if keyword not in ALLOWED_KEYWORDS:
            yield f"{where}: keyword {keyword!r} is not allowed in a structural schema"
    if "$ref" in schema:
        yield f"{where}: $ref is not allowed"
    kind = schema.get("type")
    untyped_allowed = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if kind not in TYPES and not untyped_allowed:
        yield f"{where}: every node needs a type (has {kind!r})"
    if "format" in schema and schema["format"] not in KUBE_FORMATS:
        yield f"{where}: format {schema['format']!r} is not known to Kubernetes"
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except re.error as error:
            yield f"{where}: pattern does not compile: {error}"
    if "properties" in schema and "additionalProperties" in schema:
        yield f"{where}: properties and additionalProperties are mutually exclusive"
    if isinstance(schema.get("additionalProperties"), bool):
        yield f"{where}: additionalProperties must be a schema, not a boolean"
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in schema and not isinstance(schema[bound], bool):
            yield f"{where}: {bound} must be a boolean in OpenAPI v3.0"
    for name in schema.get("required", []):
        if name not in schema.get("properties", {}):
            yield f"{where}: required property {name!r} is not declared"
    if schema.get("x-kubernetes-list-type") == "map":
        item = schema.get("items", {})
        for key in schema.get("x-kubernetes-list-map-keys", []):
            if key not in item.get("required", []) and "default" not in item.get("properties", {}).get(
                key, {}
            ):
                yield f"{where}: list-map key {key!r} must be required or defaulted"
    if "default" in schema:
        try:
            jsonschema.Draft4Validator(_draft4(schema)).validate(schema["default"])
        except jsonschema.ValidationError as error:
            yield f"{where}: default {schema['default']!r} is invalid: {error.message}"
    for name, sub in schema.get("properties", {}).items():
        yield from structural_violations(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), Mapping):
        yield from structural_violations(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from structural_violations(schema["additionalProperties"], f"{path}{{}}")


def _draft4(schema: Mapping[str, Any], strict: bool = False) -> dict[str, Any]:
    """Translate OpenAPI v3.0 (``nullable``) into Draft 4 JSON Schema; ``strict`` forbids unknown fields."""
    out = copy.deepcopy(dict(schema))
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    for key in [k for k in out if k.startswith("x-kubernetes-")]:
        out.pop(key)
    if "properties" in out:
        out["properties"] = {k: _draft4(v, strict) for k, v in out["properties"].items()}
        if strict:
            out["additionalProperties"] = False
    if isinstance(out.get("items"), Mapping):
        out["items"] = _draft4(out["items"], strict)
    if isinstance(out.get("additionalProperties"), Mapping):
        out["additionalProperties"] = _draft4(out["additionalProperties"], strict)
    return out


def validate_object(schema: Mapping[str, Any], obj: Any) -> list[str]:
    """All problems the API server would report for ``obj``, as ``path: message`` strings."""
    problems = []
    validator = jsonschema.Draft4Validator(_draft4(schema, strict=True))
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in error.absolute_path) or "(root)"
        problems.append(f"{where}: {error.message}")
    problems.extend(_list_map_duplicates(schema, obj, ""))
    return problems


def _list_map_duplicates(schema: Mapping[str, Any], obj: Any, path: str) -> Iterator[str]:
    if isinstance(obj, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple[Any, ...]] = set()
        for item in obj:
            if isinstance(item, Mapping):
                identity = tuple(item.get(key) for key in keys)
                if identity in seen:
                    yield f"{path}: Duplicate value: {dict(zip(keys, identity, strict=True))}"
                seen.add(identity)
    if isinstance(obj, Mapping):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                yield from _list_map_duplicates(sub, obj[name], f"{path}.{name}" if path else name)
    if isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(obj):
            yield from _list_map_duplicates(schema["items"], item, f"{path}[{index}]")
