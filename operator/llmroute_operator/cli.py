"""``llmroute-operator``: kopf's scoping flags, the webhook endpoint and the sidecar settings."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from llmroute_operator.settings import FAILURE_POLICIES, OperatorSettings
from llmroute_operator.settings import SettingsError as OperatorSettingsError
from llmroute_sidecar.config import HostPort, SettingsError


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="llmroute-operator",
        description="Reconciles LLMRoutes and injects the llmroute sidecar (webhooks /inject, /validate).",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    parser.add_argument("--peering", metavar="NAME", help="kopf peering object name (HA: one active replica)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, configure the handlers module, run kopf until stopped."""
    args = build_parser().parse_args(argv)
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
    except (SettingsError, OperatorSettingsError) as error:
        print(f"llmroute-operator: {error}", file=sys.stderr)
        return 2

    import kopf

    from llmroute_operator import handlers

    base = handlers.RuntimeConfig.from_env(env)
    handlers.configure_runtime(
        handlers.RuntimeConfig(
            settings=settings,
            webhook_listen=webhook_listen,
            webhook_insecure=args.webhook_insecure or base.webhook_insecure,
            webhook_host=args.webhook_host or base.webhook_host,
            webhook_certfile=args.webhook_cert or base.webhook_certfile,
            webhook_keyfile=args.webhook_key or base.webhook_keyfile,
        )
    )
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=args.standalone,
        peering_name=args.peering,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
