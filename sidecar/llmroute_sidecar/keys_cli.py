"""``llmroute-sidecar keys``: hash client keys for ``identity.keysSecretRef`` so nobody does it by hand.

``keys hash KEY...`` prints sha256-hex(KEY), one per line; ``keys secret --name NAME --tier TIER KEY...``
prints the ``kubectl create secret generic`` command (or, with ``--yaml``, the Secret manifest) whose
data maps each key's digest to its tier. Without KEY arguments keys are read from standard input, one
per line, so they stay out of shell history. Only digests are printed, never a key.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence

import yaml

from llmroute_sidecar.api.spec import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN
from llmroute_sidecar.policy import sha256_hex


class KeysError(ValueError):
    """Unusable input; printed as one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmroute-sidecar keys",
        description="Hash client keys for an LLMRoute's identity.keysSecretRef (sha256-hex(key) -> tier).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{hash,secret}")
    hash_ = commands.add_parser("hash", help="print sha256-hex of each key")
    hash_.add_argument("keys", nargs="*", metavar="KEY", help="client keys (default: one per line on stdin)")
    secret = commands.add_parser("secret", help="print the kubectl command (or YAML) of a key Secret")
    secret.add_argument("--name", required=True, help="the Secret's name (identity.keysSecretRef.name)")
    secret.add_argument("--tier", required=True, help="tier of every key given (a key of spec.tiers)")
    secret.add_argument("--namespace", "-n", help="the route's namespace")
    secret.add_argument("--yaml", action="store_true", help="print a Secret manifest instead of kubectl")
    secret.add_argument("keys", nargs="*", metavar="KEY", help="client keys (default: one per line on stdin)")
    return parser


def key_entries(keys: Sequence[str], tier: str) -> dict[str, str]:
    """sha256-hex(key) -> tier for each key (surrounding whitespace stripped, as the sidecar does)."""
    cleaned = [key.strip() for key in keys]
    if not cleaned or any(not key for key in cleaned):
        raise KeysError("no key given (or an empty one): pass KEY arguments or one key per line on stdin")
    return {sha256_hex(key): tier for key in cleaned}


def kubectl_command(name: str, entries: dict[str, str], namespace: str | None = None) -> str:
    """``kubectl create secret generic NAME --from-literal=<digest>=<tier> ...``."""
    words = ["kubectl", "create", "secret", "generic", name]
    if namespace:
        words += ["-n", namespace]
    words += [f"--from-literal={digest}={tier}" for digest, tier in entries.items()]
    return " ".join(shlex.quote(word) for word in words)


def secret_manifest(name: str, entries: dict[str, str], namespace: str | None = None) -> str:
    """The Secret as YAML (``stringData``), ready for ``kubectl apply -f -``."""
    metadata: dict[str, str] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "stringData": entries}
    return yaml.safe_dump(secret, sort_keys=False)


def _keys(arguments: Sequence[str]) -> list[str]:
    if arguments:
        return list(arguments)
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


def run(argv: Sequence[str]) -> str:
    """What ``keys`` prints for ``argv``; ``KeysError`` for unusable input."""
    args = build_parser().parse_args(argv)
    if args.command == "hash":
        return "\n".join(key_entries(_keys(args.keys), ""))
    if not re.match(DNS_SUBDOMAIN_PATTERN, args.name):
        raise KeysError(f"--name {args.name!r} must be a Kubernetes object name (lower-case DNS subdomain)")
    if not re.match(DNS_LABEL_PATTERN, args.tier):
        raise KeysError(f"--tier {args.tier!r} must be a tier name (a lower-case DNS label)")
    if args.namespace and not re.match(DNS_LABEL_PATTERN, args.namespace):
        raise KeysError(f"--namespace {args.namespace!r} must be a namespace name (a lower-case DNS label)")
    entries = key_entries(_keys(args.keys), args.tier)
    if args.yaml:
        return secret_manifest(args.name, entries, args.namespace).rstrip("\n")
    return kubectl_command(args.name, entries, args.namespace)


def main(argv: Sequence[str]) -> int:
    try:
        output = run(argv)
    except KeysError as error:
        print(f"llmroute-sidecar keys: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0
