#!/usr/bin/env bash
# Grafana's published dashboard types and a pinned TypeScript compiler, for the dashboard's schema check
# (tests/dashboard/test_grafana_schema.py): `npm ci` from tests/dashboard/package-lock.json into DEST,
# which `make venv` puts in the venv. npm's download cache lives in the skyferry cache, so a new venv
# installs from it (about 2 s; 5 s with an empty cache). npm's output is kept in DEST/install.log.
#
#   usage: scripts/install-dashboard-check.sh DEST      (make venv runs it)
set -euo pipefail
DEST=$1
CACHE=${SKYFERRY_CACHE:-/var/cache/skyferry}
cd "$(dirname "$0")/.."
command -v npm >/dev/null || { echo "npm not found: run make host (scripts/bootstrap-host.sh)" >&2; exit 1; }
mkdir -p "$DEST"
cp tests/dashboard/package.json tests/dashboard/package-lock.json "$DEST/"
# --ignore-scripts: these packages need no install scripts, so none of them runs.
npm ci --prefix "$DEST" --cache "$CACHE/npm" --prefer-offline --ignore-scripts --no-audit --no-fund \
  >"$DEST/install.log" 2>&1 || { cat "$DEST/install.log" >&2; exit 1; }
