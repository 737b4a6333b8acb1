"""``make demo``: three sidecar replicas share one Redis, so the fleet admits what the route allows.

On loopback: the built-in mock OpenAI upstream (in this process), a private ``redis-server`` and
three ``llmroute-sidecar`` processes configured by an embedded LLMRoute with three client keys in
two tiers. Clients spread their requests over the replicas, as a Service would. One key (mallory,
free tier: 20 requests/min) asks for more than its tier allows; its client honours ``Retry-After``
as the OpenAI SDK does. The summary shows what the fleet admitted and limited per key, latencies,
the tokens each client saw in ``usage`` against the sidecars' ``llmroute_tokens_total``, and the
429 headers a client sees. Without ``redis-server`` it runs one sidecar on the memory store.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import random
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import aiohttp
from aiohttp import web

from llmroute_sidecar.demo_fleet import Fleet, Replica
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
FREE_RPM = 20
PREMIUM_RPM = 600
REPLICAS = 3

#: (client key, tier, concurrent workers, pause between a worker's requests in seconds)
CLIENTS = [
    ("sk-alice-premium", "premium", 4, 0.0),
    ("sk-bob-free", "free", 1, 0.4),
    ("sk-mallory-free", "free", 3, 0.0),
]
LIMITED = "sk-mallory-free"

#: The OpenAI SDK's retry policy (openai/_base_client.py): two retries; a server-directed delay
#: (retry-after-ms, else Retry-After) up to 120 s is honoured, otherwise 0.5 s doubling up to 8 s.
MAX_RETRIES = 2
MAX_RETRY_AFTER = 120.0


@dataclass
class ClientStats:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    admitted_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    retries: int = 0
    waited: float = 0.0
    rejection_headers: dict[str, str] | None = None
    rejection_body: dict[str, object] | None = None
    rejection_is_concurrency: bool = False


def retry_delay(headers: Mapping[str, str], retry: int) -> float:
    """How long the OpenAI SDK waits before retry number ``retry`` (0-based) after these headers."""
    lookup = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(lookup[name]) / scale
        except (KeyError, ValueError):
            continue
        if 0 < seconds <= MAX_RETRY_AFTER:
            return seconds
        break
    return min(0.5 * 2.0**retry, 8.0) * (1 - 0.25 * random.random())


class Driver:
    """Sends the clients' requests round-robin over the replicas until ``until``."""

    def __init__(self, session: aiohttp.ClientSession, replicas: list[Replica], until: float) -> None:
        self.session = session
        self.replicas = replicas
        self.until = until
        self._next = itertools.cycle(range(len(replicas)))

    async def worker(self, key: str, pause: float, stats: ClientStats) -> None:
        index = 0
        while time.monotonic() < self.until:
            await self.request(key, stream=index % 2 == 1, stats=stats)
            index += 1
            if pause:
                await asyncio.sleep(pause)

    async def request(self, key: str, stream: bool, stats: ClientStats) -> None:
        """One SDK-style call: retries 429s after the server's delay, within the demo's time."""
        for retry in range(MAX_RETRIES + 1):
            status, headers = await self._attempt(key, stream, stats)
            if status != 429 or retry == MAX_RETRIES:
                return
            delay = retry_delay(headers, retry)
            left = self.until - time.monotonic()
            if left <= 0:
                return
            stats.waited += min(delay, left)
            if delay > left:  # the demo ends first: the wait is cut short, the call gives up
                await asyncio.sleep(left)
                return
            stats.retries += 1
            await asyncio.sleep(delay)

    async def _attempt(self, key: str, stream: bool, stats: ClientStats) -> tuple[int, Mapping[str, str]]:
        body: dict[str, object] = {
            "model": "mock-gpt",
            "messages": [{"role": "user", "content": "Say something about rate limits."}],
            "max_tokens": 32,
            "stream": stream,
        }
        if stream:  # as a client that wants to count its tokens asks
            body["stream_options"] = {"include_usage": True}
        replica = self.replicas[next(self._next)]
        started = time.monotonic()
        async with self.session.post(
            f"{replica.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            payload = await response.read()
            headers = response.headers
        stats.sent += 1
        stats.statuses[response.status] += 1
        if response.status == 200:
            stats.admitted_by[replica.name] += 1
            stats.latencies.append(time.monotonic() - started)
            stats.tokens += tokens_in(payload, stream)
        elif response.status == 429 and (stats.rejection_headers is None or stats.rejection_is_concurrency):
            wanted = (
                *("Retry-After", "retry-after-ms", "X-RateLimit-Limit", "X-RateLimit-Remaining"),
                *("X-RateLimit-Reset", "RateLimit", "RateLimit-Policy"),
            )
            stats.rejection_headers = {name: headers[name] for name in wanted if name in headers}
            stats.rejection_body = json.loads(payload)
            error = stats.rejection_body.get("error") if isinstance(stats.rejection_body, dict) else None
            code = str(error.get("code", "")) if isinstance(error, dict) else ""
            stats.rejection_is_concurrency = code.startswith("concurrent")  # show a rate 429 when one comes
        return response.status, headers


def tokens_in(payload: bytes, stream: bool) -> int:
    """``usage.total_tokens`` of a JSON answer, or of a stream's usage chunk."""
    if not stream:
        usage = json.loads(payload).get("usage") or {}
        return int(usage.get("total_tokens", 0))
    chunks = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: {")]
    return sum(int((json.loads(c).get("usage") or {}).get("total_tokens", 0)) for c in chunks)


def counted_tokens(metrics_texts: list[str]) -> int:
    """Prompt plus completion tokens of ``llmroute_tokens_total`` over every replica."""
    total = 0.0
    for text in metrics_texts:
        for line in text.splitlines():
            if line.startswith("llmroute_tokens_total{") and (
                'kind="prompt"' in line or 'kind="completion"' in line
            ):
                total += float(line.rpartition(" ")[2])
    return int(total)


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _serve_upstream() -> tuple[web.AppRunner, int]:
    upstream = web.AppRunner(create_app(MockSettings(first_token_latency=0.02, token_interval=0.005)))
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", 0).start()
    return upstream, int(upstream.addresses[0][1])


def _write_config(tmp: Path) -> tuple[Path, Path]:
    secrets = tmp / "secrets"
    keys_dir = secrets / "demo-keys"
    keys_dir.mkdir(parents=True)
    for key, tier, _, _ in CLIENTS:
        (keys_dir / hashlib.sha256(key.encode()).hexdigest()).write_text(tier)
    route_file = tmp / "route.yaml"
    route_file.write_text(DEMO_ROUTE)
    return route_file, secrets


def _start_replicas(fleet: Fleet, route: Path, secrets: Path, upstream: str, memory: bool) -> list[Replica]:
    redis_url = None if memory else fleet.start_redis()
    count = REPLICAS if redis_url else 1
    store = ["--redis", redis_url] if redis_url else ["--store", "memory"]
    children = []
    for index in range(count):
        argv = ["--route", str(route), "--upstream", upstream, "--secrets-dir", str(secrets), *store]
        argv += ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        env = {"LLMROUTE_POD_NAME": f"demo-{index}", "LLMROUTE_HEALTH_INTERVAL": "0.5"}
        children.append(fleet.start_sidecar(f"sidecar-{index}", argv, env))
    replicas = [fleet.wait_started(child) for child in children]
    if redis_url:
        print(f"llmroute demo: {count} sidecar replicas sharing one redis-server ({redis_url})")
    else:
        why = "--memory was given" if memory else "redis-server is not installed"
        print(
            f"llmroute demo: NOTE {why}, so ONE sidecar runs on the in-process memory store; the fleet-wide "
            "part needs Redis (`make test` installs it, or `apt-get install redis-server`)"
        )
    for replica in replicas:
        print(f"  {replica.name}: traffic {replica.url}  admin {replica.admin}")
    return replicas


async def run_demo(fleet: Fleet, tmp: Path, seconds: float, memory: bool = False) -> int:
    """Run the demo for ``seconds`` of traffic and print the summary; 0 when it behaved as expected."""
    upstream, upstream_port = await _serve_upstream()
    try:
        route_file, secrets = _write_config(tmp)
        replicas = _start_replicas(fleet, route_file, secrets, f"http://127.0.0.1:{upstream_port}", memory)
        print(f"  mock upstream: http://127.0.0.1:{upstream_port}")
        print(
            f"\ndriving {seconds:g}s of traffic from {len(CLIENTS)} clients over {len(replicas)} "
            "replica(s), half of it streamed...\n"
        )
        stats = {key: ClientStats() for key, *_ in CLIENTS}
        async with aiohttp.ClientSession() as session:
            driver = Driver(session, replicas, time.monotonic() + seconds)
            await asyncio.gather(
                *(
                    driver.worker(key, pause, stats[key])
                    for key, _, workers, pause in CLIENTS
                    for _ in range(workers)
                )
            )
            metrics, ready = [], []
            for replica in replicas:
                async with session.get(f"{replica.admin}/metrics") as response:
                    metrics.append(await response.text())
                async with session.get(f"{replica.admin}/readyz") as response:
                    ready.append(await response.json())
        return summarise(stats, replicas, metrics, ready)
    finally:
        await upstream.cleanup()


def summarise(
    stats: dict[str, ClientStats], replicas: list[Replica], metrics: list[str], ready: list[dict[str, object]]
) -> int:
    """Print the per-client table, the fleet result and the checks; 0 when all hold."""
    header = f"{'client':<18}{'tier':<9}{'sent':>6}{'admitted':>10}{'limited':>9}{'other':>7}"
    header += f"{'p50 ms':>9}{'p99 ms':>9}{'tokens':>9}"
    print(header)
    print("-" * len(header))
    for key, tier, _, _ in CLIENTS:
        s = stats[key]
        admitted, limited = s.statuses.get(200, 0), s.statuses.get(429, 0)
        print(
            f"{key:<18}{tier:<9}{s.sent:>6}{admitted:>10}{limited:>9}{s.sent - admitted - limited:>7}"
            f"{_percentile(s.latencies, 0.5) * 1000:>9.1f}{_percentile(s.latencies, 0.99) * 1000:>9.1f}"
            f"{s.tokens:>9}"
        )
    mallory = stats[LIMITED]
    if mallory.rejection_headers is not None:
        print("\nwhat a limited client sees (first 429):")
        for name, value in mallory.rejection_headers.items():
            print(f"  {name}: {value}")
        print(f"  body: {json.dumps(mallory.rejection_body)}")
    limited = mallory.statuses.get(429, 0)
    print(
        "\nmallory's client honours Retry-After as the OpenAI SDK does (up to "
        f"{MAX_RETRIES} retries a call, after the delay the server names): after {limited} answers of 429 "
        f"its workers waited {mallory.waited:.1f}s in all (cut short when the demo ends) and retried "
        f"{mallory.retries} times, instead of hammering"
    )

    admitted = mallory.statuses.get(200, 0)
    spread = ", ".join(f"{r.name} {mallory.admitted_by.get(r.name, 0)}" for r in replicas)
    n = len(replicas)
    if n > 1:
        print(
            f"\nfleet result: {n} replicas admitted {admitted} of mallory's requests, not {n * FREE_RPM} — "
            f"her tier allows {FREE_RPM}/min for the whole fleet, counted once in Redis ({spread})"
        )
    else:
        print(f"\nresult on one replica: admitted {admitted} of mallory's requests ({FREE_RPM}/min tier)")

    client_tokens = sum(s.tokens for s in stats.values())
    sidecar_tokens = counted_tokens(metrics)
    print(
        f"tokens: clients saw {client_tokens} in usage; the sidecars counted {sidecar_tokens} "
        "(llmroute_tokens_total, prompt + completion)"
    )
    print(
        "readiness: "
        + ", ".join(f"{r.name} ready={body.get('ready')}" for r, body in zip(replicas, ready, strict=True))
    )

    unexpected = sum(s.sent - s.statuses.get(200, 0) - s.statuses.get(429, 0) for s in stats.values())
    problems = []
    if not 0 < admitted <= FREE_RPM or mallory.statuses.get(429, 0) == 0:
        problems.append(f"mallory: {admitted} admitted, {mallory.statuses.get(429, 0)} limited")
    for key, rpm in (("sk-alice-premium", PREMIUM_RPM), ("sk-bob-free", FREE_RPM)):
        served = stats[key].statuses.get(200, 0)
        if not served or (stats[key].statuses.get(429, 0) and served < rpm):  # limited below its tier
            problems.append(f"{key} was limited below its tier or never served")
    if unexpected:
        problems.append(f"{unexpected} answers that were neither 200 nor 429")
    if client_tokens != sidecar_tokens:
        problems.append(f"token counts differ: {client_tokens} vs {sidecar_tokens}")
    if problems:
        print("\nresult: UNEXPECTED - " + "; ".join(problems))
        return 1
    scope = " fleet-wide" if n > 1 else ""
    print(f"\nresult: OK - the over-quota key was limited{scope}, the others were served, tokens agree")
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmroute_sidecar.demo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="how long to drive traffic (default 6)")
    parser.add_argument("--memory", action="store_true", help="one sidecar on the memory store, no Redis")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="llmroute-demo-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            return asyncio.run(run_demo(fleet, Path(tmp), args.seconds, args.memory))
        except KeyboardInterrupt:
            print("\nllmroute demo: interrupted; stopping its processes", flush=True)
            return 130
        except RuntimeError as error:
            print(f"llmroute demo: {error}", flush=True)
            return 1
        finally:
            fleet.stop()


if __name__ == "__main__":
    raise SystemExit(main())
