"""Reading LLMRoute manifests: the same YAML a user applies, with errors that name the field."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmroute_sidecar.api.spec import (
    API_GROUP,
    API_VERSION,
    CLAIM_NAME_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    HEADER_NAME_PATTERN,
    KIND,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_PATTERN,
    LIMIT_KEY_PATTERN,
    PATH_PATTERN,
    SECRET_KEY_PATTERN,
    URL_PATTERN,
    LLMRouteSpec,
)
from llmroute_sidecar.api.status import LLMRouteStatus

API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

#: What each pattern means, in words a user understands.
PATTERN_HINTS = {
    LIMIT_KEY_PATTERN: "must be 'route', 'apiKey', 'header:<Header-Name>' or 'claim:<claim-name>'",
    CLAIM_NAME_PATTERN: "must be a JWT claim name (letters, digits, '_', '-', '.', ':', '/')",
    DNS_LABEL_PATTERN: "must be a lower-case DNS label (a-z, 0-9, '-'; starting and ending alphanumeric)",
    DNS_SUBDOMAIN_PATTERN: "must be a Kubernetes object name (lower-case DNS subdomain)",
    HEADER_NAME_PATTERN: "must be a valid HTTP header name",
    LABEL_KEY_PATTERN: "must be a valid label key",
    LABEL_VALUE_PATTERN: "must be a valid label value",
    SECRET_KEY_PATTERN: "must be a valid Secret data key (letters, digits, '-', '_', '.')",
    URL_PATTERN: "must be an http:// or https:// URL",
    PATH_PATTERN: "must be an absolute path starting with '/'",
    f"^{API_GROUP}/{API_VERSION}$": f"must be {API_GROUP}/{API_VERSION}",
    f"^{KIND}$": f"must be {KIND}",
}


class ManifestError(ValueError):
    """A manifest that is not a valid LLMRoute; the message names each offending field."""


class ObjectMeta(BaseModel):
    """The part of metadata llmroute reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str = "default"
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LLMRoute(BaseModel):
    """A whole LLMRoute object."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    api_version: str = Field(alias="apiVersion", pattern=f"^{API_GROUP_VERSION}$")
    kind: str = Field(pattern=f"^{KIND}$")
    metadata: ObjectMeta
    spec: LLMRouteSpec
    status: LLMRouteStatus | None = None

    @property
    def key(self) -> str:
        """``namespace/name``: the route's identity in metrics, logs and quota keys."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


def format_location(loc: Sequence[int | str]) -> str:
    """Render a pydantic error location as a field path: ``spec.limits[1].key``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(root)"


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem: ``field.path: what is wrong``."""
    lines = []
    for item in error.errors(include_url=False):
        loc = [part for part in item["loc"] if not _is_union_branch(part)]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "string_pattern_mismatch":
            pattern = str(item.get("ctx", {}).get("pattern", ""))
            message = f"{item['input']!r} {PATTERN_HINTS.get(pattern, message)}"
        lines.append(f"{format_location(loc)}: {message}")
    return "\n".join(lines)


def _is_union_branch(part: int | str) -> bool:
    return isinstance(part, str) and part.startswith(("function-", "constrained-"))


def parse_route(document: Mapping[str, Any]) -> LLMRoute:
    """Validate one decoded manifest as an LLMRoute; raise ManifestError naming the fields."""
    try:
        return LLMRoute.model_validate(document)
    except ValidationError as error:
        raise ManifestError(f"invalid LLMRoute:\n{describe_validation_error(error)}") from None


def load_route(path: str | Path) -> LLMRoute:
    """Read the LLMRoute in a YAML file (other documents, such as Secrets, are ignored)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(f"cannot read route file {path}: {error.strerror}") from None
    return parse_route_text(text, source=str(path))


def parse_route_text(text: str, source: str = "<text>") -> LLMRoute:
    """Parse YAML text holding exactly one LLMRoute document."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise ManifestError(f"{source} is not valid YAML: {error}") from None
    if not all(isinstance(doc, dict) for doc in documents):
        raise ManifestError(f"{source}: every YAML document must be a mapping (an object)")
    routes = [doc for doc in documents if doc.get("kind") == KIND]
    if len(routes) != 1:
        raise ManifestError(f"{source}: expected exactly one document of kind {KIND}, found {len(routes)}")
    try:
        return parse_route(routes[0])
    except ManifestError as error:
        raise ManifestError(f"{source}: {error}") from None


def load_secret_documents(path: str | Path) -> dict[str, dict[str, str]]:
    """The ``kind: Secret`` documents in a YAML file: name -> {key: value}; {} when it has none.

    For running a sidecar by hand against an example manifest: Kubernetes mounts Secrets as files,
    locally the Secret objects next to the route stand in for them. ``stringData`` wins over ``data``
    (base64), as the API server merges them.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        documents = [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]
    except (OSError, yaml.YAMLError):
        return {}
    found: dict[str, dict[str, str]] = {}
    for doc in documents:
        if doc.get("kind") != "Secret" or doc.get("apiVersion") != "v1":
            continue
        name = str((doc.get("metadata") or {}).get("name") or "")
        if not name:
            continue
        values: dict[str, str] = {}
        for key, raw in (doc.get("data") or {}).items():
            try:
                values[str(key)] = base64.b64decode(str(raw), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ManifestError(
                    f"{path}: Secret {name}: data.{key} is not base64 of UTF-8 text"
                ) from None
        values.update({str(key): str(value) for key, value in (doc.get("stringData") or {}).items()})
        found[name] = values
    return found
