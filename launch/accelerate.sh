#!/usr/bin/env bash
# Run a script with `accelerate launch` on this machine: every GPU, or NPROC CPU processes.
#
# Usage: bash launch/accelerate.sh SCRIPT.py [ARGS...]
#   bash launch/accelerate.sh examples/train_resnet_accelerate.py           # 2 CPU procs
#   NPROC=4 bash launch/accelerate.sh examples/train_resnet_accelerate.py --epochs 3
# Environment:
#   NPROC   processes (default: number of visible GPUs, or 2 without a GPU)
#   ACCELERATE_CONFIG  config file (default: launch/accelerate/multi_gpu.yaml with a GPU,
#           launch/accelerate/cpu.yaml without)
#   PYTHON  interpreter (default: .venv/bin/python from scripts/setup_env.sh, else python3)
# On CPU this is the incantation that really starts NPROC processes: the multi-GPU launcher plus
# ACCELERATE_USE_CPU=true (`accelerate launch --cpu --num_processes 2` starts one, silently).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
syncbn_require_script "$@"
GPUS=$(syncbn_gpu_count)
NPROC=${NPROC:-$(syncbn_default_nproc)}
if [ "${GPUS:-0}" -gt 0 ]; then
  ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$SYNCBN_ROOT/launch/accelerate/multi_gpu.yaml}
else
  ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$SYNCBN_ROOT/launch/accelerate/cpu.yaml}
  export ACCELERATE_USE_CPU=true
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
  --num_processes "$NPROC" --num_machines 1 --mixed_precision no --dynamo_backend no "$@"
