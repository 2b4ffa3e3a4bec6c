"""The communication layer: the shared-memory all_reduce against Gloo's, its failure modes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import syncbn
from syncbn import comm

from .harness import run_on_ranks


def _channel(group):
    entry = comm._channels.get(id(comm._resolve(group)))
    return None if entry is None else entry[1]


def _my_files():
    """Mapping files this process created (their names hold the creator's pid)."""
    return [f for f in os.listdir("/dev/shm") if f.startswith("syncbn-") and f"-{os.getpid()}-" in f]


def _shm_matches_gloo(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    gen = torch.Generator().manual_seed(rank)
    # Growing sizes force the channel to be rebuilt (collectively) with a larger capacity.
    for n in (9, 4097, 40000, 17, 100000):
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        via_shm = comm.all_reduce_sum(x.clone(), group)
        comm.set_shared_memory(False)
        try:
            via_gloo = comm.all_reduce_sum(x.clone(), group)
        finally:
            comm.set_shared_memory(True)
        torch.testing.assert_close(via_shm, via_gloo, rtol=1e-14, atol=1e-12)
        channel = _channel(group)
        assert channel is not None and channel.capacity >= n, "the shared-memory path was not used"
    # The mapping's file is unlinked as soon as every rank has mapped it: nothing left behind.
    assert not _my_files(), _my_files()
    # Non-float64 or non-contiguous tensors go through Gloo, with the same result.
    y = torch.arange(6, dtype=torch.float32)
    assert torch.equal(comm.all_reduce_sum(y, group), torch.arange(6, dtype=torch.float32) * world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_memory_all_reduce_matches_gloo(world_size):
    run_on_ranks(world_size, _shm_matches_gloo)


def _size_mismatch(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    comm.all_reduce_sum(torch.ones(5, dtype=torch.float64), group)  # build the channel
    with pytest.raises(ValueError, match=r"different sizes \[5, 6\]"):
        comm.all_reduce_sum(torch.ones(5 + rank, dtype=torch.float64), group)
    # Every rank saw the same sizes, so the channel is still in step: the next call is correct.
    out = comm.all_reduce_sum(torch.full((3,), float(rank + 1), dtype=torch.float64), group)
    assert torch.equal(out, torch.full((3,), 3.0, dtype=torch.float64))


def test_shared_memory_size_mismatch_raises_on_every_rank():
    run_on_ranks(2, _size_mismatch)


def _layer_parity_without_shm(rank, world_size):
    from .parity import check_parity

    comm.set_shared_memory(False)
    try:
        return check_parity(rank, world_size, sizes=[2, 0, 3])
    finally:
        comm.set_shared_memory(True)


def test_gloo_path_still_matches_torch():
    """SYNCBN_SHM=0 (or set_shared_memory(False)) keeps everything on torch.distributed."""
    run_on_ranks(3, _layer_parity_without_shm)
    assert syncbn.comm.shared_memory_enabled()


def _creation_without_peer(rank, world_size):
    import datetime

    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        # Rank 1 never joins: building the channel fails with the group's timeout...
        with pytest.raises(RuntimeError, match="peer rank crashed, exited or skipped"):
            comm.all_reduce_sum(torch.ones(4, dtype=torch.float64), group)
        # ...and the file rank 0 had created for the mapping is gone all the same.
        assert not _my_files(), _my_files()
    dist.barrier()


def test_failed_channel_setup_leaves_no_file():
    run_on_ranks(2, _creation_without_peer, timeout=60)
