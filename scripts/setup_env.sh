#!/usr/bin/env bash
# Create .venv and install syncbn with its test and example dependencies (CPU build of torch).
#
# Usage: bash scripts/setup_env.sh            # then: . .venv/bin/activate
#   VENV=path  where to put the virtual environment (default .venv)
#   PYTHON     interpreter to create it with (default python3)
#
# A bare `pip install torch` with nothing installed pulls a multi-GB CUDA build; this installs the
# pinned CPU build first when torch is missing. Set TORCH_SPEC to choose another (e.g. "torch").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "$TORCH_SPEC"
fi
"${PIP[@]}" -e ".[test,examples]"
"$VENV/bin/python" -c "import torch, syncbn; print(f'syncbn {syncbn.__version__} with torch {torch.__version__} in $VENV')"
