"""``llmroute-operator status ROUTE``: gather a route's state (API server, Redis, sidecars) and print it.

Only this module does I/O; ``route_status_view`` builds the model and ``route_status_render``
prints it. Redis is only read. Exit status: 0 shown (also without Redis), 1 the route cannot be
read (not found, API error), 2 no Kubernetes credentials or bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmroute_operator import kube, render
from llmroute_operator.cli import kubernetes_credentials_problem
from llmroute_operator.quota_usage import read_usage
from llmroute_operator.route_status_render import render_json, render_text
from llmroute_operator.route_status_view import (
    Counts,
    Gathered,
    RecentRejection,
    add_counts,
    admin_url,
    build_view,
    limit_queries,
    parse_rejections,
    recent_rejections,
    redact_url,
    sidecar_redis_url,
)
from llmroute_operator.status import matched_pods, parse_body
from llmroute_sidecar.api import LLMRoute, ManifestError

PROBE_TIMEOUT_SECONDS = 1.0
PROBE_PARALLELISM = 16
REDIS_TIMEOUT_SECONDS = 10.0
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmroute-operator status",
        description="Show one LLMRoute: status, limits with live usage from Redis, selected pods and "
        "their sidecars, 429s per limit. Reads only.",
    )
    parser.add_argument("route", metavar="ROUTE", help="the LLMRoute's name")
    parser.add_argument(
        "--namespace", "-n", metavar="NS", help="its namespace (default: the kubeconfig context's)"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="Redis to read usage from (default: env LLMROUTE_REDIS_URL, else the URL the operator "
        "gave the route's sidecars)",
    )
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text", help="default: text")
    parser.add_argument(
        "--no-probe", action="store_true", help="do not call the sidecars' /hints and /metrics"
    )
    parser.add_argument("--top", type=int, default=5, metavar="N", help="busiest subjects per limit (5)")
    return parser


def default_namespace() -> str:
    """The service account's namespace in a pod, else the kubeconfig context's, else ``default``."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    import kubernetes

    try:
        _, active = kubernetes.config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
    except Exception:  # no kubeconfig here: credentials were already checked
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")


def choose_redis_url(
    flag: str | None, env: Mapping[str, str], pods: Sequence[Mapping[str, Any]]
) -> tuple[str | None, str]:
    """(URL, where it came from): ``--redis``, ``LLMROUTE_REDIS_URL``, the injected sidecars' env."""
    if flag:
        return flag, "--redis"
    if env.get("LLMROUTE_REDIS_URL"):
        return env["LLMROUTE_REDIS_URL"], "LLMROUTE_REDIS_URL"
    from_pods = sidecar_redis_url(pods)
    if from_pods:
        return from_pods, "the sidecars' LLMROUTE_REDIS_URL"
    return None, ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_SECONDS) as response:
        body: bytes = response.read()
    return body


def _probe(base: str) -> tuple[dict[str, Any] | None, str | None, str | None, list[Any]]:
    """(hints, metrics text, error, last rejections) of one sidecar's admin endpoint."""
    try:
        hints = json.loads(_get(f"{base}/hints"))
        metrics = _get(f"{base}/metrics").decode(errors="replace")
    except (OSError, ValueError) as error:
        return None, None, "no answer" if isinstance(error, TimeoutError) else _one_line(error)[:80], []
    try:  # sidecars older than /rejections answer 404: their counters still show
        recent = json.loads(_get(f"{base}/rejections")).get("rejections")
    except (OSError, ValueError, AttributeError):
        recent = []
    last = recent if isinstance(recent, list) else []
    return (hints if isinstance(hints, dict) else None), metrics, None, last


def _usage(args: argparse.Namespace, route: LLMRoute, pods: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    url, source = choose_redis_url(args.redis, os.environ, pods)
    if url is None:
        return {
            "usage_problem": "no Redis URL (--redis, LLMROUTE_REDIS_URL, or the injected sidecars' "
            "LLMROUTE_REDIS_URL); without one each sidecar counts alone"
        }
    shown = f"{redact_url(url)} ({source})"
    try:
        usage = asyncio.run(
            asyncio.wait_for(read_usage(url, route.key, limit_queries(route)), REDIS_TIMEOUT_SECONDS)
        )
    except Exception as error:  # unreachable, refused, auth, a bad URL: all shown the same way
        return {"usage_source": shown, "usage_problem": f"Redis {shown} not readable: {_one_line(error)}"}
    return {"usage": usage, "usage_source": shown}


def _probes(pods: Sequence[Mapping[str, Any]], route_key: str) -> dict[str, Any]:
    targets = [
        (str((pod.get("metadata") or {}).get("name")), base)
        for pod in pods
        if (base := admin_url(pod)) is not None
    ]
    hints: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    rejections: Counts = {}
    shadow: Counts = {}
    recent: list[RecentRejection] = []
    answered = 0
    if targets:
        with ThreadPoolExecutor(max_workers=min(PROBE_PARALLELISM, len(targets))) as pool:
            results = list(pool.map(lambda target: _probe(target[1]), targets))
        for (name, _), (hint, metrics, error, last) in zip(targets, results, strict=True):
            if error is not None:
                errors[name] = error
                continue
            recent.extend(recent_rejections(name, last))
            if hint is not None:
                hints[name] = hint
            if metrics is not None:
                answered += 1
                more, more_shadow = parse_rejections(metrics, route_key)
                rejections, shadow = add_counts(rejections, more), add_counts(shadow, more_shadow)
    return {
        "hints": hints,
        "probe_errors": errors,
        "rejections": rejections,
        "shadow_rejections": shadow,
        "metrics_answered": answered,
        "recent_rejections": recent,
    }


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 0:
        print("llmroute-operator status: --top must be 0 or more", file=sys.stderr)
        return 2
    problem = kubernetes_credentials_problem()
    if problem is not None:
        print(f"llmroute-operator: {problem}", file=sys.stderr)
        return 2
    namespace = args.namespace or default_namespace()
    client = kube.Kube()
    try:
        body = client.get_route(namespace, args.route)
        if body is None:
            print(f"llmroute-operator: LLMRoute {namespace}/{args.route} not found", file=sys.stderr)
            return 1
        route: LLMRoute | None = None
        invalid = None
        try:
            route = parse_body(body)
        except ManifestError as error:
            invalid = " ".join(str(error).split())
        pods = client.list_pods(namespace, render.label_selector_query(route.spec.selector)) if route else []
    except Exception as error:  # API errors, refused connections, TLS: one line, not a traceback
        print(
            f"llmroute-operator: cannot read LLMRoute {namespace}/{args.route}: {_one_line(error)}",
            file=sys.stderr,
        )
        return 1
    gathered: dict[str, Any] = {"body": body, "pods": pods, "probed": not args.no_probe, "top": args.top}
    if route is not None:
        selected = matched_pods(route, pods)
        if route.spec.limits:
            gathered |= _usage(args, route, selected)
        if not args.no_probe:
            gathered |= _probes(selected, route.key)
    view = build_view(route, Gathered(**gathered), invalid)
    sys.stdout.write(render_json(view) if args.output == "json" else render_text(view))
    return 0
