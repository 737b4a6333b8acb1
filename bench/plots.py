"""PNG plots of a scenario (matplotlib, Agg backend): req/s per target, latency percentiles per target."""

from __future__ import annotations

from pathlib import Path

from bench.report import TARGETS, ScenarioResult
from bench.wrk import PERCENTILES

COLOURS = {
    "direct": "#7f7f7f",
    "nginx": "#2ca02c",
    "floor": "#1f77b4",
    "sidecar-memory": "#ff7f0e",
    "sidecar-redis": "#d62728",
}
SHADES = ("#c6dbef", "#6baed6", "#2171b5", "#08306b")


def _targets(outcome: ScenarioResult) -> list[str]:
    present = {t for results in outcome.results.values() for t in results}
    return [t for t in TARGETS if t in present] + sorted(present - set(TARGETS))


def plot_scenario(outcome: ScenarioResult, directory: Path) -> dict[str, Path]:
    """Write ``<slug>-throughput.png`` and ``<slug>-latency.png``; their paths by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    scenario = outcome.scenario
    cells = [c for c in scenario.cells if outcome.results.get(c)]
    targets = _targets(outcome)
    written: dict[str, Path] = {}
    if not cells:
        return written

    # req/s: one group per cell, one bar per target.
    fig, ax = plt.subplots(figsize=(max(6.0, 2.4 * len(cells) + 2), 4.2), dpi=110)
    width = 0.8 / len(targets)
    for index, target in enumerate(targets):
        xs, ys = [], []
        for position, cell in enumerate(cells):
            result = outcome.results[cell].get(target)
            if result is not None:
                xs.append(position + (index - (len(targets) - 1) / 2) * width)
                ys.append(result.rps)
        bars = ax.bar(xs, ys, width, label=target, color=COLOURS.get(target))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(cells)), [c.label for c in cells])
    ax.set_ylabel("requests per second (higher is better)")
    ax.set_title(f"{scenario.title}: throughput")
    ax.legend(fontsize=8, ncols=min(5, len(targets)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    path = directory / f"{scenario.slug}-throughput.png"
    fig.savefig(path)
    plt.close(fig)
    written["throughput"] = path

    # latency: one panel per cell, one group per target, one bar per percentile.
    columns = 2 if len(cells) > 1 else 1
    rows = (len(cells) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.6 * rows), dpi=110, squeeze=False)
    width = 0.8 / len(PERCENTILES)
    for panel, cell in zip(axes.flat, cells, strict=False):
        results = outcome.results[cell]
        names = [t for t in targets if t in results]
        for index, percentile in enumerate(PERCENTILES):
            xs = [n + (index - (len(PERCENTILES) - 1) / 2) * width for n in range(len(names))]
            ys = [results[t].latency_ms[percentile] for t in names]
            panel.bar(xs, ys, width, label=percentile, color=SHADES[index % len(SHADES)])
        panel.set_xticks(range(len(names)), names, fontsize=8)
        panel.set_ylabel("ms (lower is better)")
        panel.set_title(cell.label, fontsize=10)
        panel.grid(axis="y", alpha=0.3)
        panel.set_axisbelow(True)
    for panel in list(axes.flat)[len(cells) :]:
        panel.set_visible(False)
    axes.flat[0].legend(fontsize=8, title="latency", title_fontsize=8)
    fig.suptitle(f"{scenario.title}: latency percentiles per target")
    fig.tight_layout()
    path = directory / f"{scenario.slug}-latency.png"
    fig.savefig(path)
    plt.close(fig)
    written["latency"] = path
    return written
