"""``make demo``: the sidecar in front of a built-in mock upstream, with traffic driven through it."""

from __future__ import annotations


def main() -> int:
    """Placeholder until the sidecar lands (issue: sidecar gateway)."""
    print("llmroute demo: the sidecar gateway is not built yet; this command will run it locally.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
