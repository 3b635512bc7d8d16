#!/usr/bin/env bash
# Installs opinionpool and its dev tools into the current Python environment.
# An installed torch is kept as it is (it may be a CUDA build); torch==2.13.0 is installed only
# when no torch imports, and the installed version is then pinned through a constraints file so
# that no resolver step can pull a different torch on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch importable, installing torch==2.13.0"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
"$PYTHON" -m pip install --quiet --constraint "$constraints" -e ".[dev]"
echo "setup: ready ($(cat "$constraints"))"
