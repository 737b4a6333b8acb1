#!/usr/bin/env bash
# Install wrk (the C load generator `make bench` drives) when it is missing. Needs root (or
# passwordless sudo) and Debian's apt-get; says clearly what to do otherwise.
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
echo "llmroute: installing wrk (the benchmark's load generator)" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "llmroute: no apt-get here; install wrk (https://github.com/wg/wrk) yourself and re-run" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "llmroute: need root to run 'apt-get install -y wrk'; run it yourself and re-run" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends wrk >/dev/null
command -v wrk >/dev/null && echo "llmroute: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)" >&2
