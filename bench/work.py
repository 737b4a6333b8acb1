"""Work per request, counted rather than timed: Python function calls and Redis commands.

Wall-clock numbers move with the machine; these counts do not (or barely), so CI can guard them:

- **Python calls per request**: one sidecar runs in this process (memory or Redis store, access log
  on at INFO as shipped, written to /dev/null) in front of the mock upstream (a separate process);
  N sequential keep-alive requests are sent over a plain asyncio stream while ``cProfile`` counts
  every function call in the process (the sidecar's, the event loop's and this tiny client's),
  divided by N.
- **Redis commands per request**: ``INFO commandstats`` of a private redis-server before and after N
  requests through a sidecar using it (admission, settlement and anything else the request path
  sends; background pings and heartbeats are reported apart).

    python bench/work.py [--requests 200] [--stream] [--redis-url redis://127.0.0.1:6379] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import os
import pstats
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmroute_sidecar.accesslog import configure_logging  # noqa: E402
from llmroute_sidecar.api.manifest import load_route  # noqa: E402
from llmroute_sidecar.app import Sidecar  # noqa: E402
from llmroute_sidecar.config import HostPort, Settings  # noqa: E402

#: The benchmark route: every dimension enforced on every request (the costliest common shape).
LIMITS = [
    {
        "name": "fleet",
        "key": "route",
        "requestsPerMinute": 100_000_000,
        "tokensPerMinute": 1_000_000_000,
        "concurrentRequests": 100_000,
    }
]
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}


def write_route(path: Path, upstream: str) -> Path:
    """The route file both the in-process and the process benchmarks use."""
    manifest = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "selector": {"matchLabels": {"app": "bench"}},
            "upstream": {"url": upstream, "timeoutSeconds": 30, "retries": 0},
            "deadlineSeconds": 60,
            "queueTimeoutSeconds": 5,
            "limits": LIMITS,
        },
    }
    path.write_text(json.dumps(manifest))
    return path


def request_bytes(stream: bool) -> bytes:
    body = json.dumps({**BODY, "stream": stream}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    length = next(
        (int(line.split(b":", 1)[1]) for line in lower.split(b"\r\n") if line.startswith(b"content-length:")),
        0,
    )
    await reader.readexactly(length)
    return status


@dataclass
class Counted:
    requests: int
    calls_per_request: float
    top: list[tuple[str, float, float]]
    """(function, calls per request, own µs per request under the profiler), most called first."""


@contextlib.asynccontextmanager
async def in_process_sidecar(
    upstream: str, stream: bool, redis_url: str | None
) -> AsyncIterator[tuple[Sidecar, Callable[[], Awaitable[None]]]]:
    """A sidecar in this process (logging as shipped, to /dev/null), warmed up; yields it and
    ``one()``, which sends one request on a keep-alive connection and reads its answer."""
    with tempfile.TemporaryDirectory() as tmp:
        route_file = write_route(Path(tmp) / "route.json", upstream)
        settings = Settings(
            route_file=route_file,
            listen=HostPort("127.0.0.1", 0),
            admin_listen=HostPort("127.0.0.1", 0),
            store="redis" if redis_url else "memory",
            redis_url=redis_url,
            secrets_dir=Path(tmp),
            log_level="INFO",
            # Background loops far apart: they must not land inside the counted window.
            watch_interval=3600,
            health_interval=3600,
            heartbeat_seconds=3600,
        )
        devnull = open(os.devnull, "w")  # noqa: SIM115, ASYNC230 - closed below; /dev/null never blocks
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers[:] = []  # logging exactly as the sidecar sets it up (no test runner's handlers)
        configure_logging("INFO", devnull)  # access lines on, as shipped
        sidecar = Sidecar(settings, load_route(route_file))
        await sidecar.start()
        try:
            assert sidecar.traffic_address is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.traffic_address.port)
            payload = request_bytes(stream)

            async def one() -> None:
                writer.write(payload)
                status = await read_response(reader)
                if status != 200:
                    raise RuntimeError(f"the sidecar answered {status}")

            for _ in range(20):  # warm-up: pools, caches, lazily built label children
                await one()
            await sidecar.gateway.finisher.settler.drain(5)
            yield sidecar, one
            writer.close()
        finally:
            await sidecar.stop()
            root.handlers[:], level = saved
            root.setLevel(level)
            devnull.close()


async def count_calls(
    upstream: str, requests: int, stream: bool, redis_url: str | None, top: int, by_time: bool = False
) -> Counted:
    """Python calls per request through an in-process sidecar (warmed up first)."""
    async with in_process_sidecar(upstream, stream, redis_url) as (sidecar, one):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(requests):
            await one()
        await sidecar.gateway.finisher.settler.drain(5)  # settlements belong to their requests
        profile.disable()
    stats = pstats.Stats(profile)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(calls for (_, calls, *_rest) in entries.values())
    rank = 2 if by_time else 1  # (primitive calls, calls, own time, cumulative time, callers)
    ranked = sorted(entries.items(), key=lambda item: item[1][rank], reverse=True)[:top]
    names = [
        (f"{Path(file).name}:{line}({name})", calls / requests, own * 1e6 / requests)
        for (file, line, name), (_, calls, own, *_rest) in ranked
    ]
    return Counted(requests, total / requests, names)


async def count_garbage(upstream: str, requests: int, stream: bool, redis_url: str | None) -> Counter[str]:
    """Objects the request path leaves in reference cycles (freed only by the cycle collector), by
    type, over ``requests`` requests: the collector is off while they run, then finds them."""
    async with in_process_sidecar(upstream, stream, redis_url) as (sidecar, one):
        gc.collect()
        gc.disable()
        try:
            for _ in range(requests):
                await one()
            await sidecar.gateway.finisher.settler.drain(5)
            gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects go to gc.garbage instead of away
            gc.collect()
            found = Counter(type(item).__name__ for item in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/work.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests counted (default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="SSE requests instead of JSON")
    parser.add_argument("--redis-url", help="use the Redis store at this URL (default: memory store)")
    parser.add_argument("--upstream", help="a running mock upstream (default: start one)")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default: %(default)s)")
    parser.add_argument("--by-time", action="store_true", help="list by own time, not by calls")
    parser.add_argument(
        "--garbage", action="store_true", help="count objects left in reference cycles instead of calls"
    )
    args = parser.parse_args()
    from tests.support.sidecar_procs import MockUpstream

    zero = ["--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0"]
    mock = None if args.upstream else MockUpstream(*zero)
    try:
        upstream = args.upstream or mock.url  # type: ignore[union-attr]
        if args.garbage:
            found = asyncio.run(count_garbage(upstream, args.requests, args.stream, args.redis_url))
            print(f"{sum(found.values()) / args.requests:.2f} objects in reference cycles per request")
            for kind, count in found.most_common(args.top):
                print(f"{count / args.requests:8.2f}  {kind}")
            return
        counted = asyncio.run(
            count_calls(upstream, args.requests, args.stream, args.redis_url, args.top, args.by_time)
        )
    finally:
        if mock is not None:
            mock.stop()
    print(f"{counted.calls_per_request:.0f} Python calls per request ({counted.requests} requests)")
    print(f"{'calls':>8}  {'own µs':>8}  function (per request; times inflated by the profiler)")
    for name, calls, own in counted.top:
        print(f"{calls:8.1f}  {own:8.1f}  {name}")


if __name__ == "__main__":
    main()
