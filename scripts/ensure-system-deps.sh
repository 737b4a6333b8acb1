#!/usr/bin/env bash
# Install the system programs the test suite runs for real (redis-server, redis-cli, curl) when missing.
# Needs root (or passwordless sudo) and Debian's apt-get; says clearly what to do otherwise.
set -euo pipefail

missing=()
for tool in redis-server redis-cli curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "llmroute: installing system packages (missing: ${missing[*]})" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "llmroute: no apt-get here; install Redis >= 6.2 (redis-server and redis-cli) yourself and re-run" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "llmroute: need root to run 'apt-get install redis-server'; run it yourself and re-run" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server redis-tools curl ca-certificates >/dev/null
# The tests start their own servers on free ports; the packaged service is not needed.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
command -v redis-server >/dev/null && echo "llmroute: $(redis-server --version | cut -d' ' -f1-3)" >&2
