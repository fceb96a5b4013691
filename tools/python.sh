#!/usr/bin/env bash
# Prints the Python that tools/ scripts run: $PYTHON if set, else the venv in
# the project cache ($SIMCLR_CACHE, default ~/.cache/simclr), created with
# tools/requirements.txt on first use.
#
#   "$(tools/python.sh)" tools/fixtures/make_fixtures.py resnet
set -euo pipefail
if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    exit 0
fi
venv=${SIMCLR_CACHE:-$HOME/.cache/simclr}/venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet -r "$(dirname "$0")/requirements.txt" >&2
fi
echo "$venv/bin/python"
