"""The PyTorch features people combine SyncBatchNorm with, each against single-process torch BN.

Activation checkpointing, DistributedDataParallel options, autocast, torch.compile, checkpoints
(state_dict round trips) and determinism. Distributed cases run on the harness's Gloo pool with
the layers (and DDP) on a sub-group with a short timeout, so a regression fails in seconds. The
reference is always an unconverted copy of the same model (torch BatchNorm2d) fed the
concatenation of every rank's batch, in float64.
"""

from __future__ import annotations

import ast
import copy
import datetime
import io
import os
import pathlib
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import syncbn

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-9  # float64
PER_RANK = 3
# torch.compile backend for the compile tests: "aot_eager" runs Dynamo and AOTAutograd (where an
# autograd.Function or a collective would fail to trace) in seconds; inductor adds ~40 s of C++
# compilation per process on CPU. SYNCBN_TEST_COMPILE_BACKEND=inductor runs the full stack.
COMPILE_BACKEND = os.environ.get("SYNCBN_TEST_COMPILE_BACKEND", "aot_eager")


def _group(world_size: int, seconds: float = 20.0):
    """A fresh group of all ranks with a short timeout; None (no communication) for one process."""
    if world_size == 1 or not dist.is_initialized():
        return None
    return dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=seconds))


class _Net(nn.Module):
    """conv - BN - ReLU - conv - BN - ReLU - pool - linear; ``block`` is the checkpointable middle."""

    def __init__(self, checkpointing: Optional[str] = None, unused: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(
            nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.unused = nn.Linear(2, 2) if unused else None
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.checkpointing is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.checkpointing == "reentrant")
        return self.head(h)


def _models(seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(reference with torch BN, float64) and a converted deep copy with the same weights."""
    torch.manual_seed(seed)
    ref = _Net(**kwargs).double()
    return ref, copy.deepcopy(ref)


def _batches(rank: int, world_size: int, steps: int, seed: int = 1):
    """(full batch, this rank's slice) per step, the same full batches on every rank."""
    gen = torch.Generator().manual_seed(seed)
    n = PER_RANK
    for _ in range(steps):
        full = torch.randn(n * world_size, 3, 6, 6, generator=gen, dtype=torch.float64)
        yield full, full[rank * n : (rank + 1) * n]


def _loss(y: torch.Tensor, total: int) -> torch.Tensor:
    # Summed over ranks, the local losses are the full batch's mean: grads add up to the reference's.
    return y.square().sum() / total


def _compare_state(dut: nn.Module, ref: nn.Module, what: str, tol: float = TOL) -> None:
    ref_state = ref.state_dict()
    for key, value in dut.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(ref_state[key]), f"{what}: {key} {int(value)} != {int(ref_state[key])}"
        else:
            assert_close(value, ref_state[key], tol, f"{what}: {key}")


def _sum_grads(model: nn.Module, group) -> None:
    if group is None:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


# ------------------------------------------------------------------------------------------------
# Activation checkpointing


def _checkpoint_rank(rank, world_size, mode, steps=3):
    group = _group(world_size)
    ref, dut = _models(checkpointing=mode)
    ref.checkpointing = None
    dut = syncbn.convert_sync_bn(dut, process_group=group)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(dut.parameters(), lr=0.1)
    for step, (full, local) in enumerate(_batches(rank, world_size, steps)):
        y = dut(local)
        y_ref = ref(full)
        assert_close(y, y_ref[rank * PER_RANK : (rank + 1) * PER_RANK], TOL, f"step {step} output")
        _loss(y, len(full)).backward()
        _loss(y_ref, len(full)).backward()
        _sum_grads(dut, group)
        for (name, p), q in zip(dut.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, TOL, f"step {step} grad of {name}")
        # Running statistics once per step: the recomputation in backward must not update them.
        _compare_state(dut, ref, f"step {step} after backward")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    _compare_state(dut, ref, "end")


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_single_process(mode):
    _checkpoint_rank(0, 1, mode)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_two_ranks(mode):
    run_on_ranks(2, _checkpoint_rank, mode)
