"""The LLMRoute v1alpha1 API: pydantic models that are the single source of its schema."""

from llmroute_sidecar.api.manifest import LLMRoute, ManifestError, ObjectMeta, load_route, parse_route
from llmroute_sidecar.api.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    Limit,
    LLMRouteSpec,
)
from llmroute_sidecar.api.status import Condition, LLMRouteStatus, PodCounts

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "Condition",
    "LLMRoute",
    "LLMRouteSpec",
    "LLMRouteStatus",
    "Limit",
    "ManifestError",
    "ObjectMeta",
    "PodCounts",
    "load_route",
    "parse_route",
]
