"""``llmroute-operator``: kopf's scoping flags, the webhook endpoint and the sidecar settings."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from llmroute_operator.settings import FAILURE_POLICIES, OperatorSettings
from llmroute_operator.settings import SettingsError as OperatorSettingsError
from llmroute_sidecar.config import HostPort, SettingsError


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="llmroute-operator",
        description="Reconciles LLMRoutes and injects the llmroute sidecar (webhooks /inject, /validate).",
        epilog="`llmroute-operator status ROUTE [-n NS] [--redis URL] [--output text|json]` shows one "
        "route: status, limits with live usage, pods and 429s (see `llmroute-operator status --help`).",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    parser.add_argument("--peering", metavar="NAME", help="kopf peering object name (HA: one active replica)")
    parser.add_argument(
        "--priority",
        type=int,
        metavar="N",
        help="peering priority; the highest live one reconciles, the others stand by (default: by start "
        "time, so the oldest replica stays active and a restarted one queues behind the others)",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace (default)")
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="serve this namespace (repeatable)",
    )
    parser.add_argument(
        "--webhook-listen",
        metavar="HOST:PORT",
        help="webhook server address (env LLMROUTE_WEBHOOK_LISTEN, default 0.0.0.0:9443)",
    )
    parser.add_argument(
        "--webhook-insecure",
        action="store_true",
        help="plain HTTP webhook server for local runs and tests (env LLMROUTE_WEBHOOK_INSECURE)",
    )
    parser.add_argument(
        "--webhook-host", metavar="HOST", help="hostname clients use (env LLMROUTE_WEBHOOK_HOST)"
    )
    parser.add_argument(
        "--webhook-cert", metavar="FILE", help="TLS certificate (env LLMROUTE_WEBHOOK_CERT_FILE)"
    )
    parser.add_argument(
        "--webhook-key", metavar="FILE", help="TLS private key (env LLMROUTE_WEBHOOK_KEY_FILE)"
    )
    tls = parser.add_argument_group(
        "self-managed webhook TLS (no cert-manager): a CA and serving certificate kept in a Secret"
    )
    tls.add_argument(
        "--webhook-tls-secret",
        metavar="NAME",
        help="Secret (in the operator namespace) holding the CA and serving certificate; the operator "
        "creates and rotates it (env LLMROUTE_WEBHOOK_TLS_SECRET)",
    )
    tls.add_argument(
        "--webhook-service",
        metavar="NAME",
        help="Service in front of the webhook server: the certificate's DNS names "
        "(env LLMROUTE_WEBHOOK_SERVICE)",
    )
    tls.add_argument(
        "--webhook-configuration",
        metavar="NAME",
        help="Mutating and ValidatingWebhookConfiguration whose caBundle the operator keeps current "
        "(env LLMROUTE_WEBHOOK_CONFIGURATION)",
    )
    tls.add_argument(
        "--webhook-cert-dir",
        metavar="DIR",
        help="where the serving certificate files are written (env LLMROUTE_WEBHOOK_CERT_DIR, "
        "default /tmp/llmroute-webhook)",
    )
    parser.add_argument(
        "--operator-namespace",
        metavar="NS",
        help="namespace the operator runs in (env LLMROUTE_OPERATOR_NAMESPACE or POD_NAMESPACE)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="Prometheus /metrics and /healthz (env LLMROUTE_METRICS_LISTEN, default 127.0.0.1:8081; "
        "'off' disables)",
    )
    parser.add_argument("--sidecar-image", metavar="IMAGE", help="sidecar image (env LLMROUTE_SIDECAR_IMAGE)")
    parser.add_argument("--sidecar-version", metavar="TAG", help="sidecar tag (env LLMROUTE_SIDECAR_VERSION)")
    parser.add_argument(
        "--redis-url", metavar="URL", help="Redis URL for every sidecar (env LLMROUTE_REDIS_URL)"
    )
    parser.add_argument(
        "--native-sidecar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="inject as init container with restartPolicy: Always (env LLMROUTE_NATIVE_SIDECAR, default on)",
    )
    parser.add_argument(
        "--webhook-failure-policy",
        choices=FAILURE_POLICIES,
        help="documented failurePolicy of the pod webhook (env LLMROUTE_WEBHOOK_FAILURE_POLICY)",
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def handlers_runtime_from_env(env: dict[str, str]) -> Any:
    """The handlers' RuntimeConfig from the environment (imports kopf, so only when running)."""
    from llmroute_operator import handlers

    return handlers.RuntimeConfig.from_env(env)


def kubernetes_credentials_problem() -> str | None:
    """Why no Kubernetes API client can be configured (no service account, no usable kubeconfig), in
    one line; None when one can. Checked before kopf starts, which would otherwise retry forever."""
    from llmroute_operator import kube

    try:
        kube.load_config()
    except Exception as error:  # ConfigException, unreadable or malformed YAML, bad fields: all the same
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        detail = " ".join(str(error).split())
        return (
            f"no Kubernetes credentials: not in a pod with a service account, and no usable kubeconfig "
            f"at {where} ({detail}); set KUBECONFIG, or check it with `kubectl config view`"
        )
    return None


def start_time_priority(now: float | None = None) -> int:
    """Older replicas get higher kopf peering priorities: the first to start stays active, and
    replicas never share a priority (kopf lets equal-priority peers all run, with a warning)."""
    return -int((time.time() if now is None else now) * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, configure the handlers module, run kopf until stopped; or run ``status``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["status"]:
        from llmroute_operator import status_command

        return status_command.main(arguments[1:])
    args = build_parser().parse_args(arguments)
    env = dict(os.environ)
    if args.webhook_failure_policy:
        # Read by the @kopf.on.mutate decorator at import time (failurePolicy of managed webhooks).
        os.environ["LLMROUTE_WEBHOOK_FAILURE_POLICY"] = env["LLMROUTE_WEBHOOK_FAILURE_POLICY"] = (
            args.webhook_failure_policy
        )
    try:
        settings = OperatorSettings.from_env(
            env,
            sidecar_image=args.sidecar_image,
            sidecar_version=args.sidecar_version,
            redis_url=args.redis_url,
            native_sidecar=args.native_sidecar,
            webhook_failure_policy=args.webhook_failure_policy,
        )
        listen = args.webhook_listen or env.get("LLMROUTE_WEBHOOK_LISTEN") or "0.0.0.0:9443"
        webhook_listen = HostPort.parse(listen, "--webhook-listen")
        if args.operator_namespace:
            env["LLMROUTE_OPERATOR_NAMESPACE"] = args.operator_namespace
        if args.metrics_listen:
            env["LLMROUTE_METRICS_LISTEN"] = args.metrics_listen
        base = handlers_runtime_from_env(env)
    except (SettingsError, OperatorSettingsError) as error:
        print(f"llmroute-operator: {error}", file=sys.stderr)
        return 2
    problem = kubernetes_credentials_problem()
    if problem is not None:
        print(f"llmroute-operator: {problem}", file=sys.stderr)
        return 2

    import kopf

    from llmroute_operator import handlers

    handlers.configure_runtime(
        dataclasses.replace(
            base,
            settings=settings,
            webhook_listen=webhook_listen,
            webhook_insecure=args.webhook_insecure or base.webhook_insecure,
            webhook_host=args.webhook_host or base.webhook_host,
            webhook_certfile=args.webhook_cert or base.webhook_certfile,
            webhook_keyfile=args.webhook_key or base.webhook_keyfile,
            webhook_tls_secret=args.webhook_tls_secret or base.webhook_tls_secret,
            webhook_service=args.webhook_service or base.webhook_service,
            webhook_configuration=args.webhook_configuration or base.webhook_configuration,
            webhook_cert_dir=args.webhook_cert_dir or base.webhook_cert_dir,
        )
    )
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=args.standalone,
        priority=args.priority if args.priority is not None else start_time_priority(),
        peering_name=args.peering,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
