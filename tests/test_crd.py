"""The generated CRD: current, structural, and accepting exactly the manifests the models accept."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmroute_operator import crd
from llmroute_sidecar.api import ManifestError, parse_route
from tests.support.kube_schema import structural_violations, validate_object

ROOT = Path(__file__).resolve().parent.parent
CRD_COPIES = [ROOT / "crds" / crd.CRD_FILENAME, ROOT / "helm" / "llmroute" / "crds" / crd.CRD_FILENAME]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _schema() -> dict[str, Any]:
    document = yaml.safe_load(CRD_COPIES[0].read_text())
    schema: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _routes(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "LLMRoute"]


@pytest.mark.parametrize("path", CRD_COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_matches_the_models(path: Path) -> None:
    assert path.read_text() == crd.render_yaml(), f"{path} is stale: run `make crds`"


def test_check_mode_reports_a_stale_copy(tmp_path: Path) -> None:
    (tmp_path / crd.CRD_FILENAME).write_text("stale")
    assert crd.main(["--check", str(tmp_path)]) == 1
    assert crd.main([str(tmp_path)]) == 0
    assert crd.main(["--check", str(tmp_path)]) == 0


def test_schema_is_structural() -> None:
    assert list(structural_violations(_schema())) == []


def test_structural_checker_catches_violations() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/x"},
            "b": {"type": "object", "properties": {}, "additionalProperties": False},
            "c": {"type": "integer", "exclusiveMinimum": 0},
            "d": {"type": "string", "format": "uri-reference"},
        },
    }
    messages = "\n".join(structural_violations(bad))
    for expected in ("$ref", "needs a type", "mutually exclusive", "boolean", "format"):
        assert expected in messages


def test_crd_names_scope_and_columns() -> None:
    document = yaml.safe_load(CRD_COPIES[0].read_text())
    spec = document["spec"]
    assert document["metadata"]["name"] == "llmroutes.llmroute.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["llmr"] and spec["names"]["plural"] == "llmroutes"
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert {"Ready", "Pods", "Recommended", "Age"} <= set(columns)


def test_descriptions_come_from_docstrings() -> None:
    limits = _schema()["properties"]["spec"]["properties"]["limits"]
    assert "Fleet-wide limits" in limits["description"]
    key = limits["items"]["properties"]["key"]
    assert "header:<Name>" in key["description"]
    assert limits["x-kubernetes-list-map-keys"] == ["name"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_crd_and_models(path: Path) -> None:
    routes = _routes(path)
    assert routes, f"{path.name} holds no LLMRoute"
    for route in routes:
        assert validate_object(_schema(), route) == []
        parse_route(route)


def test_at_least_three_examples_cover_the_main_shapes() -> None:
    keys = {limit["key"] for path in EXAMPLES for route in _routes(path) for limit in route["spec"]["limits"]}
    assert {"route", "apiKey"} <= keys and any(key.startswith("header:") for key in keys)
    assert any(
        (route["spec"].get("upstream") or {}).get("apiKeySecretRef") for p in EXAMPLES for route in _routes(p)
    )
    limits = [limit for path in EXAMPLES for route in _routes(path) for limit in route["spec"]["limits"]]
    assert any("costPerDay" in limit and limit.get("models") for limit in limits)  # cost-budget.yaml


def _valid() -> dict[str, Any]:
    return copy.deepcopy(_routes(ROOT / "examples" / "outbound-vendor.yaml")[0])


def _negative_limit(route: dict[str, Any]) -> None:
    route["spec"]["limits"][0]["requestsPerMinute"] = -1


def _unknown_key_kind(route: dict[str, Any]) -> None:
    route["spec"]["limits"][0]["key"] = "client-ip"


def _missing_url(route: dict[str, Any]) -> None:
    del route["spec"]["upstream"]["url"]


def _duplicate_names(route: dict[str, Any]) -> None:
    route["spec"]["limits"][1]["name"] = route["spec"]["limits"][0]["name"]


def _unknown_field(route: dict[str, Any]) -> None:
    route["spec"]["limits"][0]["requestsPerSecond"] = 5


def _bad_header(route: dict[str, Any]) -> None:
    route["spec"]["limits"][0]["key"] = "header:X Tenant"


def _zero_timeout(route: dict[str, Any]) -> None:
    route["spec"]["upstream"]["timeoutSeconds"] = 0


# (mutation, field path the errors must name, words of the pydantic message)
KEY_HINT = "must be 'route', 'apiKey', 'header:<Header-Name>' or 'claim:<claim-name>'"
INVALID = [
    (_negative_limit, "limits", "greater than or equal to 0"),
    (_unknown_key_kind, "limits", KEY_HINT),
    (_missing_url, "upstream", "url: Field required"),
    (_duplicate_names, "limits", "limit names must be unique; repeated: vendor-tpm"),
    (_unknown_field, "requestsPerSecond", "Extra inputs are not permitted"),
    (_bad_header, "limits", KEY_HINT),
    (_zero_timeout, "timeoutSeconds", "greater than 0"),
]


@pytest.mark.parametrize(
    ("mutate", "crd_words", "model_words"), INVALID, ids=lambda v: getattr(v, "__name__", "")
)
def test_invalid_manifests_are_rejected_by_crd_and_models(
    mutate: Any, crd_words: str, model_words: str
) -> None:
    route = _valid()
    mutate(route)
    problems = validate_object(_schema(), route)
    assert problems, "the CRD schema accepted an invalid manifest"
    assert any(crd_words in problem for problem in problems), problems
    with pytest.raises(ManifestError) as caught:
        parse_route(route)
    assert model_words in str(caught.value)
