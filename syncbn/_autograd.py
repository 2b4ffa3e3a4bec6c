"""The autograd Function behind synchronized batch normalization.

The forward receives the group's statistics (already all-reduced by the caller) and normalizes;
the backward all-reduces the two per-channel gradient sums and applies the training-mode formula.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import comm
from . import functional as BF

__all__ = ["SyncNormFunction"]


class SyncNormFunction(torch.autograd.Function):
    """``y = weight * ((x - mean) * invstd * r + d) + bias`` with ``mean``/``invstd`` from the group.

    ``r`` and ``d`` are Batch Renormalization's corrections (constants for autograd); plain batch
    norm passes None for both (``r = 1``, ``d = 0``).

    Saved for backward: the input ``x`` itself (no copy, no float64 or normalized tensor) and
    per-channel vectors (weight, mean, var, r, d): the saved bytes are the input's plus O(C).

    With ``sync`` the backward always runs exactly one all_reduce of the ``2C`` float64 gradient
    sums over ``group``, also on a rank whose batch is empty, so that ranks never wait on each
    other; without it, it communicates nothing.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        mean: Tensor,
        var: Tensor,
        eps: float,
        count: int,
        group: Optional[comm.ProcessGroup],
        sync: bool,
        r: Optional[Tensor],
        d: Optional[Tensor],
    ) -> Tensor:
        scale, shift = weight, bias
        if r is not None:
            scale = r if weight is None else weight * r
            wd = d if weight is None else weight * d
            shift = wd if bias is None else bias + wd
        ctx.save_for_backward(x, weight, mean, var, r, d)
        ctx.eps, ctx.count, ctx.group, ctx.sync = eps, count, group, sync
        ctx.bias_dtype = bias.dtype if bias is not None else mean.dtype
        return BF.normalize(x, mean, var, scale, shift, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight, mean, var, r, d = ctx.saved_tensors
        c = mean.numel()
        # sum_dy_xhat = sum(dy * (x - mean)) * invstd: plain batch norm's grad_weight.
        sum_dy, sum_dy_xhat = BF.grad_sums(grad_out, x, mean, var, ctx.eps)
        if ctx.sync:
            packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            means = comm.all_reduce_sum(packed, ctx.group).div_(ctx.count).to(mean.dtype)
        else:
            means = torch.cat([sum_dy, sum_dy_xhat]).div_(ctx.count)

        grad_x = grad_w = grad_b = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if need_x:
            scale = weight if r is None else (r if weight is None else weight * r)
            grad_x = BF.grad_input(grad_out, x, mean, var, ctx.eps, scale, means[:c], means[c:])
        if need_w:
            # Local contributions: DDP (or the user) sums/averages them over ranks like any weight grad.
            grad_w = sum_dy_xhat if r is None else sum_dy_xhat * r + d * sum_dy
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None
