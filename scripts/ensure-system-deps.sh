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
"$(dirname "$0")/apt-install.sh" "Redis >= 6.2 and curl, which the tests run" \
  redis-server redis-tools curl ca-certificates
# The tests start their own servers on free ports; the packaged service is not needed.
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
command -v redis-server >/dev/null && echo "llmroute: $(redis-server --version | cut -d' ' -f1-3)" >&2
