# Shared by the launch scripts (sourced, not run): find the repo root and the project's Python.
#   PYTHON  interpreter to use; default: .venv/bin/python in the repo root when it exists
#           (made by scripts/setup_env.sh), else python3 on PATH.
#   NPROC   processes per node; default: the number of visible GPUs, or 2 without a GPU.
SYNCBN_ROOT=${SYNCBN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$SYNCBN_ROOT/.venv/bin/python" ]; then PYTHON="$SYNCBN_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# Count GPUs without importing torch (that costs seconds): CUDA_VISIBLE_DEVICES, else nvidia-smi.
syncbn_gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
    if [ -z "$ids" ] || [ "$ids" = "-1" ]; then echo 0; else echo $(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 )); fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

syncbn_default_nproc() {
  local n; n=$(syncbn_gpu_count)
  if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 2; fi
}

syncbn_require_script() {
  if [ $# -eq 0 ]; then
    echo "usage: $(basename "$0") SCRIPT.py [ARGS...]  (expected a training script, got no arguments)" >&2
    exit 2
  fi
}
