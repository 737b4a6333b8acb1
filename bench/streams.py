"""Many open SSE streams through one sidecar: its memory (RSS) and the time to first token it adds.

N chat streams (default 1,000) through ``sidecar-redis`` against the mock upstream, opened evenly over
``--ramp`` seconds (default 5) and each kept open about 10 s (first token after 200 ms, then 20 tokens
500 ms apart), so all N are open together at the end of the ramp; then the same directly against the
mock, in the same run. Reported: the sidecar's peak RSS while the streams are open (sampled from
/proc every 50 ms), its RSS at rest, and TTFT (request sent → first ``data:`` event with content)
percentiles through the sidecar and direct, with the difference. (All N opened at the same instant
measure something else: the admission burst queues behind one core.)

    python bench/streams.py [--streams 1000] [--ramp 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import targets  # noqa: E402
from bench.work import write_route  # noqa: E402
from tests.support.redis_procs import RedisServer  # noqa: E402

PACE = ("--first-token-latency", "0.2", "--token-interval", "0.5", "--tokens", "20")
BODY = {"model": "m", "messages": [{"role": "user", "content": "stream please"}], "stream": True}


@dataclass
class Outcome:
    ttft: list[float]
    errors: int
    peak_rss_mb: float = 0.0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (``VmRSS`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(session: aiohttp.ClientSession, url: str, into: Outcome) -> None:
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=BODY) as response:
            if response.status != 200:
                into.errors += 1
                await response.read()
                return
            first = None
            async for line in response.content:
                if first is None and line.startswith(b"data: {") and b'"content"' in line:
                    first = time.perf_counter() - started
            if first is None:
                into.errors += 1
            else:
                into.ttft.append(first)
    except aiohttp.ClientError:
        into.errors += 1


async def drive(url: str, streams: int, pid: int | None, ramp: float = 0.0) -> Outcome:
    outcome = Outcome([], 0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        started = time.monotonic()
        for index in range(streams):
            due = started + ramp * index / max(1, streams)
            while time.monotonic() < due:
                if pid is not None:
                    outcome.peak_rss_mb = max(outcome.peak_rss_mb, rss_mb(pid))
                await asyncio.sleep(min(0.05, max(0.0, due - time.monotonic())))
            tasks.append(asyncio.create_task(one(session, url, outcome)))
        while pid is not None and not all(task.done() for task in tasks):
            outcome.peak_rss_mb = max(outcome.peak_rss_mb, rss_mb(pid))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
    return outcome


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000 if ordered else float("nan")


def run(streams: int, ramp: float) -> str:
    with tempfile.TemporaryDirectory(prefix="llmroute-streams-") as tmp:
        work = Path(tmp)
        redis = RedisServer().start()
        mock = targets.mock_upstream(work, *PACE)
        try:
            route = write_route(work / "route.json", mock.url)
            sidecar = targets.sidecar(work, route, "sidecar-redis", "--redis", redis.url)
            try:
                assert sidecar.process is not None
                pid = sidecar.process.pid
                asyncio.run(drive(sidecar.url, 20, None))  # warm-up: pools, scripts
                rest = rss_mb(pid)
                through = asyncio.run(drive(sidecar.url, streams, pid, ramp))
                direct = asyncio.run(drive(mock.url, streams, None, ramp))
            finally:
                sidecar.stop()
        finally:
            mock.stop()
            redis.cleanup()
    p50_added = percentile(through.ttft, 0.5) - percentile(direct.ttft, 0.5)
    lines = [
        f"{streams} SSE streams opened over {ramp:g} s, each open about 10 s (first token after 200 ms, "
        "then 20 tokens 500 ms apart), sidecar-redis with access logs on:",
        "",
        "| | streams ok | errors | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, outcome in (("direct", direct), ("sidecar-redis", through)):
        cells = [
            name,
            str(len(outcome.ttft)),
            str(outcome.errors),
            *(f"{percentile(outcome.ttft, q):.1f}" for q in (0.5, 0.9, 0.99)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"TTFT added at p50: {p50_added:+.1f} ms. Sidecar RSS: {rest:.0f} MiB at rest, "
        f"{through.peak_rss_mb:.0f} MiB at most while the streams were open "
        f"(mean TTFT through the sidecar {statistics.fmean(through.ttft or [0.0]) * 1000:.0f} ms).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/streams.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (default %(default)s)")
    parser.add_argument(
        "--ramp", type=float, default=5.0, help="seconds to open them over (default %(default)s)"
    )
    args = parser.parse_args()
    print(run(args.streams, args.ramp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
