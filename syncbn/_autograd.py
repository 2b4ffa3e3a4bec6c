"""The autograd Function behind synchronized batch normalization.

The forward receives the group's statistics (already all-reduced by the caller) and normalizes;
the backward all-reduces the two per-channel gradient sums and applies the training-mode formula.
On CUDA both go through torch's fused SyncBatchNorm kernels, elsewhere through the composed path
(see :mod:`syncbn.functional`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import comm
from . import functional as BF

__all__ = ["SyncNormFunction"]


class SyncNormFunction(torch.autograd.Function):
    """``y = weight * ((x - mean) * invstd * r + d) + bias`` with ``mean``/``invstd`` from the group.

    ``r`` and ``d`` are Batch Renormalization's corrections (constants for autograd); plain batch
    norm passes None for both (``r = 1``, ``d = 0``). Both, and a missing weight or bias, are folded
    into one per-channel ``scale`` and ``shift`` (:func:`syncbn.functional.fold_affine`), so every
    variant runs the same kernels.

    Saved for backward: the input ``x`` itself (no copy, no float64 or normalized tensor; on CUDA a
    copy only when ``x`` is in none of the layouts the kernels take, as torch's own layer does) and
    per-channel vectors (mean, var or invstd, scale, r, d): the saved bytes are the input's plus O(C).

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
        count: Union[int, Tensor],
        group: Optional[comm.ProcessGroup],
        sync: bool,
        r: Optional[Tensor],
        d: Optional[Tensor],
        usable: Optional[Tensor] = None,
    ) -> Tensor:
        ctx.fused = BF.uses_fused_kernels(x)
        ctx.eps, ctx.count, ctx.group, ctx.sync, ctx.usable = eps, count, group, sync, usable
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else mean.dtype
        if ctx.fused:
            x = BF.fused_layout(x)
            invstd = torch.rsqrt(var + eps)
            scale, shift = BF.fold_affine(weight, bias, r, d, like=mean)
            ctx.save_for_backward(x, mean, invstd, scale, r, d)
            return BF.fused_normalize(x, mean, invstd, scale, shift)
        scale, shift = BF.fold_affine(weight, bias, r, d)
        ctx.save_for_backward(x, mean, var, scale, r, d)
        return BF.normalize(x, mean, var, scale, shift, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        x, mean, spread, scale, r, d = ctx.saved_tensors
        c = mean.numel()
        if ctx.fused:
            invstd = spread
            grad_out = BF.fused_layout(grad_out, like=x)
            # sum_dy_x = sum(dy * (x - mean)), as the fused elementwise kernel takes it.
            sum_dy, sum_dy_x = BF.fused_grad_sums(grad_out, x, mean, invstd, scale)
        else:
            var = spread
            invstd = torch.rsqrt(var + ctx.eps)
            # sum_dy_x = sum(dy * (x - mean)) * invstd: plain batch norm's grad_weight.
            sum_dy, sum_dy_x = BF.grad_sums(grad_out, x, mean, invstd)
        local = torch.cat([sum_dy, sum_dy_x])
        if ctx.sync:
            group_sums = comm.all_reduce_sum(local.to(torch.float64), ctx.group).to(mean.dtype)
        else:
            group_sums = local
        if ctx.usable is not None:
            # A group below min_count normalized with the running statistics, constants for
            # autograd: the batch terms of the gradient vanish (every rank still reduced above).
            group_sums = group_sums * ctx.usable

        grad_x = grad_w = grad_b = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        count = ctx.count
        if need_x and ctx.fused:
            if isinstance(count, Tensor):
                count = count.to(torch.int32).reshape(1)  # stays on the device: no host read
            else:
                count = torch.full((1,), count, dtype=torch.int32, device=x.device)
            grad_x = BF.fused_grad_input(
                grad_out, x, mean, invstd, scale, group_sums[:c], group_sums[c:], count
            )
        elif need_x:
            means = group_sums / (count.clamp(min=1.0) if isinstance(count, Tensor) else max(count, 1))
            grad_x = BF.grad_input(grad_out, x, mean, var, ctx.eps, scale, means[:c], means[c:])
        if need_w:
            # Local contributions: DDP (or the user) sums/averages them over ranks like any weight grad.
            sum_dy_xhat = sum_dy_x * invstd if ctx.fused else sum_dy_x
            grad_w = sum_dy_xhat if r is None else sum_dy_xhat * r + d * sum_dy
            grad_w = grad_w.to(ctx.weight_dtype)
        if need_b:
            grad_b = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None
