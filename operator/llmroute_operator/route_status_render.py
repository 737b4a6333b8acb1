"""``RouteView`` as text for people (``kubectl describe``-like) or as JSON for tools."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from llmroute_operator.route_status_view import MONEY, LimitView, PodView, RouteView, money_text, usage_text


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, two spaces apart, trailing spaces trimmed."""
    if not rows:
        return []
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        (indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _limit_heading(limit: LimitView) -> str:
    values = " ".join(
        f"{name}={money_text(value) if name in MONEY else value}" for name, value in limit.configured.items()
    )
    words = [limit.name, f"key={limit.key}", values]
    if limit.mode != "enforce":
        words.append(f"mode={limit.mode}")
    if limit.tiers:
        words.append(f"(tiers {', '.join(limit.tiers)} replace these per key)")
    return "  " + "  ".join(word for word in words if word)


def _limit_lines(limit: LimitView) -> list[str]:
    lines = [_limit_heading(limit)]
    bounds = {} if limit.tiers else limit.configured
    if limit.active_subjects is not None:
        if not limit.per_subject:
            used = limit.top[0].used if limit.top else {}
            rows = [[name, usage_text(used.get(name, 0), bounds.get(name), name in MONEY)] for name in used]
            lines += table(rows, "    ")
        else:
            lines.append(f"    active subjects: {limit.active_subjects}")
            names = list(dict.fromkeys(name for subject in limit.top for name in subject.used))
            rows = [["SUBJECT", *names]]
            rows += [
                [s.subject, *(usage_text(s.used.get(n, 0), bounds.get(n), n in MONEY) for n in names)]
                for s in limit.top
            ]
            if limit.top:
                lines += table(rows, "    ")
    return lines


def _pod_rows(pods: Sequence[PodView]) -> list[list[str]]:
    rows = [["NAME", "PHASE", "READY", "INJECTED", "SIDECAR READY", "IN FLIGHT"]]
    for pod in pods:
        inflight = str(pod.inflight) if pod.inflight is not None else "-"
        if pod.probe_error:
            inflight = f"- ({pod.probe_error})"
        rows.append(
            [pod.name, pod.phase, _yes(pod.ready), _yes(pod.injected), _yes(pod.sidecar_ready), inflight]
        )
    return rows


def render_text(view: RouteView) -> str:
    """The human view."""
    generation = "-" if view.generation is None else view.generation
    observed = "never" if view.observed_generation is None else view.observed_generation
    replicas = "-" if view.recommended_replicas is None else view.recommended_replicas
    counts = view.pod_counts
    lines = [
        f"LLMRoute:     {view.namespace}/{view.name}",
        f"Upstream:     {view.upstream or '-'}",
        f"Generation:   {generation} (observed {observed})",
        f"Replicas:     recommended {replicas}",
        f"Pods:         {counts['matched']} matched, {counts['injected']} injected, {counts['ready']} ready "
        "(status)",
        "Conditions:",
    ]
    if view.conditions:
        lines += table([[c.type, c.status, c.reason, c.message] for c in view.conditions])
    else:
        lines.append("  none yet (the operator has not reconciled this route)")
    if view.invalid_spec:
        lines.append(f"Spec:         does not validate: {view.invalid_spec}")
    if view.usage_problem:
        lines.append(f"Usage:        not shown: {view.usage_problem}")
    elif view.usage_source:
        lines.append(f"Usage from:   {view.usage_source}")
    lines.append("Limits:")
    if not view.limits:
        lines.append("  none")
    for limit in view.limits:
        lines += _limit_lines(limit)
    lines.append(f"Selected pods: {len(view.pods)}")
    if view.pods:
        lines += table(_pod_rows(view.pods))
    lines.append(f"Rejections (429s): {view.rejections_source}")
    rows = [
        [limit.name, dimension, str(count), note]
        for limit in view.limits
        for counts, note in ((limit.rejections, ""), (limit.shadow_rejections, "(shadow: would have been)"))
        for dimension, count in sorted(counts.items())
    ]
    lines += table(rows) or ["  none"]
    lines.append("Last rejections:")
    recent = [
        [
            time.strftime("%H:%M:%S", time.gmtime(r.ts)) + "Z",
            r.pod,
            f"{r.limit}/{r.dimension}",
            r.client or "-",
            str(r.status),
            "-" if r.retry_after_seconds is None else f"retry after {r.retry_after_seconds:.1f}s",
        ]
        for r in view.recent_rejections
    ]
    lines += table(recent) or ["  none remembered by the sidecars that answered"]
    return "\n".join(lines) + "\n"


def to_json_dict(view: RouteView) -> dict[str, Any]:
    """The view as plain JSON values (what ``--output json`` prints)."""
    return dataclasses.asdict(view)


def render_json(view: RouteView) -> str:
    return json.dumps(to_json_dict(view), indent=2, sort_keys=False) + "\n"
