"""Show what synchronized BN changes: per-rank statistics vs the group's statistics.

Run with 2 CPU processes:
    bash launch/torchrun.sh examples/demo_sync_stats.py
or as plain `python examples/demo_sync_stats.py` (one process: local and synced agree).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.distributed as dist

import syncbn


__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-per-rank", type=int, default=2)
    parser.add_argument("--channels", type=int, default=3)
    args = parser.parse_args(argv)

    rank, world, _, _ = syncbn.init_distributed(device="cpu")

    torch.manual_seed(rank)
    # Each rank sees a shifted slice of the data, as happens with small, non-i.i.d. per-device batches.
    x = torch.randn(args.batch_per_rank, args.channels, 4, 4) + 2.0 * rank
    local = torch.nn.BatchNorm2d(args.channels)
    synced = syncbn.SyncBatchNorm(args.channels)
    local(x)
    synced(x)
    for name, bn in (("local BN ", local), ("SyncBN   ", synced)):
        line = f"rank {rank}/{world} {name} running_mean={bn.running_mean.tolist()}"
        print(line + "\n", end="", flush=True)  # one write, so the ranks' lines do not interleave
    if dist.is_initialized():
        dist.barrier()
        if rank == 0:
            print("SyncBN's running statistics are identical on every rank; local BN's are not.")
    syncbn.cleanup()


if __name__ == "__main__":
    main()
