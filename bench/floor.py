"""The floor of this stack: a bare aiohttp pass-through with one EVALSHA per request.

What a Python proxy on aiohttp and redis-py cannot go below: read the request, run one small script
in Redis (a counter, standing in for an admission), forward the body to the upstream over a pooled
connection, relay the answer (streamed chunk by chunk for SSE). No validation, no limits, no
metrics, no logs. ``make bench`` measures it beside the sidecar so the sidecar's own cost is a ratio.

    python bench/floor.py --listen 127.0.0.1:18081 --upstream http://127.0.0.1:18000 \\
        [--redis redis://127.0.0.1:6379]
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web
from redis import asyncio as aioredis

SCRIPT = "return redis.call('INCR', KEYS[1])"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


async def serve(listen: str, upstream: str, redis_url: str | None) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    redis = aioredis.Redis.from_url(redis_url) if redis_url else None
    sha = await redis.script_load(SCRIPT) if redis is not None else ""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if redis is not None:
            await redis.evalsha(sha, 1, "floor:count")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = upstream + request.path_qs
        async with session.request(request.method, url, data=body, headers=headers) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            response = web.StreamResponse(status=up.status, headers=out)
            if up.content_type != "text/event-stream" and up.content_length is not None:
                response.content_length = up.content_length
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = listen.rsplit(":", 1)
    await web.TCPSite(runner, host, int(port)).start()
    print(f"floor listening on {listen} -> {upstream} (redis: {redis_url or 'off'})", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python bench/floor.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:18081", help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--upstream", required=True, help="upstream base URL")
    parser.add_argument("--redis", help="Redis URL; one EVALSHA per request when set")
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.upstream.rstrip("/"), args.redis))


if __name__ == "__main__":
    main()
