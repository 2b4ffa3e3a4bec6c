"""Started by tests/test_distributed.py through the launch scripts: joins the group the launcher
made, proves it works with one all_reduce, and prints what init_distributed saw."""

import os

import torch
import torch.distributed as dist

import syncbn

info = syncbn.init_distributed()
total = torch.tensor([float(info.rank)])
if info.is_distributed:
    dist.all_reduce(total)
line = (
    f"probe rank={info.rank} world_size={info.world_size} local_rank={info.local_rank} "
    f"backend={info.backend} device={info.device} rank_sum={int(total.item())}\n"
)
os.write(1, line.encode())  # one write: lines of concurrent ranks do not interleave
syncbn.cleanup()
