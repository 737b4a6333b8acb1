"""A fleet against one limit: what several sidecars sharing one Redis admit over time, as a PNG.

Three ``llmroute-sidecar`` processes (as shipped, on a real redis-server) serve one route with a
``requestsPerMinute`` limit; an open-loop client sends requests on a fixed schedule (each at its
time, whatever the answers before it were; ``Retry-After`` ignored) round-robin over the three, at a
multiple of the limit's rate, for longer than one window so the sliding window is seen sliding.
Every answer is recorded (when it was sent, when it came back, which pod, its status), then turned
into series: cumulative offered, admitted (fleet and per pod) and 429s, and the admissions in the
trailing 60 s. For contrast, the same requests are replayed through a simulated sliding log per pod
(what per-pod limiters of the same value would have admitted) and through one for the whole fleet
(what an exact fleet-wide limit admits).

``bench/run.py`` runs it last (``--no-fleet`` skips it); ``--update-docs`` writes
``docs/quotas/fleet-admitted.png`` and rewrites the ``fleet-plot`` marked section of docs/quotas.md.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "fleet-plot"
X = "\N{MULTIPLICATION SIGN}"
ADMITTED = 200
REJECTED = 429


@dataclass(frozen=True)
class FleetConfig:
    pods: int = 3
    limit: int = 300
    """The route's ``requestsPerMinute``, shared by the fleet."""
    rate: float = 20.0
    """Requests per second offered to the fleet as a whole (here 4 x the limit's rate of 5/s)."""
    seconds: float = 70.0
    window: float = 60.0

    @property
    def offered(self) -> int:
        return int(self.rate * self.seconds)


@dataclass(frozen=True)
class Sample:
    """One request: sent and answered (seconds since the traffic started), its pod, its status (0:
    no HTTP answer)."""

    sent: float
    done: float
    pod: int
    status: int


def schedule(config: FleetConfig) -> list[tuple[float, int]]:
    """``(offset in seconds, pod)`` of every request: evenly spaced at ``rate``, round-robin."""
    return [(index / config.rate, index % config.pods) for index in range(config.offered)]


# -- pure: samples -> numbers and series --------------------------------------------------------------


def sliding_log(times: list[float], limit: int, window: float) -> list[bool]:
    """Which of the requests at ``times`` (ascending) a sliding log of ``limit`` per ``window``
    admits: a request passes when fewer than ``limit`` admitted ones lie in the ``window`` before it.
    A rejected request consumes nothing, as in the Redis store."""
    admitted: deque[float] = deque()
    decisions = []
    for now in times:
        while admitted and admitted[0] <= now - window:
            admitted.popleft()
        passes = len(admitted) < limit
        if passes:
            admitted.append(now)
        decisions.append(passes)
    return decisions


def cumulative(times: list[float], grid: list[float]) -> list[int]:
    """For each point of ``grid``: how many of ``times`` are at or before it."""
    ordered = sorted(times)
    return [bisect.bisect_right(ordered, point) for point in grid]


def trailing(times: list[float], grid: list[float], window: float) -> list[int]:
    """For each point ``t`` of ``grid``: how many of ``times`` lie in ``(t - window, t]``."""
    ordered = sorted(times)
    return [
        bisect.bisect_right(ordered, point) - bisect.bisect_right(ordered, point - window) for point in grid
    ]


def most_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any half-open interval of length ``window``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, now in enumerate(ordered):
        while ordered[start] <= now - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def per_pod_limits(samples: list[Sample], config: FleetConfig) -> list[float]:
    """Send times of the requests per-pod limiters (each pod its own ``limit``) would have admitted."""
    kept: list[float] = []
    for pod in range(config.pods):
        times = sorted(s.sent for s in samples if s.pod == pod)
        kept += [
            t for t, ok in zip(times, sliding_log(times, config.limit, config.window), strict=True) if ok
        ]
    return sorted(kept)


@dataclass(frozen=True)
class FleetSummary:
    offered: int
    admitted: int
    rejected: int
    other: dict[int, int]
    """Statuses other than 200 and 429 (0: no HTTP answer), with their counts."""
    per_pod: list[int]
    """Admitted, per pod."""
    per_pod_rejected: list[int]
    """Answered 429, per pod."""
    most_in_window: int
    """The most admissions in any window, by the time the client got the answer."""
    exact: int
    """What an exact sliding log over the whole fleet admits of the same requests (send times)."""
    per_pod_limits: int
    """What per-pod limiters of the same value would have admitted of the same requests."""
    first_rejected: float | None
    """When the first 429 was answered (seconds since the start)."""
    seconds: float
    """From the first request sent to the last answer."""


def summarize(samples: list[Sample], config: FleetConfig) -> FleetSummary:
    statuses = Counter(s.status for s in samples)
    admitted = [s.done for s in samples if s.status == ADMITTED]
    sent = sorted(s.sent for s in samples)
    rejected = [s.done for s in samples if s.status == REJECTED]
    return FleetSummary(
        offered=len(samples),
        admitted=statuses[ADMITTED],
        rejected=statuses[REJECTED],
        other={status: n for status, n in sorted(statuses.items()) if status not in (ADMITTED, REJECTED)},
        per_pod=[
            sum(1 for s in samples if s.pod == pod and s.status == ADMITTED) for pod in range(config.pods)
        ],
        per_pod_rejected=[
            sum(1 for s in samples if s.pod == pod and s.status == REJECTED) for pod in range(config.pods)
        ],
        most_in_window=most_in_window(admitted, config.window),
        exact=sum(sliding_log(sent, config.limit, config.window)),
        per_pod_limits=len(per_pod_limits(samples, config)),
        first_rejected=min(rejected) if rejected else None,
        seconds=max((s.done for s in samples), default=0.0),
    )


@dataclass
class FleetSeries:
    """Everything the plot draws, on one time grid (seconds since the start)."""

    grid: list[float]
    offered: list[int]
    admitted: list[int]
    per_pod: list[list[int]]
    rejected: list[int]
    per_pod_limits: list[int]
    """Cumulative admissions of simulated per-pod limiters over the same requests."""
    window_admitted: list[int]
    """Admissions in the trailing window, measured."""
    window_per_pod_limits: list[int] = field(default_factory=list)
    """Admissions in the trailing window, simulated per-pod limiters."""


def series(samples: list[Sample], config: FleetConfig, step: float = 0.25) -> FleetSeries:
    end = max((s.done for s in samples), default=0.0)
    grid = [round(i * step, 6) for i in range(int(end / step) + 2)]
    admitted = [s.done for s in samples if s.status == ADMITTED]
    local = per_pod_limits(samples, config)
    return FleetSeries(
        grid=grid,
        offered=cumulative([s.sent for s in samples], grid),
        admitted=cumulative(admitted, grid),
        per_pod=[
            cumulative([s.done for s in samples if s.pod == pod and s.status == ADMITTED], grid)
            for pod in range(config.pods)
        ],
        rejected=cumulative([s.done for s in samples if s.status == REJECTED], grid),
        per_pod_limits=cumulative(local, grid),
        window_admitted=trailing(admitted, grid, config.window),
        window_per_pod_limits=trailing(local, grid, config.window),
    )


# -- pure: the Markdown section and the docs update ---------------------------------------------------


def section(summary: FleetSummary, config: FleetConfig, image: str, command: str, machine: str) -> str:
    """The marked section of docs/quotas.md: the plot, the numbers measured, how they were made."""
    limit_rate = config.limit / config.window
    multiple = config.rate / limit_rate
    pods = ", ".join(f"pod {n} {count}" for n, count in enumerate(summary.per_pod, 1))
    other = (
        ", ".join(f"{n} {X} {'no answer' if status == 0 else status}" for status, n in summary.other.items())
        if summary.other
        else "none"
    )
    first = "—" if summary.first_rejected is None else f"{summary.first_rejected:.1f} s"
    rows = [
        ("requests sent", f"{summary.offered:,}"),
        ("admitted by the fleet (200)", f"**{summary.admitted:,}** ({pods})"),
        ("rejected (429)", f"{summary.rejected:,}, the first after {first}"),
        ("other answers", other),
        (
            f"most admitted in any {config.window:.0f} s (by answer time)",
            f"**{summary.most_in_window:,}** (limit {config.limit:,})",
        ),
        ("an exact fleet-wide sliding log, replayed over the same requests", f"{summary.exact:,}"),
        (
            f"per-pod limiters of {config.limit:,} each, replayed over the same requests",
            f"{summary.per_pod_limits:,}",
        ),
    ]
    lines = [
        f"<!-- {MARKER} -->",
        f"### Measured: {config.pods} sidecars, one limit",
        "",
        f"![Admitted vs the limit over time: {config.pods} sidecars sharing one Redis]({image})",
        "",
        f"{config.pods} `llmroute-sidecar` processes (as shipped) share one real redis-server and serve "
        f"one route limit of `requestsPerMinute: {config.limit}`. A client sends "
        f"{config.rate:.3g} requests per second ({multiple:.3g} {X} the limit's {limit_rate:.3g}/s) for "
        f"{config.seconds:g} s, round-robin over the {config.pods}, open loop (each request at its "
        "scheduled time whatever the earlier answers were; `Retry-After` ignored).",
        "",
        "| | requests |",
        "| --- | ---: |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        *reading(summary, config),
        "",
        f"Regenerated by {command}; machine: {machine}.",
        f"<!-- /{MARKER} -->",
    ]
    return "\n".join(lines)


def reading(summary: FleetSummary, config: FleetConfig) -> list[str]:
    """What the plot shows, in words that follow the numbers measured."""
    text = []
    if summary.first_rejected is not None:
        where = "on every pod" if all(summary.per_pod_rejected) else "on the pods asked"
        text.append(
            f"The fleet admitted its {config.limit:,} in the first {summary.first_rejected:.1f} s and "
            f"answered 429 {where} for the rest of the window"
            + (
                f"; from {config.window:.0f} s the first admissions leave the sliding window and "
                "admissions resume at the rate they left it — no window boundary at which twice the "
                "limit passes."
                if summary.seconds > config.window
                else "."
            )
        )
    else:
        text.append(f"The fleet never reached its {config.limit:,}: nothing was rejected.")
    text.append(
        f"The dashed line is what per-pod limiters of {config.limit:,} would have let through "
        f"(up to {config.pods} {X} the limit a minute), replayed over the same requests. The lower panel "
        f"counts admissions in the trailing {config.window:.0f} s, measured at the client (answer "
        "times: a request admitted within milliseconds of a window's edge can land on either side)."
    )
    return [" ".join(text)]


_BLOCK = re.compile(rf"<!-- {MARKER} -->\n.*?<!-- /{MARKER} -->", re.S)


def update_marked(text: str, block: str) -> str:
    """``text`` with its ``fleet-plot`` marked section replaced by ``block`` (appended when there is
    none); everything outside the markers is left as it was."""
    if _BLOCK.search(text) is None:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return _BLOCK.sub(lambda _: block, text, count=1)


# -- the plot -----------------------------------------------------------------------------------------


def plot(data: FleetSeries, summary: FleetSummary, config: FleetConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9.0, 7.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    grid = data.grid
    local = config.pods * config.limit
    top.plot(grid, data.offered, color="#7f7f7f", linestyle=":", label="sent")
    top.plot(
        grid,
        data.per_pod_limits,
        color="#ff7f0e",
        linestyle="--",
        label=f"per-pod limits would admit (simulated; {config.pods} {X} {config.limit} a minute)",
    )
    top.plot(grid, data.rejected, color="#d62728", label="answered 429 (fleet)")
    blues = ("#6baed6", "#4292c6", "#9ecae1", "#2171b5", "#c6dbef")
    for pod, counts in enumerate(data.per_pod):
        top.plot(grid, counts, color=blues[pod % len(blues)], linewidth=1, label=f"admitted by pod {pod + 1}")
    top.plot(grid, data.admitted, color="#08306b", linewidth=2.4, label="admitted by the fleet")
    top.axhline(config.limit, color="black", linewidth=1)
    top.annotate(
        f"limit {config.limit}/min", (0, config.limit), xytext=(2, 3), textcoords="offset points", fontsize=8
    )
    top.axhline(local, color="#ff7f0e", linewidth=0.8, linestyle=":")
    top.annotate(
        f"{config.pods} {X} limit",
        (0, local),
        xytext=(2, 3),
        textcoords="offset points",
        fontsize=8,
        color="#ff7f0e",
    )
    top.set_ylabel("requests, cumulative")
    top.set_title(
        f"{config.pods} sidecars, one Redis, requestsPerMinute: {config.limit}; "
        f"{config.rate:g} req/s sent round-robin",
        fontsize=10,
    )
    top.legend(fontsize=7.5, loc="upper left", framealpha=0.9)

    bottom.plot(
        grid, data.window_per_pod_limits, color="#ff7f0e", linestyle="--", label="per-pod limits (simulated)"
    )
    bottom.plot(grid, data.window_admitted, color="#08306b", linewidth=2.2, label="admitted by the fleet")
    bottom.axhline(config.limit, color="black", linewidth=1, label=f"limit ({config.limit})")
    bottom.set_ylabel(f"admitted in the last {config.window:.0f} s")
    bottom.set_xlabel("seconds since the first request")
    bottom.set_ylim(0, max(local, max(data.window_per_pod_limits, default=0)) * 1.1 or 1)
    bottom.legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    for panel in (top, bottom):
        if grid and grid[-1] > config.window:
            panel.axvline(config.window, color="#999999", linewidth=0.8, linestyle="-.")
        panel.grid(alpha=0.3)
        panel.set_axisbelow(True)
        panel.set_xlim(0, grid[-1] if grid else 1)
    if grid and grid[-1] > config.window:
        bottom.annotate(
            "first admissions leave the window",
            (config.window, 0),
            xytext=(-4, 4),
            textcoords="offset points",
            fontsize=7.5,
            ha="right",
            color="#666666",
        )
    fig.suptitle(
        f"Admitted vs the limit over time: {summary.admitted} of {summary.offered} admitted, "
        f"at most {summary.most_in_window} in any {config.window:.0f} s",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the run ------------------------------------------------------------------------------------------


def write_route(path: Path, upstream: str, config: FleetConfig, name: str) -> Path:
    manifest = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "selector": {"matchLabels": {"app": "bench-fleet"}},
            "upstream": {"url": upstream, "timeoutSeconds": 30, "retries": 0},
            "deadlineSeconds": 60,
            "limits": [{"name": "fleet", "key": "route", "requestsPerMinute": config.limit}],
        },
    }
    path.write_text(json.dumps(manifest))
    return path


async def drive(urls: list[str], config: FleetConfig) -> list[Sample]:
    """Send the schedule (open loop) and record every answer."""
    import aiohttp

    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.monotonic()

        async def one(pod: int) -> None:
            sent = time.monotonic() - start
            try:
                async with session.post(f"{urls[pod]}/v1/chat/completions", json=body) as response:
                    await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            samples.append(Sample(sent, time.monotonic() - start, pod, status))

        tasks = []
        for offset, pod in schedule(config):
            delay = start + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(pod)))
        await asyncio.gather(*tasks)
    return sorted(samples, key=lambda s: s.sent)


def run(config: FleetConfig, workdir: Path, redis_url: str) -> list[Sample]:
    """A fresh mock upstream and ``config.pods`` sidecars on ``redis_url``, the traffic, the answers."""
    from bench import targets

    workdir.mkdir(parents=True, exist_ok=True)
    mock = targets.mock_upstream(workdir, *targets.ZERO_LATENCY)
    pods: list[targets.Proc] = []
    try:
        # A route name of its own: nothing else in this Redis counts against (or in) its limit.
        route = write_route(workdir / "fleet-route.json", mock.url, config, f"fleet-{time.time_ns():x}")
        for pod in range(config.pods):
            pods.append(targets.sidecar(workdir, route, f"fleet-pod-{pod + 1}", "--redis", redis_url))
        return asyncio.run(drive([p.url for p in pods], config))
    finally:
        for proc in pods:
            proc.stop()
        mock.stop()
