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
requirements="$(dirname "$0")/requirements.txt"
# The marker holds the requirements' hash, written once pip has installed
# them: an install cut short (a killed first run) or changed requirements
# install again, where a venv's mere presence would leave it without torch.
marker="$venv/.simclr-requirements"
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$marker" 2>/dev/null)" != "$wanted" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet -r "$requirements" >&2
    echo "$wanted" > "$marker"
fi
echo "$venv/bin/python"
