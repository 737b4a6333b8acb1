"""Process settings of one sidecar: command-line flags over environment over the route file.

The route file is the LLMRoute manifest a user applies; everything else a sidecar needs (where to
listen, which store, where Secrets are mounted) comes from flags or ``LLMROUTE_*`` variables, so the
operator can inject the same image everywhere.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_ADMIN_LISTEN = "0.0.0.0:9090"
DEFAULT_SECRETS_DIR = "/etc/llmroute/secrets"
CONFIGMAPS_SUBDIR = "_configmaps"
"""ConfigMaps (spec.pricingConfigMapRef) are mounted at ``<secrets dir>/_configmaps/<name>/`` (no
Secret name starts with '_', so they never collide with Secrets)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
USAGE = (
    "llmroute-sidecar --route FILE [--upstream URL] [--listen HOST:PORT] [--admin-listen HOST:PORT]\n"
    "                 [--redis URL | --store {memory,redis}] [--secrets-dir DIR] [--log-level LEVEL]\n"
    "                 [--header-timeout SECONDS] [--max-connections N]"
)


class SettingsError(ValueError):
    """A flag or environment variable with an unusable value."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> HostPort:
        """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"{what} must be HOST:PORT, got {text!r}")
        return cls(host.strip("[]") or "0.0.0.0", int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything about the process that is not in the route file."""

    route_file: Path
    listen: HostPort
    admin_listen: HostPort
    upstream_override: str | None = None
    store: str = "memory"
    redis_url: str | None = None
    secrets_dir: Path = Path(DEFAULT_SECRETS_DIR)
    drain_seconds: float = 25.0
    watch_interval: float = 1.0
    health_interval: float = 5.0
    heartbeat_seconds: float = 15.0
    lease_margin_seconds: float = 30.0
    """Concurrency leases expire deadlineSeconds + this after admission (a killed pod's slots return)."""
    replicas: int = 1
    pod_name: str = ""
    pod_namespace: str = ""
    log_level: str = "INFO"
    header_timeout_seconds: float = 10.0
    """From accept (or the end of the previous response) until a request's headers are complete."""
    max_connections: int = 4096
    """Open client connections on the traffic port; 0: no cap."""


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative, got {raw!r}")
    return value


def _flag_or_env(flag: float | None, env: Mapping[str, str], name: str, default: float) -> float:
    if flag is None:
        return _number(env, name, default)
    if flag < 0:
        raise SettingsError(f"{name.removeprefix('LLMROUTE_').lower()} must not be negative, got {flag}")
    return flag


def build_parser() -> argparse.ArgumentParser:
    """The ``llmroute-sidecar`` command line."""
    parser = argparse.ArgumentParser(
        prog="llmroute-sidecar",
        usage=USAGE,
        description="Reverse proxy for OpenAI-compatible traffic enforcing an LLMRoute's fleet-wide limits.",
        epilog="Hashing client keys for identity.keysSecretRef: llmroute-sidecar keys {hash,secret} --help",
    )
    parser.add_argument(
        "--route",
        metavar="FILE",
        help="LLMRoute manifest; required (or env LLMROUTE_ROUTE_FILE). Secret documents in the same file "
        "are used for Secrets missing from --secrets-dir",
    )
    parser.add_argument(
        "--upstream", metavar="URL", help="override spec.upstream.url (env LLMROUTE_UPSTREAM)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"traffic port (default {DEFAULT_LISTEN})")
    parser.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help=f"admin port: /healthz /readyz /metrics /hints (default {DEFAULT_ADMIN_LISTEN})",
    )
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--redis", metavar="URL", help="Redis URL: fleet-wide quotas (env LLMROUTE_REDIS_URL)")
    store.add_argument(
        "--store", choices=["memory", "redis"], help="quota store (default: redis if a URL is set)"
    )
    parser.add_argument(
        "--secrets-dir",
        metavar="DIR",
        help="mounted Secrets as DIR/<secret>/<key> "
        f"(env LLMROUTE_SECRETS_DIR, default {DEFAULT_SECRETS_DIR})",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"one of {', '.join(LOG_LEVELS)} (env LLMROUTE_LOG_LEVEL, default INFO)",
    )
    parser.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=float,
        help="close a connection whose request headers are not complete in time "
        "(env LLMROUTE_HEADER_TIMEOUT_SECONDS, default 10)",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=int,
        help="open client connections on the traffic port, 0 = no cap "
        "(env LLMROUTE_MAX_CONNECTIONS, default 4096)",
    )
    return parser


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings: flags first, then ``LLMROUTE_*`` variables, then defaults."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    route_file = args.route or env.get("LLMROUTE_ROUTE_FILE")
    if not route_file:
        raise SettingsError("no route file: pass --route FILE or set LLMROUTE_ROUTE_FILE")
    redis_url = args.redis or env.get("LLMROUTE_REDIS_URL") or None
    store = args.store or env.get("LLMROUTE_STORE") or ("redis" if redis_url else "memory")
    if args.store == "memory":
        redis_url = None
    if store not in ("memory", "redis"):
        raise SettingsError(f"LLMROUTE_STORE must be memory or redis, got {store!r}")
    if store == "redis" and not redis_url:
        raise SettingsError("--store redis needs a Redis URL: pass --redis URL or set LLMROUTE_REDIS_URL")
    replicas = int(_number(env, "LLMROUTE_REPLICAS", 1))
    log_level = (args.log_level or env.get("LLMROUTE_LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise SettingsError(f"LLMROUTE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    return Settings(
        route_file=Path(route_file),
        listen=HostPort.parse(args.listen or env.get("LLMROUTE_LISTEN") or DEFAULT_LISTEN, "--listen"),
        admin_listen=HostPort.parse(
            args.admin_listen or env.get("LLMROUTE_ADMIN_LISTEN") or DEFAULT_ADMIN_LISTEN, "--admin-listen"
        ),
        upstream_override=args.upstream or env.get("LLMROUTE_UPSTREAM") or None,
        store=store,
        redis_url=redis_url,
        secrets_dir=Path(args.secrets_dir or env.get("LLMROUTE_SECRETS_DIR") or DEFAULT_SECRETS_DIR),
        drain_seconds=_number(env, "LLMROUTE_DRAIN_SECONDS", 25.0),
        watch_interval=max(0.05, _number(env, "LLMROUTE_WATCH_INTERVAL", 1.0)),
        health_interval=max(0.05, _number(env, "LLMROUTE_HEALTH_INTERVAL", 5.0)),
        heartbeat_seconds=max(0.05, _number(env, "LLMROUTE_HEARTBEAT_SECONDS", 15.0)),
        lease_margin_seconds=_number(env, "LLMROUTE_LEASE_MARGIN_SECONDS", 30.0),
        replicas=max(1, replicas),
        pod_name=env.get("LLMROUTE_POD_NAME", ""),
        pod_namespace=env.get("LLMROUTE_POD_NAMESPACE", ""),
        header_timeout_seconds=_flag_or_env(
            args.header_timeout, env, "LLMROUTE_HEADER_TIMEOUT_SECONDS", 10.0
        ),
        max_connections=int(_flag_or_env(args.max_connections, env, "LLMROUTE_MAX_CONNECTIONS", 4096)),
        log_level=log_level,
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
