"""The Helm chart, read by the real Helm engine (helm-python-sdk): it lints and ships the current CRD."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import yaml

from llmroute_operator import crd

CHART = Path(__file__).resolve().parent.parent / "helm" / "llmroute"


def test_chart_lints_without_errors() -> None:
    report = helm.lint(str(CHART))
    assert report["errors"] == []
    assert not [m for m in report["messages"] if m["severity"] >= 3]


def test_chart_ships_the_generated_crd() -> None:
    chart = helm.Chart.load(str(CHART))
    assert chart.name == "llmroute"
    (shipped,) = chart.crds
    assert yaml.safe_load(shipped["data"]) == crd.custom_resource_definition()
