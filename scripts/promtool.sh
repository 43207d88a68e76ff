#!/usr/bin/env bash
# Checks and unit-tests the Prometheus alert rules (deploy/prometheus):
# `promtool check rules alerts.yml` then `promtool test rules alerts_test.yml`.
# Installs Debian's prometheus package (which ships promtool) when promtool
# is missing: that needs root, as CI has. Exits 3 when promtool is missing
# and cannot be installed, so callers can tell "no tool" from "bad rules".
set -euo pipefail
cd "$(dirname "$0")/../deploy/prometheus"

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/promtool.sh: promtool not found and not root: apt-get install prometheus" >&2
    exit 3
  fi
  echo "scripts/promtool.sh: installing promtool (Debian package prometheus)" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Only the files are wanted: never start the packaged Prometheus service.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  status=0
  { apt-get -o DPkg::Lock::Timeout=120 update -qq && apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends prometheus; } >&2 || status=$?
  [ -n "$own_policy" ] && rm -f "$policy"
  if [ $status != 0 ] || ! command -v promtool >/dev/null 2>&1; then
    echo "scripts/promtool.sh: could not install promtool" >&2
    exit 3
  fi
fi

promtool --version 2>&1 | head -1
promtool check rules alerts.yml
promtool test rules alerts_test.yml
