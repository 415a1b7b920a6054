#!/usr/bin/env bash
# Run chatgateway from this checkout on the embedded default (web chat on http://127.0.0.1:8080/,
# the built-in echo agent, SQLite in ~/.local/state/chatgateway/), or on $CHATGATEWAY_CONFIG.
# Extra arguments go to `chatgateway run`.
#
# The package is installed into ./.venv only when the venv is new or pyproject.toml changed (the
# install is editable, so code changes need none); pip's output goes to .venv/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.chatgateway-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/chatgateway ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    echo "start.sh: installing chatgateway into .venv (log: .venv/install.log) ..." >&2
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e .; } \
        >.venv/install.log 2>&1; then
        tail -n 30 .venv/install.log >&2
        echo "start.sh: the install failed; the whole log is .venv/install.log" >&2
        exit 1
    fi
    echo "$wanted" >"$STAMP"
fi
echo "start.sh: the command is .venv/bin/chatgateway ('source .venv/bin/activate' puts it on PATH)" >&2
exec .venv/bin/chatgateway run "$@"
