"""Rank-side parity checks: a synced layer on each rank's slice vs torch BN on the group's whole batch.

These functions run inside the harness's worker processes (``fn(rank, world_size, ...)``). Every
rank draws the same full batch from the same seed, keeps its own slice, and compares against a
float64 ``nn.BatchNorm{1,2,3}d`` fed the concatenation: outputs, grad_input, the sum over ranks
of grad_weight / grad_bias, running statistics after every step, and eval outputs.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

import syncbn

__all__ = ["ref_bn_class", "assert_close", "tolerance", "group_slice", "check_parity"]

_TOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return _TOL[dtype]


def ref_bn_class(ndim: int) -> type:
    """torch's BatchNorm class for inputs of ``ndim`` dims."""
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Relative-to-scale closeness: ``max|a - e| <= tol * max(1, max|e|)``; NaN never passes."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a}"
    if a.numel() == 0:
        return
    err = (a - e).abs().max().item()
    scale = max(1.0, e.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def group_slice(rank: int, world_size: int, group_size: Optional[int]) -> tuple[int, int, int]:
    """(group id, rank within group, group size) for consecutive groups of ``group_size``."""
    size = group_size or world_size
    return rank // size, rank % size, size


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    t = t.detach().clone().to(torch.float64)
    dist.all_reduce(t, group=group)
    return t


def check_parity(
    rank: int,
    world_size: int,
    *,
    features: Sequence[int] = (4, 5, 5),
    sizes: Optional[Sequence[int]] = None,
    steps: int = 3,
    dtype: str = "float64",
    affine: bool = True,
    momentum: Optional[float] = 0.1,
    track_running_stats: bool = True,
    channels_last: bool = False,
    offset: float = 0.0,
    scale: float = 1.0,
    group_size: Optional[int] = None,
    make_layer: Optional[Callable[..., nn.Module]] = None,
    seed: int = 0,
) -> dict:
    """Train ``steps`` steps of a SyncBatchNorm on this rank's slice and check it against torch BN.

    ``sizes`` gives the batch size of each rank of the (sub)group; default 3 each. With
    ``group_size`` the world is split by :func:`syncbn.new_sync_groups` and each group gets its own
    data. Returns this rank's final running statistics (to check they are identical across ranks).
    """
    dt = getattr(torch, dtype)
    group = syncbn.new_sync_groups(group_size) if group_size else None
    gid, grank, gsize = group_slice(rank, world_size, group_size)
    sizes = list(sizes) if sizes is not None else [3] * gsize
    assert len(sizes) == gsize, f"need one batch size per rank of the group, got {sizes}"
    lo, hi = sum(sizes[:grank]), sum(sizes[: grank + 1])
    c = features[0]
    ndim = len(features) + 1

    gen = torch.Generator().manual_seed(seed + 1000 * gid)
    ref = ref_bn_class(ndim)(
        c, momentum=momentum, affine=affine, track_running_stats=track_running_stats, dtype=torch.float64
    )
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    module_dtype = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    make = make_layer or syncbn.SyncBatchNorm
    dut = make(c, momentum=momentum, affine=affine, track_running_stats=track_running_stats, process_group=group)
    dut = dut.to(module_dtype)
    dut.load_state_dict(ref.state_dict())
    memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)
    tol = tolerance(dt)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        full = torch.randn(sum(sizes), *features, generator=gen, dtype=torch.float64) * scale + offset
        full = full.to(dt).to(torch.float64)  # the reference sees exactly the values the layer sees
        local = full[lo:hi].to(dt)
        if channels_last:
            local = local.contiguous(memory_format=memory_format)
        return full, local

    for step in range(steps):
        full, local = batch()
        full.requires_grad_()
        local.requires_grad_()
        y = dut(local)
        y_ref = ref(full)
        assert y.dtype == dt, f"output dtype {y.dtype} != input dtype {dt}"
        if channels_last:
            assert y.is_contiguous(memory_format=memory_format), "channels_last not kept"
        assert_close(y, y_ref[lo:hi], tol, f"step {step} output")
        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
        y.backward(grad[lo:hi].to(dt))
        y_ref.backward(grad)
        assert_close(local.grad, full.grad[lo:hi], tol, f"step {step} grad_input")
        if affine:
            assert_close(_all_reduce(dut.weight.grad, group), ref.weight.grad, tol, f"step {step} grad_weight")
            assert_close(_all_reduce(dut.bias.grad, group), ref.bias.grad, tol, f"step {step} grad_bias")
            dut.zero_grad()
            ref.zero_grad()
        if track_running_stats:
            assert_close(dut.running_mean, ref.running_mean, tol, f"step {step} running_mean")
            assert_close(dut.running_var, ref.running_var, tol, f"step {step} running_var")
            assert int(dut.num_batches_tracked) == int(ref.num_batches_tracked)

    dut.eval()
    ref.eval()
    full, local = batch()
    with torch.no_grad():
        if track_running_stats:
            assert_close(dut(local), ref(full)[lo:hi], tol, "eval output")
        elif hi > lo:
            # Without running statistics eval normalizes each rank's own batch, like nn.BatchNorm.
            assert_close(dut(local), ref(full[lo:hi]), tol, "eval output (local batch statistics)")
    if not track_running_stats:
        return {}
    return {"running_mean": dut.running_mean.clone(), "running_var": dut.running_var.clone(), "group": gid}
