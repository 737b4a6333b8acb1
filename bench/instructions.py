"""Instructions per request, counted by valgrind: the sidecar's cost beside the floor's, without noise.

Wall-clock and even CPU-time numbers on a shared VM swing by 20 % between identical runs; the number
of machine instructions a process executes for the same requests does not (two runs agree within
0.2 %). Each target runs in this process's child under ``valgrind --tool=callgrind`` twice, for
``--warm`` and for ``--warm + --requests`` sequential keep-alive requests (JSON or SSE, through the
same tiny client as ``bench/work.py``); the difference divided by ``--requests`` is what one request
costs the process — start-up and warm-up cancel out. Targets, each in front of a private mock upstream:

- ``floor``: ``bench/floor.py`` in-process (aiohttp pass-through; one ``EVALSHA`` per request with
  ``--redis-url``);
- ``sidecar``: the sidecar as ``bench/work.py`` runs it (access log on at INFO; memory store, or the
  Redis store with ``--redis-url``); ``--source DIR`` takes the sidecar's code from another checkout
  (``DIR/sidecar``), for a before/after comparison of the same requests.

Counts include the client's own reading of each response (the same few thousand instructions for
every target) and no kernel work (system calls are not counted).

    python bench/instructions.py [--redis-url redis://127.0.0.1:6379] [--stream] [--source DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTED = re.compile(rb"Collected : (\d+)")


async def _serve_floor(upstream: str, redis_url: str | None, total: int, stream: bool) -> None:
    from bench import floor, work

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = asyncio.create_task(floor.serve(f"127.0.0.1:{port}", upstream, redis_url))
    for _ in range(200):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.05)  # start-up of the floor, before anything is counted as a request
    else:
        raise RuntimeError("the floor did not start")
    payload = work.request_bytes(stream)
    for _ in range(total):
        writer.write(payload)
        if await work.read_response(reader) != 200:
            raise RuntimeError("the floor did not answer 200")
    writer.close()
    server.cancel()


async def _serve_sidecar(upstream: str, redis_url: str | None, total: int, stream: bool) -> None:
    from bench import work

    async with work.in_process_sidecar(upstream, stream, redis_url) as (_, one):
        for _ in range(total):
            await one()


def child(target: str, upstream: str, redis_url: str | None, total: int, stream: bool) -> None:
    """Run inside valgrind: ``total`` requests through ``target``."""
    serve = _serve_floor if target == "floor" else _serve_sidecar
    asyncio.run(serve(upstream, redis_url, total, stream))


def collected(
    target: str, upstream: str, redis_url: str | None, total: int, stream: bool, source: Path
) -> int:
    """Instructions valgrind counted for one child run."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        target,
        "--upstream",
        upstream,
        "--total",
        str(total),
    ]
    command += ["--redis-url", redis_url] if redis_url else []
    command += ["--stream"] if stream else []
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": f"{source / 'sidecar'}:{ROOT}"}
    done = subprocess.run(command, capture_output=True, env=env, timeout=1800, check=False)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{target} under valgrind failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return int(found.group(1).decode())


def per_request(
    target: str, upstream: str, redis_url: str | None, args: argparse.Namespace, source: Path
) -> float:
    warm: int = args.warm
    requests: int = args.requests
    stream: bool = args.stream
    with ThreadPoolExecutor(2) as pool:  # the two runs side by side (valgrind runs one thread each)
        low, high = pool.map(
            lambda total: collected(target, upstream, redis_url, total, stream, source),
            (warm, warm + requests),
        )
    return (high - low) / requests


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/instructions.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=200, help="requests counted (default: %(default)s)")
    parser.add_argument(
        "--warm", type=int, default=20, help="requests of the baseline run (default: %(default)s)"
    )
    parser.add_argument("--stream", action="store_true", help="SSE requests instead of JSON")
    parser.add_argument("--redis-url", help="Redis for the floor's EVALSHA and the sidecar's store")
    parser.add_argument(
        "--source",
        action="append",
        type=Path,
        help="a checkout whose sidecar/ code to measure (repeatable; default: this one)",
    )
    parser.add_argument("--child", choices=["floor", "sidecar"], help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.upstream, args.redis_url, args.total, args.stream)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (apt-get install valgrind)")
    sys.path.insert(0, str(ROOT))
    from tests.support.sidecar_procs import MockUpstream

    mock = MockUpstream("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")
    try:
        kind = "SSE" if args.stream else "JSON"
        store = "redis" if args.redis_url else "memory"
        floor = per_request("floor", mock.url, args.redis_url, args, ROOT)
        print(f"floor{' + EVALSHA' if args.redis_url else ''}, {kind}: {floor:,.0f} instructions/request")
        for source in args.source or [ROOT]:
            cost = per_request("sidecar", mock.url, args.redis_url, args, source.resolve())
            print(
                f"sidecar-{store} ({source}), {kind}: {cost:,.0f} instructions/request = "
                f"{cost / floor:.2f}x floor"
            )
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
