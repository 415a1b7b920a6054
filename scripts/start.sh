#!/usr/bin/env bash
# Install chatgateway into ./.venv and run it on the embedded default (config/gateway.yaml):
# SQLite in ./var/, web chat on http://127.0.0.1:8080/, the built-in echo agent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/chatgateway run --config "${CHATGATEWAY_CONFIG:-config/gateway.yaml}" "$@"
