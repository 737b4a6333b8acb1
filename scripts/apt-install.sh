#!/usr/bin/env bash
# apt-install.sh WHAT PACKAGE...: install Debian packages for llmroute's make targets. Needs root (or
# passwordless sudo) and apt-get; says clearly what to do otherwise (WHAT names what they are for).
set -euo pipefail
what=$1
shift
if ! command -v apt-get >/dev/null 2>&1; then
  echo "llmroute: no apt-get here; install $* ($what) yourself and re-run" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "llmroute: need root to run 'apt-get install $*' ($what); run it yourself and re-run" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
