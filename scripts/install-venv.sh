#!/usr/bin/env bash
# The project's venv, from requirements.lock: exactly the versions the suite passed with, hash-checked.
# Prints nothing new on success; the whole install log is kept in $VENV/install.log, and a deprecation
# warning anywhere in it fails the install (scripts/no-deprecations).
#
#   usage: scripts/install-venv.sh PYTHON VENV CRIU_SRC      (make venv runs it)
set -euo pipefail
PYTHON=$1 VENV=$2 CRIU_SRC=$3
cd "$(dirname "$0")/.."
log=$VENV/install.log

install() {
  "$PYTHON" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  # Build tools first (pip, setuptools, wheel are in the lock too), then everything else, with no resolver:
  # the lock already is the resolution, and --require-hashes refuses anything it does not name.
  "${pip[@]}" install -q --require-hashes --no-deps -r requirements.lock
  # pycriu from the same CRIU tree as the criu binary. Its pyproject still has a `license` table, which
  # the locked setuptools accepts with a deprecation notice; silenced for this one build, since the
  # source is CRIU's own (docs/host-setup.md, "Locked dependencies").
  PYTHONWARNINGS='ignore:`project.license` as a TOML table is deprecated,ignore:`install_requires` overwritten' \
    "${pip[@]}" install -q --no-deps --no-build-isolation "$CRIU_SRC/lib"
  "${pip[@]}" install -q --no-deps --no-build-isolation -e .
  "${pip[@]}" check
}

mkdir -p "$VENV"
install > >(tee "$log") 2>&1
scripts/no-deprecations "$log"
