#!/usr/bin/env bash
# Install wrk (the C load generator `make bench` drives) when it is missing. Needs root (or
# passwordless sudo) and Debian's apt-get; says clearly what to do otherwise.
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
echo "llmroute: installing wrk (the benchmark's load generator)" >&2
"$(dirname "$0")/../scripts/apt-install.sh" "the benchmark's load generator, https://github.com/wg/wrk" wrk
command -v wrk >/dev/null && echo "llmroute: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)" >&2
