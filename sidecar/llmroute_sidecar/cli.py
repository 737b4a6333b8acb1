"""``llmroute-sidecar``: run one sidecar for the LLMRoute manifest in a file.

``llmroute-sidecar keys ...`` is the key-hashing helper (``keys_cli``); every other command line runs
a sidecar.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from llmroute_sidecar.accesslog import configure_logging
from llmroute_sidecar.api.manifest import ManifestError, load_route
from llmroute_sidecar.app import ListenError, run
from llmroute_sidecar.config import SettingsError, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, read the route, serve until SIGTERM; exit 2 on bad configuration."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["keys"]:
        from llmroute_sidecar.keys_cli import main as keys_main

        return keys_main(args[1:])
    try:
        settings = load_settings(args)
        route = load_route(settings.route_file)
    except (SettingsError, ManifestError) as error:
        print(f"llmroute-sidecar: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:  # every line on stdout is a JSON log record; 'sidecar started' names both addresses
        return asyncio.run(run(settings, route))
    except (ValueError, ListenError) as error:  # a Secret missing or unreadable; a port already in use
        print(f"llmroute-sidecar: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
