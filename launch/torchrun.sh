#!/usr/bin/env bash
# Run a training script on every GPU of this machine (or 2 CPU processes) with torchrun.
#
# Usage: bash launch/torchrun.sh SCRIPT.py [ARGS...]
#   bash launch/torchrun.sh examples/train_resnet.py                   # 2 CPU procs, digits, SyncBN
#   NPROC=4 bash launch/torchrun.sh examples/train_resnet.py --norm bn --epochs 3
# Environment:
#   NPROC   processes on this node (default: number of visible GPUs, or 2 without a GPU)
#   PYTHON  interpreter (default: .venv/bin/python from scripts/setup_env.sh, else python3)
#   OMP_NUM_THREADS  threads per process (default 1: N processes share the cores)
#   SYNCBN_TIMEOUT   seconds a collective waits for the other ranks before every rank raises
#                    (default: torch's 30 minutes); read by syncbn.init_distributed
#   MAX_RESTARTS     restart all workers up to this many times after a failure (default 0);
#                    pair it with --checkpoint-dir DIR --resume in examples/train_resnet.py
# Rendezvous is --standalone: a store on a free port, so runs never collide; the workers reach it
# through localhost. (torch's TCPStore itself listens on every interface of that port; torch has no
# option to narrow it, so on a shared network keep high ports firewalled.)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
syncbn_require_script "$@"
NPROC=${NPROC:-$(syncbn_default_nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarted Gloo workers must not read a dead worker's address from torchrun's shared store
# ("Gloo connectFullMesh failed", pytorch/pytorch#135712): give each round its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" "$@"
