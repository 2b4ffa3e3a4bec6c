#!/usr/bin/env bash
# Create .venv and install syncbn with its test and example dependencies.
#
# Usage: bash scripts/setup_env.sh               # then: . .venv/bin/activate
#        bash scripts/setup_env.sh --ecosystem   # .venv-eco for tests/ecosystem (timm, torchvision, Lightning)
#   VENV=path  where to put the virtual environment (default .venv, or .venv-eco with --ecosystem)
#   PYTHON     interpreter to create it with (default python3)
#
# When torch is missing this installs TORCH_SPEC (default torch==2.13.0) first. Which build that
# is depends on pip's index: from PyPI on Linux it is the multi-GB CUDA build; for the CPU build
# there, run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# TORCH_SPEC=torch==2.13.0+cpu. Set TORCH_SPEC to choose another version (e.g. "torch").
# --ecosystem installs the versions pinned in scripts/ecosystem-requirements.txt (torch 2.14.1,
# torchvision, timm, Lightning) and syncbn with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=main
if [ "${1:-}" = "--ecosystem" ]; then
  MODE=ecosystem
  shift
fi
if [ $# -gt 0 ]; then
  echo "usage: bash scripts/setup_env.sh [--ecosystem]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}

if [ "$MODE" = ecosystem ]; then
  VENV=${VENV:-.venv-eco}
  REQ=scripts/ecosystem-requirements.txt
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  # One resolution for all pins; the package itself is then installed under the same constraints.
  "${PIP[@]}" -r "$REQ"
  "${PIP[@]}" -c "$REQ" -e ".[test]"
  "$VENV/bin/python" - "$VENV" <<'PY'
import sys, torch, torchvision, timm, lightning, syncbn
print(f"syncbn {syncbn.__version__} with torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"timm {timm.__version__}, lightning {lightning.__version__} in {sys.argv[1]}")
PY
  exit 0
fi

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "$TORCH_SPEC"
fi
"${PIP[@]}" -e ".[test,examples]"
"$VENV/bin/python" -c "import torch, syncbn; print(f'syncbn {syncbn.__version__} with torch {torch.__version__} in $VENV')"
