"""Assembling one sidecar process: traffic and admin servers, background loops, lifecycle.

``Sidecar`` owns everything with a lifetime: the quota store, the gateway's connection pool, the
route-file watcher, the upstream health probe and the two listening sockets. ``run`` adds signal
handling: SIGTERM → not ready → drain in-flight requests up to the grace period → exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from llmroute_sidecar.accesslog import AccessLog
from llmroute_sidecar.api import LLMRoute
from llmroute_sidecar.api.manifest import ManifestError, load_route, load_secret_documents
from llmroute_sidecar.config import HostPort, Settings, redact_url
from llmroute_sidecar.connections import ConnectionGuard, GuardedHandler
from llmroute_sidecar.health import HealthState, readiness_reasons
from llmroute_sidecar.hints import HintTracker
from llmroute_sidecar.metrics import SidecarMetrics
from llmroute_sidecar.policy import RoutePolicy, load_policy, secret_files
from llmroute_sidecar.proxy import Gateway
from llmroute_sidecar.quota.base import QuotaStore
from llmroute_sidecar.quota.memory import MemoryQuotaStore
from llmroute_sidecar.telemetry import Telemetry, start_telemetry

log = logging.getLogger("llmroute.sidecar")

#: The traffic app accepts large bodies itself; the route's maxRequestBytes is checked per request.
CLIENT_MAX_SIZE = 1024**3
STORE_PING_SECONDS = 0.25
#: At shutdown, settlements still queued get this long to reach the store before it closes.
SETTLE_DRAIN_SECONDS = 2.0


class ListenError(OSError):
    """A listening socket that cannot be opened; the message names the address and the flag."""


def make_store(settings: Settings, route: LLMRoute) -> QuotaStore:
    """The quota store the settings ask for."""
    if settings.store == "redis":
        from llmroute_sidecar.quota.redis import RedisQuotaStore

        store = RedisQuotaStore.from_url(settings.redis_url or "", member=settings.pod_name)
        store.start_heartbeat(route.key)
        return store
    return MemoryQuotaStore()


class Sidecar:
    """One sidecar process's moving parts."""

    def __init__(self, settings: Settings, route: LLMRoute, store: QuotaStore | None = None) -> None:
        self.settings = settings
        self.metrics = SidecarMetrics()
        self.health = HealthState()
        self.hints = HintTracker()
        policy = load_policy(
            route,
            settings.secrets_dir,
            settings.upstream_override,
            load_secret_documents(settings.route_file),
        )
        self.telemetry = start_telemetry(route.spec.telemetry, os.environ, self._resource(route))
        self.store = store if store is not None else make_store(settings, route)
        self.access_log = AccessLog()
        self.gateway = Gateway(
            policy, self.store, settings, self.metrics, self.health, self.access_log, self.telemetry
        )
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_store_state()
        self._route_digest = self._config_digest()
        self.traffic_address: HostPort | None = None
        self.admin_address: HostPort | None = None
        self.stopped = asyncio.Event()

    @property
    def policy(self) -> RoutePolicy:
        return self.gateway.policy

    def _resource(self, route: LLMRoute) -> dict[str, str]:
        """Resource attributes of exported telemetry: the route and, in a pod, the pod."""
        resource = {"llmroute.route": route.key}
        if self.settings.pod_name:
            resource["k8s.pod.name"] = self.settings.pod_name
        if self.settings.pod_namespace:
            resource["k8s.namespace.name"] = self.settings.pod_namespace
        return resource

    # -- servers ---------------------------------------------------------------------------------

    def traffic_app(self) -> web.Application:
        app = web.Application(client_max_size=CLIENT_MAX_SIZE)
        app.router.add_route("*", "/{tail:.*}", self.gateway.handle)
        return app

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/hints", self._hints)
        app.router.add_get("/rejections", self._rejections)
        return app

    async def start(self) -> None:
        """Open the connection pool and both listening sockets, start background loops.

        A socket that cannot be bound raises ``ListenError`` naming the address; whatever was opened
        before it is closed again."""
        try:
            await self.gateway.start()
            self.traffic_address = await self._serve(
                self.traffic_app(), self.settings.listen, "--listen", self.settings.max_connections or 2**31
            )
            self.admin_address = await self._serve(
                self.admin_app(), self.settings.admin_listen, "--admin-listen"
            )
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._watch_route_file(), name="route-watch"))
        self._tasks.append(asyncio.create_task(self._probe_upstream(), name="upstream-health"))
        self._tasks.append(asyncio.create_task(self._sample_load(), name="load-sampler"))
        self._tasks.append(asyncio.create_task(self._watch_store(), name="store-watch"))
        log.info(
            "sidecar started",
            extra={
                "fields": {
                    "route": self.policy.name,
                    "listen": str(self.traffic_address),
                    "admin": str(self.admin_address),
                    "upstream": self.policy.upstream_url,
                    "store": self.settings.store,
                    "config_hash": self.policy.config_hash,
                }
            },
        )

    async def _serve(
        self, app: web.Application, where: HostPort, flag: str, max_connections: int = 0
    ) -> HostPort:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        sock = socket.socket(socket.AF_INET6 if ":" in where.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((where.host, where.port))
        except OSError as error:
            sock.close()
            raise ListenError(f"cannot listen on {where} ({flag}): {error.strerror or error}") from None
        manager = runner.server
        assert manager is not None
        listener = "traffic" if max_connections else "admin"
        guard = ConnectionGuard(listener, self.metrics, self.settings.header_timeout_seconds, max_connections)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: GuardedHandler(manager, guard, loop=loop, access_log=None, auto_decompress=False),
            sock=sock,
            backlog=1024,
        )
        self._servers.append(server)
        return HostPort(where.host, sock.getsockname()[1])

    async def drain(self) -> bool:
        """Turn not ready and wait for in-flight requests; True when all finished in time."""
        self.health.draining = True
        self.metrics.ready.labels(self.policy.name).set(0)
        log.info("draining", extra={"fields": {"inflight": self.health.inflight}})
        drained = await self.gateway.wait_idle(self.settings.drain_seconds)
        if not drained:
            await self.gateway.cut_streams()
        return drained

    async def stop(self) -> None:
        """Close sockets, background loops, the pool and the store."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in self._servers:
            server.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.gateway.close()
        self.access_log.flush()  # lines of the last requests, before anything else is logged
        settler = self.gateway.finisher.settler
        if not await settler.drain(SETTLE_DRAIN_SECONDS):
            log.warning(
                "settlements still pending at shutdown", extra={"fields": {"pending": settler.pending}}
            )
        await settler.close()
        await self.store.close()
        if self.telemetry is not None and not await asyncio.to_thread(self.telemetry.shutdown):
            log.warning("telemetry not flushed at shutdown: the collector did not answer in time")
        self.stopped.set()

    # -- admin endpoints -------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is responsive.
        return web.json_response({"status": "ok"})

    def readiness(self) -> tuple[bool, list[str]]:
        spec = self.policy.route.spec
        # Reading the states applies due open → half-open transitions (and health.breaker_open with them)
        # before the reasons are computed, so they never disagree with the "breaker" field.
        self.gateway.upstreams.refresh()
        reasons = readiness_reasons(self.health, spec.readiness, spec.on_store_failure)
        return not reasons, reasons

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reasons = self.readiness()
        self.metrics.ready.labels(self.policy.name).set(1 if ready else 0)
        body = {
            "ready": ready,
            "reasons": reasons,
            "route": self.policy.name,
            "configHash": self.policy.config_hash,
            "inflight": self.health.inflight,
            "breaker": self._breaker_summary(),
            "upstreamHealthy": self.health.upstream_healthy,
            "upstreams": self.gateway.upstreams.snapshot(),
            "storeAvailable": not self.health.store_down,
            "storeState": self.health.store_state or ("down" if self.health.store_down else "up"),
        }
        return web.json_response(body, status=200 if ready else 503)

    def _breaker_summary(self) -> str:
        """The breaker state of the one upstream; with several, the best of them (closed wins)."""
        states = {u["breaker"] for u in self.gateway.upstreams.snapshot()}
        return next((s for s in ("closed", "half_open", "open") if s in states), "closed")

    async def _metrics(self, request: web.Request) -> web.Response:
        payload, content_type = self.metrics.render()
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response

    async def _rejections(self, request: web.Request) -> web.Response:
        """This sidecar's last quota rejections, newest first (clients named as in the access log)."""
        recent = self.gateway.admission.recent.newest_first()
        return web.json_response({"route": self.policy.name, "rejections": recent})

    async def _hints(self, request: web.Request) -> web.Response:
        spec = self.policy.route.spec
        target = spec.autoscaling.target_in_flight_per_pod if spec.autoscaling else None
        return web.json_response(
            {
                "route": self.policy.name,
                "pod": self.settings.pod_name,
                "namespace": self.settings.pod_namespace,
                "configHash": self.policy.config_hash,
                "generation": self.policy.route.metadata.generation,
                "targetInFlightPerPod": target,
                **self.hints.snapshot(live=self.health.inflight),
                "ready": self.readiness()[0],
                "upstreams": self.gateway.upstreams.snapshot(),
            }
        )

    # -- background loops ------------------------------------------------------------------------

    def _config_digest(self) -> str | None:
        """Digest of the route file and the Secret files it references (rotated keys reload too)."""
        digest = hashlib.sha256()
        try:
            digest.update(self.settings.route_file.read_bytes())
        except OSError:
            return None
        for path in secret_files(self.policy.route, self.settings.secrets_dir):
            digest.update(path.name.encode())
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
        return digest.hexdigest()

    async def _watch_route_file(self) -> None:
        """Apply edits of the route file (and its Secrets) without a restart; keep the old config when
        the new one is invalid."""
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            digest = self._config_digest()
            if digest is None or digest == self._route_digest:
                continue
            self._route_digest = digest
            self.reload()

    def reload(self) -> bool:
        """Re-read the route file (and Secrets); True when the new configuration is in force."""
        try:
            route = load_route(self.settings.route_file)
            file_secrets = load_secret_documents(self.settings.route_file)
            policy = load_policy(
                route, self.settings.secrets_dir, self.settings.upstream_override, file_secrets
            )
            telemetry = self._reloaded_telemetry(route)
        except (ManifestError, ValueError) as error:  # TelemetryError included
            self.metrics.config_reloads_total.labels(self.policy.name, "error").inc()
            log.error(
                "route file rejected; keeping the running configuration",
                extra={"fields": {"error": str(error)}},
            )
            return False
        if telemetry is not self.telemetry:
            if self.telemetry is not None:
                self.telemetry.retire()
            self.telemetry = self.gateway.telemetry = telemetry
        self.gateway.update_policy(policy)
        self.metrics.config_reloads_total.labels(policy.name, "ok").inc()
        log.info("configuration reloaded", extra={"fields": {"config_hash": policy.config_hash}})
        return True

    def _reloaded_telemetry(self, route: LLMRoute) -> Telemetry | None:
        """The running telemetry when ``spec.telemetry`` is unchanged, else a new one (or None)."""
        if route.spec.telemetry == self.policy.route.spec.telemetry:
            return self.telemetry
        return start_telemetry(route.spec.telemetry, os.environ, self._resource(route))

    async def _probe_upstream(self) -> None:
        """Probe readiness.upstreamHealthPath of every upstream, every health interval."""
        while True:
            policy = self.policy
            path = policy.route.spec.readiness.upstream_health_path
            targets = policy.upstreams
            results: list[tuple[bool | None, str]]
            if path is None:
                results = [(None, "")] * len(targets)
            else:
                probes = [self._probe_once(t.url + path, t.spec.timeout_seconds) for t in targets]
                results = list(await asyncio.gather(*probes))
            for target, (healthy, detail) in zip(targets, results, strict=True):
                self.gateway.upstreams.set_health(target.name, healthy, detail)
            await asyncio.sleep(self.settings.health_interval)

    async def _probe_once(self, url: str, timeout_seconds: float) -> tuple[bool | None, str]:
        timeout = min(5.0, timeout_seconds)
        try:
            async with asyncio.timeout(timeout), self.gateway.session.get(url) as response:
                await response.read()
                return response.status < 400, f"answered {response.status}"
        except TimeoutError:
            return False, f"no answer within {timeout:g}s"
        except aiohttp.ClientError as error:
            return False, f"unreachable: {type(error).__name__}"

    def _watch_store_state(self) -> None:
        """Mirror a store's own state (up, busy, down) in readiness and ``llmroute_store_state``."""
        watch = getattr(self.store, "watch", None)
        if watch is None:
            return
        route = self.policy.name
        codes = {"up": 0, "busy": 1, "down": 2}

        def changed(state: str) -> None:
            self.health.store_state = str(state)
            self.health.store_available = state != "down"
            self.metrics.store_state.labels(route).set(codes.get(str(state), 2))

        watch(changed, self.metrics.store_busy_total.labels(route).inc)

    async def _watch_store(self) -> None:
        """While the quota store is not up, ping it so readiness recovers without traffic."""
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return
        if not await ping():  # know the store's state before the first request asks
            self.health.store_available = False
            log.warning(
                "quota store unavailable at start",
                extra={
                    "fields": {
                        "store": self.settings.store,
                        "url": redact_url(self.settings.redis_url or ""),
                        "error": await self._store_error(),
                        "on_store_failure": self.policy.route.spec.on_store_failure.value,
                    }
                },
            )
        while True:
            await asyncio.sleep(STORE_PING_SECONDS)
            state = self.health.store_state or ("up" if self.health.store_available else "down")
            if state != "up" and await ping():
                self.health.store_available = True
                log.info("quota store answers again")

    async def _store_error(self) -> str:
        """Why the store does not answer, in words (one more ping, its exception kept)."""
        client = getattr(self.store, "client", None)
        if client is None:
            return "no answer"
        try:
            async with asyncio.timeout(2.0):
                await client.ping()
        except Exception as error:  # any client failure is the answer we want to report
            return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return "no answer to the first ping"

    async def _sample_load(self) -> None:
        """Feed the autoscaling hints with the in-flight count, once a second."""
        while True:
            self.hints.sample(self.health.inflight)
            await asyncio.sleep(1.0)


def freeze_startup_heap() -> int:
    """Free start-up's garbage, then take every object still alive out of the cycle collector's
    scans (``gc.freeze``); returns how many. The modules, models and app built at start-up are most
    of the heap and live as long as the process: without this, each full collection walks all of
    them (25-40 ms measured here, a stall every request in flight waits out); after it, only what
    was allocated since. The request path itself leaves no reference cycles (guarded in
    ``tests/test_work_per_request.py``), so collections stay rare and short."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run(
    settings: Settings, route: LLMRoute, on_started: Callable[[Sidecar], None] | None = None
) -> int:
    """Run a sidecar until SIGTERM or SIGINT, then drain and exit."""
    sidecar = Sidecar(settings, route)
    await sidecar.start()
    freeze_startup_heap()
    if on_started is not None:
        on_started(sidecar)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    started = time.monotonic()
    drained = await sidecar.drain()
    log.info(
        "shutting down",
        extra={"fields": {"drained": drained, "drain_seconds": round(time.monotonic() - started, 3)}},
    )
    await sidecar.stop()
    return 0
