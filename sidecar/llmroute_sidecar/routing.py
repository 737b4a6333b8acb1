"""Upstream choice per request (pure): which upstreams serve a model, and the order they are tried in.

Candidates are the upstreams serving the request's model (its ``models`` names or globs; an empty
list serves every model). A request without a model (pass-through paths, bodies without one) goes
to the upstreams serving every model, or to the first priority group when none does. Candidates are
ordered by ``priority`` (lower first); within a priority by a weighted random draw without
replacement, so the first pick follows the weights and the rest are the fallback order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Container, Sequence
from typing import Any

from llmroute_sidecar.api.spec import RoutedUpstream
from llmroute_sidecar.policy import UpstreamTarget, model_matches

GLOB_CHARACTERS = frozenset("*?[")


def serves(upstream: RoutedUpstream, model: str | None) -> bool:
    """Whether ``upstream`` serves ``model`` (None: only upstreams serving every model do)."""
    return not upstream.models or model_matches(model, upstream.models)


def eligible(upstreams: Sequence[UpstreamTarget], model: str | None) -> list[UpstreamTarget]:
    """The upstreams that may serve a request for ``model``, in spec order (empty: none serves it)."""
    found = [target for target in upstreams if serves(target.spec, model)]
    if found or model is not None or not upstreams:
        return found
    first = min(target.spec.priority for target in upstreams)
    return [target for target in upstreams if target.spec.priority == first]


def ordered(targets: Sequence[UpstreamTarget], rng: random.Random) -> list[UpstreamTarget]:
    """``targets`` by priority, each priority in weighted random order (Efraimidis-Spirakis keys)."""
    if len(targets) <= 1:
        return list(targets)
    keyed = [
        (target.spec.priority, -(rng.random() ** (1.0 / target.spec.weight)), target) for target in targets
    ]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [target for _, _, target in keyed]


def candidates(
    upstreams: Sequence[UpstreamTarget],
    model: str | None,
    rng: random.Random,
    unavailable: Container[str] = frozenset(),
) -> list[UpstreamTarget]:
    """The upstreams to try for ``model``, in order, without those ``unavailable`` (breaker open)."""
    return ordered([t for t in eligible(upstreams, model) if t.name not in unavailable], rng)


def upstream_model(upstream: RoutedUpstream, model: str | None) -> str | None:
    """The model name to send ``upstream`` in place of ``model`` (``modelRewrite``); None: unchanged."""
    if model is None:
        return None
    rewritten = upstream.model_rewrite.get(model)
    return rewritten if rewritten is not None and rewritten != model else None


def with_model(body: bytes, model: str) -> bytes:
    """A JSON request body with its ``model`` replaced."""
    document = json.loads(body)
    document["model"] = model
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def model_listing(upstreams: Sequence[RoutedUpstream]) -> dict[str, Any] | None:
    """``GET /v1/models`` from the configuration: every plain model name (not a glob) the upstreams
    list, owned by the first upstream listing it; None when they list none (the request is forwarded)."""
    owners: dict[str, str] = {}
    for upstream in upstreams:
        for model in upstream.models:
            if not GLOB_CHARACTERS & set(model):
                owners.setdefault(model, upstream.name)
    if not owners:
        return None
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in owners.items()
    ]
    return {"object": "list", "data": data}
