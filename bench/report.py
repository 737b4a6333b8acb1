"""The report: ratios and added latency against the baselines, Markdown, and the docs update that keeps
hand-written sections (``<!-- name -->`` ... ``<!-- /name -->``) across regenerations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bench.cpu import ticks_per_second
from bench.wrk import WrkResult

DIRECT = "direct"
FLOOR = "floor"
TARGETS = ("direct", "nginx", "floor", "sidecar-memory", "sidecar-redis")
SIDECARS = ("sidecar-memory", "sidecar-redis")
X = "\N{MULTIPLICATION SIGN}"  # the ratio columns: req/s over a baseline


@dataclass(frozen=True)
class Cell:
    """One column of the matrix: connections held open by wrk, and the body kind."""

    connections: int
    stream: bool

    @property
    def body(self) -> str:
        return "SSE" if self.stream else "JSON"

    @property
    def label(self) -> str:
        noun = "connection" if self.connections == 1 else "connections"
        return f"{self.connections} {noun}, {self.body}"

    @property
    def short(self) -> str:
        return f"c={self.connections} {self.body}"


@dataclass(frozen=True)
class Scenario:
    slug: str
    title: str
    description: str
    mock_args: tuple[str, ...]
    cells: tuple[Cell, ...]
    seconds: int
    rounds: int = 1
    """Each (cell, target) is measured this many times, targets in alternating order; the round with
    the most req/s is kept (noise on a shared machine only ever slows a run down)."""


@dataclass
class ScenarioResult:
    scenario: Scenario
    results: dict[Cell, dict[str, WrkResult]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """target -> why it was not measured."""
    access_lines: dict[str, int] = field(default_factory=dict)
    """sidecar target -> access-log records it wrote (warm-ups and every round included)."""
    errors_seen: dict[tuple[Cell, str], int] = field(default_factory=dict)
    """(cell, target) -> errors over every round, the ones not kept included."""

    def add(self, cell: Cell, target: str, result: WrkResult) -> bool:
        """Record one round; it is kept when it is the first or the fastest so far (True then)."""
        key = (cell, target)
        self.errors_seen[key] = self.errors_seen.get(key, 0) + result.errors
        kept = self.results.setdefault(cell, {})
        if target in kept and kept[target].rps >= result.rps:
            return False
        kept[target] = result
        return True


@dataclass(frozen=True)
class Row:
    """One target in one cell, compared with the baselines measured in the same cell."""

    target: str
    result: WrkResult
    vs_direct: float | None
    vs_floor: float | None
    added_p50: float | None
    added_p99: float | None
    cpu_us: float | None = None
    """The target process's CPU microseconds per request (for direct: the mock upstream's)."""
    cpu_vs_floor: float | None = None
    """``cpu_us`` over floor's (higher is costlier, unlike the req/s ratios)."""


def ratio(value: float, base: float | None) -> float | None:
    return value / base if base else None


def compare(results: dict[str, WrkResult]) -> list[Row]:
    """Rows in TARGETS order (then any other target): req/s ratios, p50/p99 added over direct (ms)."""
    direct = results.get(DIRECT)
    floor = results.get(FLOOR)
    floor_cpu = floor.cpu_us_per_request if floor else None
    order = [t for t in TARGETS if t in results] + [t for t in results if t not in TARGETS]
    rows = []
    for target in order:
        result = results[target]
        rows.append(
            Row(
                target,
                result,
                ratio(result.rps, direct.rps if direct else None),
                ratio(result.rps, floor.rps if floor else None),
                None if direct is None else result.latency_ms["p50"] - direct.latency_ms["p50"],
                None if direct is None else result.latency_ms["p99"] - direct.latency_ms["p99"],
                result.cpu_us_per_request,
                None if result.cpu_us_per_request is None else ratio(result.cpu_us_per_request, floor_cpu),
            )
        )
    return rows


# -- formatting ---------------------------------------------------------------------------------------


def fmt_ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    digits = 2 if abs(value) < 10 else 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def fmt_us(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def fmt_errors(result: WrkResult, seen: int = 0) -> str:
    """The kept round's errors, by kind; plus the total over all rounds when that is more."""
    parts = [f"status {result.status_errors}"] if result.status_errors else []
    parts += [f"{name} {count}" for name, count in result.socket_errors.items() if count]
    text = f"{result.errors} ({', '.join(parts)})" if parts else "0"
    return f"{text}; {seen} in all rounds" if seen > result.errors else text


def table(rows: list[list[str]], header: list[str], align: str) -> list[str]:
    """A Markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def cell_table(results: dict[str, WrkResult], errors_seen: dict[str, int] | None = None) -> list[str]:
    """``errors_seen``: target -> errors over every round (shown when more than the kept round's)."""
    header = [
        "target",
        "req/s",
        f"{X} direct",
        f"{X} floor",
        "p50 ms",
        "p99 ms",
        "p50 added ms",
        "p99 added ms",
        "CPU µs/req",
        f"CPU {X} floor",
        "errors",
    ]
    rows = []
    for row in compare(results):
        direct = row.target == DIRECT
        rows.append(
            [
                f"`{row.target}`",
                f"{row.result.rps:.0f}",
                fmt_ratio(row.vs_direct),
                fmt_ratio(row.vs_floor),
                fmt_ms(row.result.latency_ms["p50"]),
                fmt_ms(row.result.latency_ms["p99"]),
                "—" if direct else fmt_ms(row.added_p50, signed=True),
                "—" if direct else fmt_ms(row.added_p99, signed=True),
                fmt_us(row.cpu_us),
                fmt_ratio(row.cpu_vs_floor),
                fmt_errors(row.result, (errors_seen or {}).get(row.target, 0)),
            ]
        )
    return table(rows, header, "lrrrrrrrrrr")


def glance_table(outcome: ScenarioResult) -> list[str]:
    """Per cell: the baselines' req/s and the floor's CPU per request; each sidecar's req/s and its share
    of the floor's, its CPU per request and its multiple of the floor's, its p50 added over direct."""
    sidecars = [s for s in SIDECARS if any(s in r for r in outcome.results.values())]
    header = ["load", "direct req/s", "floor req/s", "floor CPU µs/req"]
    for name in sidecars:
        header += [f"`{name}` req/s", f"{X} floor", "CPU µs/req", f"CPU {X} floor", "p50 added ms"]
    rows = []
    for cell in outcome.scenario.cells:
        results = outcome.results.get(cell, {})
        by_target = {row.target: row for row in compare(results)}
        line = [cell.label]
        for base in (DIRECT, FLOOR):
            line.append(f"{results[base].rps:.0f}" if base in results else "—")
        line.append(fmt_us(results[FLOOR].cpu_us_per_request) if FLOOR in results else "—")
        for name in sidecars:
            row = by_target.get(name)
            if row is None:
                line += ["—"] * 5
            else:
                line += [
                    f"{row.result.rps:.0f}",
                    fmt_ratio(row.vs_floor),
                    fmt_us(row.cpu_us),
                    fmt_ratio(row.cpu_vs_floor),
                    fmt_ms(row.added_p50, signed=True),
                ]
        rows.append(line)
    return table(rows, header, "l" + "r" * (len(header) - 1))


def scenario_section(outcome: ScenarioResult, images: dict[str, str]) -> list[str]:
    """``images``: plot kind ("throughput", "latency") -> link relative to the report."""
    scenario = outcome.scenario
    rounds = (
        f", the best of {scenario.rounds} rounds (targets in alternating order, fresh processes each round)"
        if scenario.rounds > 1
        else ", one round"
    )
    lines = [
        f"## {scenario.title}",
        "",
        f"{scenario.description} Each run lasts {scenario.seconds} s{rounds}.",
        "",
    ]
    for kind, link in images.items():
        lines += [f"![{scenario.title}: {kind}]({link})", ""]
    for cell in scenario.cells:
        results = outcome.results.get(cell)
        if not results:
            continue
        seen = {target: n for (c, target), n in outcome.errors_seen.items() if c == cell}
        lines += [f"### {cell.label}", "", *cell_table(results, seen), ""]
    if outcome.skipped:
        skipped = "; ".join(f"`{name}`: {why}" for name, why in outcome.skipped.items())
        lines += [f"Skipped — {skipped}.", ""]
    if outcome.access_lines:
        counts = ", ".join(f"`{name}` {count}" for name, count in outcome.access_lines.items())
        lines += [f"Access-log lines the sidecars wrote (warm-ups and all rounds included): {counts}.", ""]
    return lines


def calls_section(calls: dict[tuple[str, bool], float]) -> list[str]:
    """``calls``: (store, stream) -> Python calls per request, from bench/work.py."""
    if not calls:
        return []
    stores = [s for s in ("memory", "redis") if any(k[0] == s for k in calls)]
    rows = []
    for store in stores:
        cells = [calls.get((store, stream)) for stream in (False, True)]
        rows.append([f"{store} store", *("—" if c is None else f"{c:.0f}" for c in cells)])
    return [
        "## Python calls per request",
        "",
        "Counted, not timed, by `bench/work.py`: one sidecar in its process (access logs at INFO), "
        "sequential keep-alive requests, every Python function call in the process under `cProfile` "
        "(the sidecar's, the event loop's and the tiny client's) divided by the requests. These counts "
        "barely move from machine to machine, so they are the number to watch when the request path "
        "changes.",
        "",
        *table(rows, ["store", "JSON", "SSE (16 tokens)"], "lrr"),
        "",
    ]


# -- hand-written sections ----------------------------------------------------------------------------

_KEPT = re.compile(r"<!-- (?P<name>[a-z0-9-]+) -->\n.*?<!-- /(?P=name) -->", re.S)
PROFILE_PLACEHOLDER = """<!-- profile -->
## Profile

Hand-written notes (profiles, findings) go between this section's two `profile` comment markers:
`make bench UPDATE_DOCS=1` rewrites everything else in this file and keeps them. None yet.
<!-- /profile -->"""


def kept_sections(text: str) -> dict[str, str]:
    """Hand-written blocks of ``text``, by name, markers included."""
    return {match["name"]: match[0] for match in _KEPT.finditer(text)}


def merge_kept(generated: str, previous: str | None) -> str:
    """``generated`` with the hand-written blocks of ``previous`` in place of its same-named blocks;
    a block ``generated`` has no slot for is appended, so none is ever dropped."""
    if not previous:
        return generated
    old = kept_sections(previous)
    slots = kept_sections(generated)
    out = generated
    for name, block in old.items():
        if name in slots:
            out = out.replace(slots[name], block, 1)
        else:
            out = out.rstrip("\n") + "\n\n" + block + "\n"
    return out


# -- the whole report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    command: str
    machine: str
    seconds: str
    """How long each run lasted, in words (e.g. '5 s after a 1 s warm-up')."""


def render(
    context: Context,
    outcomes: list[ScenarioResult],
    calls: dict[tuple[str, bool], float],
    images: dict[str, dict[str, str]],
    profile_slot: bool = True,
) -> str:
    """``images``: scenario slug -> plot kind -> link relative to the report."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `make bench UPDATE_DOCS=1` (bench/run.py); edit only the marked hand-written "
        "sections, the rest is rewritten. -->",
        "",
        f"Command: {context.command}",
        "",
        f"Machine: {context.machine}. wrk (the load), the proxies, the mock upstream and redis-server "
        "all share these cores over loopback: every number is relative to the others measured in the "
        "same run, not an absolute capacity.",
        "",
        "Load: [wrk](https://github.com/wg/wrk) (C, one thread, closed loop: each connection sends its "
        f"next request when the previous answer has been read to its end), {context.seconds}, POSTing "
        '`/v1/chat/completions` (`max_tokens` 16); SSE answers (`"stream": true`, 16 tokens) are read '
        "to the last chunk. Targets, each in front of a fresh mock upstream "
        "(`llmroute_sidecar.mockupstream`):",
        "",
        "- `direct`: wrk talks to the mock itself — the baseline for added latency;",
        "- `nginx`: a plain nginx reverse proxy (keep-alive pool, no buffering, no access log);",
        "- `floor`: `bench/floor.py`, a bare aiohttp pass-through with one `EVALSHA` per request on a "
        "real redis-server — what any Python proxy on aiohttp and redis-py pays;",
        "- `sidecar-memory`, `sidecar-redis`: `llmroute-sidecar` as shipped (access logs on, "
        "`LLMROUTE_LOG_LEVEL=INFO`, written to a file), one route-keyed limit with requestsPerMinute, "
        "tokensPerMinute and concurrentRequests (never reached) checked and settled on every request; "
        "in-process store, or a real redis-server.",
        "",
        f"Columns: `{X} direct` and `{X} floor` are req/s ratios; `p50 added` / `p99 added` are the "
        "target's percentile minus `direct`'s, in the same cell; `CPU µs/req` is the CPU time (user + "
        "system, all threads, from `/proc/<pid>/stat`) the target process itself spent during the "
        "measured run divided by the requests wrk completed — for `direct` the mock upstream's, for "
        "nginx its master and worker, for the others the proxy process alone (not the mock, not "
        f"redis-server, not wrk); `CPU {X} floor` is that over `floor`'s (higher costs more); errors are "
        "answers with status ≥ 400 plus socket errors (connect, read, write, timeout).",
        "",
    ]
    first = next((o for o in outcomes if o.results), None)
    if first is not None:
        lines += [f"## At a glance ({first.scenario.title.lower()})", "", *glance_table(first), ""]
    for outcome in outcomes:
        lines += scenario_section(outcome, images.get(outcome.scenario.slug, {}))
    lines += calls_section(calls)
    lines += [
        "## Reading it",
        "",
        "The zero-latency scenario is the worst case: the upstream answers at once, so each request's "
        "time is the proxies' own work (parsing, admission and settlement, SSE scanning for usage, "
        f"logging), and every process competes for the same cores as wrk and the mock. `{X} floor` is "
        f"the sidecar's cost over the least a Python/aiohttp/Redis proxy can do; `{X} direct` includes "
        "the cost of being a Python proxy at all. With one connection, latency is the story (one "
        "request at a time); with 32, throughput is. The LLM-like scenario is what a client of a real "
        "model server sees: a few added milliseconds against answers that take tens to hundreds. Other "
        "work on shared cores slows whichever target is being measured at that moment: that is why the "
        "zero-latency numbers are the best of several rounds, and why a cell still moves by 10-30 % "
        "between runs. Read ratios within one run, and repeat the command before reading much into "
        "one difference.",
        "",
        "CPU per request is the steadier number: contention on the shared cores makes a process wait "
        "for a core, which costs throughput and latency but barely changes the CPU time it spends on "
        f"each request, so `CPU µs/req` and `CPU {X} floor` move far less between runs than req/s (and "
        "are the numbers to compare across runs and commits). It is the cost a pod pays in CPU "
        "requests per unit of traffic: at 1,000 µs per request one core serves at most 1,000 "
        f"requests per second. It is read in kernel clock ticks ({1000 / ticks_per_second():g} ms here) "
        "over runs of "
        "hundreds to thousands of requests, so it is good to a few per cent; the requests still in "
        "flight when wrk stops are served but not counted, which overstates it slightly at 32 "
        "connections. It does not include what a request costs elsewhere (redis-server, the mock "
        "upstream): the `direct` row is the mock's own cost, the reference for what a minimal Python "
        "HTTP server spends.",
        "",
    ]
    if profile_slot:
        lines += [PROFILE_PLACEHOLDER, ""]
    return "\n".join(lines)
