"""``make bench``: the sidecar's cost, as ratios against baselines measured in the same run.

Load comes from wrk (C, one thread), so the client barely takes CPU from the proxies. Targets, each in
front of a fresh mock upstream on loopback:

- direct: wrk talks to the mock upstream itself (the baseline);
- nginx: a plain nginx reverse proxy (when nginx is installed);
- floor: bench/floor.py, a bare aiohttp pass-through with one EVALSHA per request (real redis-server);
- sidecar-memory / sidecar-redis: llmroute-sidecar as shipped (access logs on at INFO), in-process
  store or a real redis-server.

Matrix: 1 and 32 connections x JSON and SSE against a zero-latency mock (the proxies' own cost), then
a smaller LLM-like table (the mock's default latencies); plus the Python calls per request counted by
bench/work.py. The CPU time each target process spends per request is read from /proc around every
measured run (bench/cpu.py). Last, bench/fleet.py runs three sidecars on one redis-server against one
requestsPerMinute limit and plots admitted vs the limit over time (``--no-fleet`` skips it).

Progress goes to stderr; the report (Markdown and PNG plots) to bench/results/, or with
``--update-docs`` (``make bench UPDATE_DOCS=1``) to docs/benchmarks.md and docs/benchmarks/ (keeping
the hand-written sections marked in docs/benchmarks.md), and the fleet plot to docs/quotas/ and the
``fleet-plot`` marked section of docs/quotas.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fleet, targets  # noqa: E402
from bench.cpu import cpu_seconds, spent  # noqa: E402
from bench.report import (  # noqa: E402
    TARGETS,
    Cell,
    Context,
    Scenario,
    ScenarioResult,
    merge_kept,
    render,
)
from bench.wrk import WrkResult, lua_script, run_wrk, wrk_binary  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "benchmarks.md"
DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_IMAGES = ROOT / "docs" / "benchmarks"
QUOTAS_DOC = ROOT / "docs" / "quotas.md"
QUOTAS_IMAGES = ROOT / "docs" / "quotas"
FLEET_PNG = "fleet-admitted.png"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
CALLS_LINE = re.compile(r"^(\d+(?:\.\d+)?) Python calls per request", re.M)


def progress(text: str) -> None:
    """A progress line on stderr (the report itself goes to stdout and to its file)."""
    print(text, file=sys.stderr, flush=True)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    connections = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    matrix = tuple(Cell(c, stream) for c in connections for stream in (False, True))
    known = {
        "zero": Scenario(
            "zero",
            "Zero-latency upstream",
            "The mock answers at once (`--first-token-latency 0 --token-interval 0 --json-latency 0`): "
            "each request's time is the proxies' own work. The worst case for a proxy, and the one "
            "the sidecar's cost is judged on.",
            targets.ZERO_LATENCY,
            matrix,
            args.duration,
            args.rounds,
        ),
        "llm": Scenario(
            "llm",
            "LLM-like upstream",
            "The mock with its default latencies: JSON answers after 50 ms; streams send their first "
            "token after 50 ms, then 16 tokens 10 ms apart. What a client of a model server sees.",
            (),
            tuple(Cell(c, stream) for c in connections if c == max(connections) for stream in (False, True)),
            args.llm_duration,
        ),
    }
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip() and s.strip() != "none"]
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise SystemExit(f"bench/run.py: unknown scenario(s) {', '.join(unknown)}; known: zero, llm")
    return [known[s] for s in chosen]


class Bench:
    """One benchmark run: its work directory, wrk, the shared redis-server, and the scripts."""

    def __init__(self, args: argparse.Namespace, workdir: Path, wrk: str, redis_url: str | None) -> None:
        self.args = args
        self.workdir = workdir
        self.wrk = wrk
        self.redis_url = redis_url
        self.scripts = {
            stream: self._script(f"{'sse' if stream else 'json'}.lua", {**BODY, "stream": stream})
            for stream in (False, True)
        }
        self.failed = False

    def _script(self, name: str, body: dict[str, object]) -> Path:
        path = self.workdir / name
        path.write_text(lua_script(body))
        return path

    def start(self, target: str, upstream: str, scenario: Scenario) -> targets.Proc | str:
        """The target's process (None for direct), or why it is skipped."""
        workdir = self.workdir / scenario.slug
        workdir.mkdir(exist_ok=True)
        if target == "nginx":
            if targets.nginx_binary() is None:
                return "nginx is not installed (`apt-get install nginx` adds this baseline)"
            return targets.nginx(workdir, upstream)
        if target in ("floor", "sidecar-redis") and self.redis_url is None:
            return "redis-server is not installed (`make system-deps` installs it)"
        if target == "floor":
            assert self.redis_url is not None
            return targets.floor(workdir, upstream, self.redis_url)
        from bench.work import write_route

        route = write_route(workdir / f"{target}-route.json", upstream)
        if target == "sidecar-memory":
            return targets.sidecar(workdir, route, target, "--store", "memory")
        if target == "sidecar-redis":
            assert self.redis_url is not None
            return targets.sidecar(workdir, route, target, "--redis", self.redis_url)
        raise ValueError(f"unknown target {target!r}")

    def measure(self, url: str, cell: Cell, seconds: int, pid: int | None = None) -> WrkResult:
        """One wrk run after the warm-up; with ``pid``, the CPU that process spent during the run."""
        endpoint = f"{url}/v1/chat/completions"
        script = self.scripts[cell.stream]
        if self.args.warmup > 0:  # connections, pools, scripts, caches; its numbers are dropped
            run_wrk(self.wrk, endpoint, script, cell.connections, self.args.warmup)
        before = cpu_seconds(pid) if pid else None
        result = run_wrk(self.wrk, endpoint, script, cell.connections, seconds)
        after = cpu_seconds(pid) if pid else None
        return dataclasses.replace(result, cpu_seconds=spent(before, after))

    def scenario(self, scenario: Scenario, chosen: list[str], number: str) -> ScenarioResult:
        """Every target, round after round (the order reversed each round); the fastest round kept."""
        outcome = ScenarioResult(scenario)
        for round_number in range(1, scenario.rounds + 1):
            order = chosen if round_number % 2 else list(reversed(chosen))
            for index, target in enumerate(order, 1):
                if target in outcome.skipped:
                    continue
                tag = f"[{number} {scenario.slug}"
                if scenario.rounds > 1:
                    tag += f" round {round_number}/{scenario.rounds}"
                tag += f" {index}/{len(order)}] {target}"
                self.target(scenario, target, tag, outcome)
        return outcome

    def target(self, scenario: Scenario, target: str, tag: str, outcome: ScenarioResult) -> None:
        """One round of one target: a fresh mock upstream and target process, every cell measured."""
        mock = targets.mock_upstream(self.workdir, *scenario.mock_args)
        proc: targets.Proc | str | None = None
        try:
            proc = None if target == "direct" else self.start(target, mock.url, scenario)
            if isinstance(proc, str):
                outcome.skipped[target] = proc
                progress(f"{tag}: skipped ({proc})")
                return
            served_by = mock if proc is None else proc  # direct: the mock is the target
            pid = served_by.process.pid if served_by.process is not None else None
            for cell in scenario.cells:
                result = self.measure(served_by.url, cell, scenario.seconds, pid)
                kept = outcome.add(cell, target, result)
                self.failed = self.failed or result.errors > 0
                progress(
                    f"{tag}, {cell.short}: {result.rps:.0f} req/s, "
                    f"p50 {result.latency_ms['p50']:.2f} ms, p99 {result.latency_ms['p99']:.2f} ms, "
                    f"{cpu_text(result)}, {result.errors} errors"
                    f"{' (kept)' if kept and scenario.rounds > 1 else ''}"
                )
        finally:
            if isinstance(proc, targets.Proc):
                proc.stop()
                if target.startswith("sidecar"):
                    lines = targets.access_lines(proc.log)
                    outcome.access_lines[target] = outcome.access_lines.get(target, 0) + lines
            mock.stop()

    def python_calls(self) -> dict[tuple[str, bool], float]:
        """bench/work.py's Python calls per request: memory and Redis store, JSON and SSE."""
        requests = self.args.work_requests
        if requests <= 0:
            return {}
        mock = targets.mock_upstream(self.workdir, *targets.ZERO_LATENCY)
        calls: dict[tuple[str, bool], float] = {}
        try:
            stores: list[tuple[str, list[str]]] = [("memory", [])]
            if self.redis_url:
                stores.append(("redis", ["--redis-url", self.redis_url]))
            for store, flags in stores:
                for stream in (False, True):
                    argv = [
                        sys.executable,
                        str(ROOT / "bench" / "work.py"),
                        "--requests",
                        str(requests),
                        "--upstream",
                        mock.url,
                        "--top",
                        "0",
                        *flags,
                        *(["--stream"] if stream else []),
                    ]
                    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
                    found = CALLS_LINE.search(done.stdout)
                    body = "SSE" if stream else "JSON"
                    if done.returncode != 0 or found is None:
                        progress(
                            f"[calls] {store} store, {body}: bench/work.py failed:\n{done.stderr[-2000:]}"
                        )
                        self.failed = True
                        continue
                    calls[(store, stream)] = float(found[1])
                    progress(f"[calls] {store} store, {body}: {found[1]} Python calls per request")
        finally:
            mock.stop()
        return calls


def cpu_text(result: WrkResult) -> str:
    found = result.cpu_us_per_request
    return "CPU not read" if found is None else f"{found:.0f} CPU µs/req"


def fleet_config(args: argparse.Namespace) -> fleet.FleetConfig:
    rate = args.fleet_rate if args.fleet_rate is not None else 4 * args.fleet_limit / 60
    return fleet.FleetConfig(limit=args.fleet_limit, rate=rate, seconds=args.fleet_seconds)


def run_fleet(
    args: argparse.Namespace, workdir: Path, redis_url: str | None, images_dir: Path, markdown_dir: Path
) -> bool:
    """The fleet plot: measured, plotted, and written (docs/quotas.md with --update-docs). True when it
    ran cleanly (every answer a 200 or a 429, and no more admitted in any window than the limit)."""
    if redis_url is None:
        progress("[fleet] skipped: redis-server is not installed (`make system-deps` installs it)")
        return True
    config = fleet_config(args)
    progress(
        f"[fleet] {config.pods} sidecars on one redis-server, requestsPerMinute {config.limit}, "
        f"{config.rate:g} req/s for {config.seconds:g} s"
    )
    samples = fleet.run(config, workdir / "fleet", redis_url)
    summary = fleet.summarize(samples, config)
    progress(
        f"[fleet] sent {summary.offered}, admitted {summary.admitted} {summary.per_pod}, "
        f"429 {summary.rejected}, "
        f"other {summary.other or 0}; at most {summary.most_in_window} in any {config.window:.0f} s; "
        f"exact sliding log {summary.exact}, per-pod limits {summary.per_pod_limits}"
    )
    try:
        written = fleet.plot(fleet.series(samples, config), summary, config, images_dir / FLEET_PNG)
    except ImportError:
        progress("[fleet] matplotlib is missing (`make bench` installs it): no PNG")
        written = images_dir / FLEET_PNG
    target = QUOTAS_DOC if args.update_docs else markdown_dir / "fleet.md"
    block = fleet.section(
        summary,
        config,
        os.path.relpath(written, target.parent),
        command_line(sys.argv[1:], args.update_docs),
        machine_short(),
    )
    if args.update_docs:
        QUOTAS_DOC.write_text(fleet.update_marked(QUOTAS_DOC.read_text(), block))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block + "\n")
    progress(f"[fleet] written to {target} and {written}")
    return not summary.other and summary.most_in_window <= config.limit


def machine_short() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, shared with the client"


def version(argv: list[str], pattern: str) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(pattern, done.stdout + done.stderr)
    return found[1] if found else None


def machine(wrk: str) -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " (" + " ".join(line.split(":", 1)[1].split()) + ")"
                break
    except OSError:
        pass
    parts = [
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{model}",
        f"Python {platform.python_version()}",
    ]
    tools = {
        "wrk": version([wrk, "--version"], r"wrk (\S+)"),
        "nginx": (version([n, "-v"], r"nginx/(\S+)") if (n := targets.nginx_binary()) else None),
        "redis-server": (
            version([r, "--version"], r"v=(\S+)") if (r := shutil.which("redis-server")) else None
        ),
    }
    parts += [f"{name} {found}" for name, found in tools.items() if found]
    return ", ".join(parts)


def command_line(argv: list[str], update_docs: bool) -> str:
    python = shlex.join(["python", "bench/run.py", *argv])
    if os.environ.get("MAKELEVEL"):
        return f"`make bench{' UPDATE_DOCS=1' if update_docs else ''}` (ran `{python}`)"
    return f"`{python}`"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description="Measure the sidecar's cost against baselines, with wrk."
    )
    parser.add_argument("--duration", type=int, default=3, help="seconds per measured run (default 3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of the zero-latency scenario, the fastest kept per cell and target (default 2)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds before each run (default 1)")
    parser.add_argument(
        "--llm-duration", type=int, default=2, help="seconds per run of the LLM-like scenario (default 2)"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}"
    )
    parser.add_argument(
        "--scenarios", default="zero,llm", help="comma-separated: zero, llm, or none (default zero,llm)"
    )
    parser.add_argument("--connections", default="1,32", help="wrk connections per cell (default 1,32)")
    parser.add_argument(
        "--work-requests",
        type=int,
        default=200,
        help="requests bench/work.py counts Python calls over (default 200; 0 skips the count)",
    )
    parser.add_argument(
        "--no-fleet", action="store_true", help="skip the fleet plot (3 sidecars, one Redis, one limit)"
    )
    parser.add_argument(
        "--fleet-seconds",
        type=float,
        default=70,
        help="seconds of fleet traffic (default 70: past one 60 s window, so it is seen sliding)",
    )
    parser.add_argument(
        "--fleet-limit", type=int, default=300, help="the fleet's requestsPerMinute (default 300)"
    )
    parser.add_argument(
        "--fleet-rate",
        type=float,
        help="requests per second sent to the fleet (default 4 x the limit's rate: 20 for 300/min)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--output",
        type=Path,
        help=f"the report's path; PNGs beside it (default {RESULTS.relative_to(ROOT)})",
    )
    where.add_argument(
        "--update-docs",
        action="store_true",
        help=f"write {DOCS.relative_to(ROOT)} and {DOCS_IMAGES.relative_to(ROOT)}/*.png, and the fleet "
        f"plot to {QUOTAS_IMAGES.relative_to(ROOT)}/{FLEET_PNG} and {QUOTAS_DOC.relative_to(ROOT)}",
    )
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets.split(",") if t and t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wrk = wrk_binary()
    if wrk is None:
        progress("bench/run.py: wrk is not installed (`make bench` installs it; or `apt-get install -y wrk`)")
        return 2
    chosen = [t for t in TARGETS if t in args.targets.split(",")]
    plan = scenarios(args)
    runs = sum(s.rounds * len(s.cells) * len(chosen) * (s.seconds + max(0, args.warmup)) for s in plan)
    runs += 0 if args.no_fleet else round(args.fleet_seconds)
    progress(f"bench: {len(chosen)} targets, {sum(len(s.cells) for s in plan)} cells, ~{runs} s of load")
    started = time.monotonic()
    report_path: Path = DOCS if args.update_docs else (args.output or RESULTS)
    images_dir = DOCS_IMAGES if args.update_docs else report_path.parent
    cleanups: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="llmroute-bench-") as tmp:
        try:
            redis_url = None
            if shutil.which("redis-server") and (
                {"floor", "sidecar-redis"} & set(chosen) or args.work_requests or not args.no_fleet
            ):
                from tests.support.redis_procs import RedisServer

                redis = RedisServer().start()
                cleanups.append(redis.cleanup)
                redis_url = redis.url
            bench = Bench(args, Path(tmp), wrk, redis_url)
            outcomes = [
                bench.scenario(scenario, chosen, f"{n}/{len(plan)}") for n, scenario in enumerate(plan, 1)
            ]
            calls = bench.python_calls()
            if not args.no_fleet:
                fleet_ok = run_fleet(
                    args,
                    Path(tmp),
                    redis_url,
                    QUOTAS_IMAGES if args.update_docs else images_dir,
                    report_path.parent,
                )
                bench.failed = bench.failed or not fleet_ok
        finally:
            for cleanup in reversed(cleanups):
                cleanup()
    if not outcomes and not calls:
        progress(
            f"bench: no scenario measured, {report_path} unchanged, in {time.monotonic() - started:.0f} s"
        )
        return 1 if bench.failed else 0
    images: dict[str, dict[str, str]] = {}
    try:
        from bench.plots import plot_scenario
    except ImportError:
        progress("bench: matplotlib is missing (`make bench` installs it): no PNG plots")
    else:
        for outcome in outcomes:
            written = plot_scenario(outcome, images_dir)
            images[outcome.scenario.slug] = {
                kind: os.path.relpath(path, report_path.parent) for kind, path in written.items()
            }
    context = Context(
        command=command_line(argv, args.update_docs),
        machine=machine(wrk),
        seconds=f"each run after a {args.warmup} s warm-up whose numbers are dropped",
    )
    report = render(context, outcomes, calls, images, profile_slot=args.update_docs)
    if args.update_docs:
        report = merge_kept(report, DOCS.read_text() if DOCS.exists() else None)
    print(report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report)
    hint = "" if args.update_docs else " (docs/benchmarks.md unchanged: `make bench UPDATE_DOCS=1`)"
    progress(f"bench: written to {report_path}{hint} in {time.monotonic() - started:.0f} s")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
