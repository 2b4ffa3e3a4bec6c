#!/usr/bin/env bash
# Run a training script on several machines: start this once on every node.
#
# Usage (node 0 is the one at MASTER_ADDR; run the same line on each node with its NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh examples/train_resnet.py
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh examples/train_resnet.py
#   (add LOCAL_ADDR=<this node's address> when the nodes cannot resolve each other's host names,
#   and SYNCBN_TIMEOUT=60 to fail within a minute instead of 30 when a node or link is lost)
# Environment:
#   NNODES       number of machines (required)
#   NODE_RANK    this machine's index, 0..NNODES-1 (required); node 0 hosts the rendezvous store
#                (global ranks are then assigned by the rendezvous, not by NODE_RANK)
#   MASTER_ADDR  address of node 0 that the other nodes can reach (required; no default, so
#                nothing guesses an interface for you)
#   MASTER_PORT  rendezvous port on node 0 (default 29500)
#   LOCAL_ADDR   this node's own address, as the other nodes reach it (torchrun --local-addr;
#                default: torchrun uses this node's host name, so every node must resolve every
#                other node's host name, or workers loop on "gai error: -3"). On node 0 it is
#                usually MASTER_ADDR.
#   SYNCBN_TIMEOUT  seconds a collective (and syncbn's shared-memory exchange) waits for the other
#                ranks before every rank raises (default: torch's 30 minutes); read by
#                syncbn.init_distributed in every worker. With a link down or a node frozen,
#                this is how long the surviving ranks wait.
#   NPROC        processes per node (default: number of visible GPUs, or 2 without a GPU)
#   RDZV_ID      job id shared by all nodes (default syncbn-$MASTER_PORT)
#   RDZV_READ_TIMEOUT  seconds a launcher waits on a store operation at node 0 (torch's default
#                60); a node cut off from node 0 exits after about this long once its workers
#                have failed
#   PYTHON       interpreter (default: .venv/bin/python from scripts/setup_env.sh, else python3)
#   MAX_RESTARTS restart all workers up to this many times after a failure (default 0)
#   STUCK_AFTER  seconds after which torchrun is stopped once all its workers have exited and it
#                has not reaped them (default 10): it then hangs on an unreachable node 0
# Uses torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT. torch's rendezvous store on node 0
# listens on every interface of that port (torch offers no bind address): keep the port firewalled
# to the cluster network. For Gloo across machines set GLOO_SOCKET_IFNAME (e.g. eth0), for NCCL
# NCCL_SOCKET_IFNAME, when the default interface is the wrong one.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
syncbn_require_script "$@"
: "${NNODES:?expected NNODES (number of machines), e.g. NNODES=2}"
: "${NODE_RANK:?expected NODE_RANK (index of this machine, 0..NNODES-1)}"
: "${MASTER_ADDR:?expected MASTER_ADDR (address of node 0 reachable from every node)}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$(syncbn_default_nproc)}
RDZV_ID=${RDZV_ID:-syncbn-$MASTER_PORT}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "multinode.sh: expected NNODES >= 1 and 0 <= NODE_RANK < NNODES, got NNODES=$NNODES NODE_RANK=$NODE_RANK" >&2
  exit 2
fi
# Node 0 hosts the store: say so instead of letting torch guess from host names.
if [ "$NODE_RANK" -eq 0 ]; then IS_HOST=true; else IS_HOST=false; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Restarted Gloo workers must not read a dead worker's address from torchrun's shared store
# ("Gloo connectFullMesh failed", pytorch/pytorch#135712): give each round its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_READ_TIMEOUT=${RDZV_READ_TIMEOUT:-60}
LOCAL_ADDR_ARGS=()
if [ -n "${LOCAL_ADDR:-}" ]; then LOCAL_ADDR_ARGS=(--local-addr="$LOCAL_ADDR"); fi
if [ -n "${SYNCBN_TIMEOUT:-}" ]; then export SYNCBN_TIMEOUT; fi
# Children of process $1 as "STATE" words (Z for an exited, unreaped one), read from /proc.
syncbn_child_states() {
  local f line rest
  for f in /proc/[0-9]*/stat; do
    read -r line < "$f" 2>/dev/null || continue
    rest=${line##*) }  # fields after "pid (comm) "
    set -- $rest
    if [ "${2:-}" = "$AGENT" ]; then echo "$1"; fi
  done
}

# torchrun's agent can hang for ~15 minutes when node 0 becomes unreachable: after a store read
# times out it waits, without a timeout, for the store to acknowledge (TCP retransmissions), and
# meanwhile never reaps its failed workers. Seen from here: every child is a zombie. Stop it then.
syncbn_watch_agent() {
  local since="" states
  while kill -0 "$AGENT" 2>/dev/null; do
    states=$(syncbn_child_states)
    if [ -n "$states" ] && ! grep -qv '^Z$' <<<"$states"; then
      since=${since:-$SECONDS}
      if [ $((SECONDS - since)) -ge "$STUCK_AFTER" ]; then
        echo "multinode.sh: every worker on this node has exited but torchrun has not for ${STUCK_AFTER} s (node 0 at $MASTER_ADDR unreachable?); stopping it" >&2
        kill -TERM "$AGENT" 2>/dev/null; sleep 3; kill -KILL "$AGENT" 2>/dev/null
        return
      fi
    else
      since=""
    fi
    sleep 1
  done
}

STUCK_AFTER=${STUCK_AFTER:-10}
"$PYTHON" -m torch.distributed.run "${LOCAL_ADDR_ARGS[@]}" \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  --rdzv-conf="is_host=$IS_HOST,read_timeout=$RDZV_READ_TIMEOUT" \
  "$@" &
AGENT=$!
trap 'kill -TERM "$AGENT" 2>/dev/null' TERM INT HUP
syncbn_watch_agent &
WATCHER=$!
# wait returns early when a trapped signal arrives: wait again until the agent is gone.
rc=0
wait "$AGENT" || rc=$?
while kill -0 "$AGENT" 2>/dev/null; do
  rc=0
  wait "$AGENT" || rc=$?
done
kill "$WATCHER" 2>/dev/null || true
exit "$rc"
