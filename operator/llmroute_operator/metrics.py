"""The operator's own Prometheus metrics (``llmroute_operator_*``) and its admin endpoint.

The admin endpoint (``--metrics-listen``, default ``0.0.0.0:8080``) serves ``/metrics`` and
``/healthz``. It runs in every replica, active or standby, like the webhook server: the liveness
probe must not kill a replica for waiting its turn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from llmroute_sidecar.config import HostPort

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "llmroute_operator_reconciles_total",
    "LLMRoute reconciliations by outcome (ok, invalid, error).",
    ["outcome"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "llmroute_operator_reconcile_duration_seconds",
    "Time to reconcile one LLMRoute (render, write, observe, report).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WEBHOOK_REQUESTS = Counter(
    "llmroute_operator_webhook_requests_total",
    "Admission reviews answered, by webhook (inject, validate) and outcome.",
    ["webhook", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "llmroute_operator_webhook_duration_seconds",
    "Time to answer one admission review, by webhook.",
    ["webhook"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
PODS_INJECTED = Counter(
    "llmroute_operator_pods_injected_total",
    "Pods that received the sidecar from the /inject webhook.",
    registry=REGISTRY,
)
ROLLOUTS = Counter(
    "llmroute_operator_rollouts_total",
    "Workloads restarted so their pods get the current sidecar, by kind.",
    ["kind"],
    registry=REGISTRY,
)
ROUTE_PODS = Gauge(
    "llmroute_operator_route_pods",
    "Pods of a route (namespace/name) by state: matched (selected), injected (running the current"
    " sidecar), ready; from the last reconcile of this replica.",
    ["route", "state"],
    registry=REGISTRY,
)
RECOMMENDED_REPLICAS = Gauge(
    "llmroute_operator_recommended_replicas",
    "status.recommendedReplicas of a route (namespace/name); absent while the status has none.",
    ["route"],
    registry=REGISTRY,
)
POD_STATES = ("matched", "injected", "ready")


def record_route_status(route: str, status: Mapping[str, Any]) -> None:
    """Export a valid route's status: its pod counts and recommended replicas."""
    pods = status.get("pods") or {}
    for state in POD_STATES:
        ROUTE_PODS.labels(route, state).set(pods.get(state) or 0)
    recommended = status.get("recommendedReplicas")
    if recommended is None:  # no spec.autoscaling (any more), or no hints yet
        _remove(RECOMMENDED_REPLICAS, route)
    else:
        RECOMMENDED_REPLICAS.labels(route).set(recommended)


def forget_route(route: str) -> None:
    """Drop a deleted route's series."""
    for state in POD_STATES:
        _remove(ROUTE_PODS, route, state)
    _remove(RECOMMENDED_REPLICAS, route)


def _remove(metric: Gauge, *labels: str) -> None:
    with suppress(KeyError):
        metric.remove(*labels)


@contextmanager
def observe_reconcile() -> Iterator[list[str]]:
    """Time a reconcile; the body sets ``outcome[0]`` (default ok); an exception counts as error."""
    outcome = ["ok"]
    started = time.perf_counter()
    try:
        yield outcome
    except BaseException:
        outcome[0] = "error"
        raise
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)
        RECONCILES.labels(outcome[0]).inc()


@contextmanager
def observe_webhook(webhook: str) -> Iterator[list[str]]:
    """Time an admission review; the body sets ``outcome[0]``; an exception counts as error."""
    outcome = ["allowed"]
    started = time.perf_counter()
    try:
        yield outcome
    except BaseException as error:
        outcome[0] = "denied" if type(error).__name__ == "AdmissionError" else "error"
        raise
    finally:
        WEBHOOK_SECONDS.labels(webhook).observe(time.perf_counter() - started)
        WEBHOOK_REQUESTS.labels(webhook, outcome[0]).inc()


async def _metrics(_: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def admin_app() -> web.Application:
    """``/metrics`` and ``/healthz``."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def start_admin(listen: HostPort) -> web.AppRunner:
    """Serve the admin app until the returned runner is cleaned up."""
    runner = web.AppRunner(admin_app(), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
    return runner
