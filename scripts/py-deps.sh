#!/usr/bin/env bash
# Installs the Python packages the OpenAI-client test needs
# (tests/openai/requirements.txt, exact versions) into a virtual
# environment outside the clone, idempotently. The last line on stdout is
# the environment's python.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ERRAND_PY_DIR:-${ERRAND_HOME:-$HOME/.cache/errand}/py}"
req=tests/openai/requirements.txt
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ]; then
    echo "[py-deps] creating $venv" >&2
    python3 -m venv "$venv"
fi
if ! cmp -s "$req" "$stamp"; then
    echo "[py-deps] installing $(tr '\n' ' ' < "$req")" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    cp "$req" "$stamp"
fi
echo "$venv/bin/python"
