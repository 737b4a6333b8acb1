"""docs/sidecar.md and docs/operator.md list every metric the code registers, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from llmroute_operator import metrics as operator_metrics
from llmroute_sidecar.metrics import SidecarMetrics

DOCS = Path(__file__).resolve().parent.parent / "docs"


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Each metric's name as written in the docs: counters with ``_total``."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


def test_the_sidecar_doc_lists_every_sidecar_metric() -> None:
    text = (DOCS / "sidecar.md").read_text(encoding="utf-8")
    # The admin-port list names them without the prefix; the connection metrics are named in full.
    documented = {m.group(1) for m in re.finditer(r"`(?:llmroute_)?([a-z_]+)(?:\{[^`]*\})?`", text)}
    names = {name.removeprefix("llmroute_") for name in exposed_names(SidecarMetrics().registry)}
    assert "time_to_first_token_seconds" in names
    assert names - documented == set(), "sidecar metrics docs/sidecar.md does not list"


def test_the_operator_doc_table_is_the_operator_registry() -> None:
    text = (DOCS / "operator.md").read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1]
    table = set(re.findall(r"^\| `(llmroute_operator_[a-z_]+)` \|", text, re.M))
    assert table == exposed_names(operator_metrics.REGISTRY)
