"""``make demo``: one sidecar in front of the built-in mock OpenAI upstream, traffic driven through it.

Everything runs in this process on loopback ports: the mock upstream, a real sidecar (memory quota
store) configured by an embedded LLMRoute with three client keys in two tiers, and a load driver.
One key (mallory, free tier) sends more than its tier allows and is limited; the summary shows
what was admitted and limited per key, latencies, tokens counted and the 429 headers a client sees.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from llmroute_sidecar.api.manifest import parse_route_text
from llmroute_sidecar.app import Sidecar
from llmroute_sidecar.config import HostPort, Settings
from llmroute_sidecar.mockupstream import MockSettings, create_app

DEMO_ROUTE = """\
apiVersion: llmroute.dev/v1alpha1
kind: LLMRoute
metadata: {name: demo-chat, namespace: demo}
spec:
  selector: {matchLabels: {app: demo}}
  upstream: {url: "http://127.0.0.1:8000", timeoutSeconds: 10, retries: 2}
  deadlineSeconds: 30
  queueTimeoutSeconds: 0.5
  identity: {header: Authorization, keysSecretRef: {name: demo-keys}}
  tiers:
    free:    {requestsPerMinute: 20,  tokensPerMinute: 20000,  concurrentRequests: 2}
    premium: {requestsPerMinute: 600, tokensPerMinute: 400000, concurrentRequests: 8}
  limits:
    - {name: per-key, key: apiKey}
    - {name: route-total, key: route, requestsPerMinute: 3000, concurrentRequests: 32}
  readiness: {maxInFlight: 64, upstreamHealthPath: /health}
"""

#: (client key, tier, concurrent workers, pause between a worker's requests in seconds)
CLIENTS = [
    ("sk-alice-premium", "premium", 4, 0.0),
    ("sk-bob-free", "free", 1, 0.4),
    ("sk-mallory-free", "free", 3, 0.0),
]


@dataclass
class ClientStats:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    rejection_headers: dict[str, str] | None = None
    rejection_body: dict[str, object] | None = None


async def _drive_one(
    session: aiohttp.ClientSession, base: str, key: str, stream: bool, stats: ClientStats
) -> None:
    body = {
        "model": "mock-gpt",
        "messages": [{"role": "user", "content": "Say something about rate limits."}],
        "max_tokens": 32,
        "stream": stream,
    }
    started = time.monotonic()
    async with session.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        payload = await response.read()
    stats.sent += 1
    stats.statuses[response.status] += 1
    if response.status == 200:
        stats.latencies.append(time.monotonic() - started)
        stats.tokens += _tokens_in(payload, stream)
    elif response.status == 429 and stats.rejection_headers is None:
        wanted = (
            "Retry-After",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "RateLimit",
        )
        stats.rejection_headers = {
            name: response.headers[name] for name in wanted if name in response.headers
        }
        stats.rejection_body = json.loads(payload)


def _tokens_in(payload: bytes, stream: bool) -> int:
    if not stream:
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("total_tokens", 0))
    chunks = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: {")]
    return sum(int((json.loads(c).get("usage") or {}).get("total_tokens", 0)) for c in chunks)


async def _worker(
    session: aiohttp.ClientSession, base: str, key: str, pause: float, until: float, stats: ClientStats
) -> None:
    index = 0
    while time.monotonic() < until:
        await _drive_one(session, base, key, stream=index % 2 == 1, stats=stats)
        index += 1
        if pause:
            await asyncio.sleep(pause)


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run_demo(seconds: float) -> int:
    """Run the demo for ``seconds`` of traffic and print the summary; 0 when it behaved as expected."""
    upstream = web.AppRunner(create_app(MockSettings(first_token_latency=0.02, token_interval=0.005)))
    await upstream.setup()
    site = web.TCPSite(upstream, "127.0.0.1", 0)
    await site.start()
    upstream_port = upstream.addresses[0][1]
    with tempfile.TemporaryDirectory(prefix="llmroute-demo-") as tmp:
        secrets = Path(tmp) / "secrets"
        keys_dir = secrets / "demo-keys"
        keys_dir.mkdir(parents=True)
        for key, tier, _, _ in CLIENTS:
            (keys_dir / hashlib.sha256(key.encode()).hexdigest()).write_text(tier)
        route_file = Path(tmp) / "route.yaml"
        route_file.write_text(DEMO_ROUTE)
        settings = Settings(
            route_file=route_file,
            listen=HostPort("127.0.0.1", 0),
            admin_listen=HostPort("127.0.0.1", 0),
            upstream_override=f"http://127.0.0.1:{upstream_port}",
            secrets_dir=secrets,
            health_interval=0.5,
        )
        sidecar = Sidecar(settings, parse_route_text(DEMO_ROUTE))
        await sidecar.start()
        try:
            assert sidecar.traffic_address is not None and sidecar.admin_address is not None
            base = f"http://127.0.0.1:{sidecar.traffic_address.port}"
            admin = f"http://127.0.0.1:{sidecar.admin_address.port}"
            print(f"llmroute demo: mock upstream :{upstream_port}, sidecar {base}, admin {admin}")
            print(f"driving {seconds:g}s of traffic from {len(CLIENTS)} clients (half of it streamed)...\n")
            stats = {key: ClientStats() for key, *_ in CLIENTS}
            until = time.monotonic() + seconds
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(
                    *(
                        _worker(session, base, key, pause, until, stats[key])
                        for key, _, workers, pause in CLIENTS
                        for _ in range(workers)
                    )
                )
                async with session.get(f"{admin}/readyz") as response:
                    ready = await response.json()
                async with session.get(f"{admin}/metrics") as response:
                    metrics = await response.text()
            return _summarise(stats, ready, metrics)
        finally:
            await sidecar.stop()
            await upstream.cleanup()


def _summarise(stats: dict[str, ClientStats], ready: dict[str, object], metrics: str) -> int:
    header = f"{'client':<18}{'tier':<9}{'sent':>6}{'admitted':>10}{'limited':>9}{'other':>7}"
    header += f"{'p50 ms':>9}{'p99 ms':>9}{'tokens':>9}"
    print(header)
    print("-" * len(header))
    for key, tier, _, _ in CLIENTS:
        s = stats[key]
        admitted, limited = s.statuses.get(200, 0), s.statuses.get(429, 0)
        other = s.sent - admitted - limited
        print(
            f"{key:<18}{tier:<9}{s.sent:>6}{admitted:>10}{limited:>9}{other:>7}"
            f"{_percentile(s.latencies, 0.5) * 1000:>9.1f}{_percentile(s.latencies, 0.99) * 1000:>9.1f}"
            f"{s.tokens:>9}"
        )
    limited_example = next((s for s in stats.values() if s.rejection_headers), None)
    if limited_example is not None:
        print("\nwhat a limited client sees (first 429):")
        for name, value in (limited_example.rejection_headers or {}).items():
            print(f"  {name}: {value}")
        print(f"  body: {json.dumps(limited_example.rejection_body)}")
    counted = [line for line in metrics.splitlines() if line.startswith("llmroute_tokens_total")]
    print("\ntokens counted by the sidecar (llmroute_tokens_total):")
    for line in counted:
        print(f"  {line}")
    print(f"\nreadiness: {json.dumps(ready)}")
    mallory, alice = stats["sk-mallory-free"], stats["sk-alice-premium"]
    unexpected = sum(s.sent - s.statuses.get(200, 0) - s.statuses.get(429, 0) for s in stats.values())
    ok = mallory.statuses.get(429, 0) > 0 and alice.statuses.get(200, 0) > 0 and unexpected == 0
    if mallory.statuses.get(200, 0) > 20:
        ok = False
    print("\nresult:", "OK - the over-quota key was limited, the others were served" if ok else "UNEXPECTED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=4.0, help="how long to drive traffic")
    args = parser.parse_args(argv)
    return asyncio.run(run_demo(args.seconds))


if __name__ == "__main__":
    raise SystemExit(main())
