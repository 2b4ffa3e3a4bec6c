"""The autograd Functions behind synchronized batch normalization.

:class:`SyncNormFunction` receives the group's statistics (already merged by the caller) and
normalizes; its backward all-reduces the two per-channel gradient sums and applies the
training-mode formula. On CUDA both go through torch's fused SyncBatchNorm kernels
(:mod:`syncbn._kernels`), elsewhere through the composed path (:mod:`syncbn.functional`).

Second-order gradients (``create_graph=True``: gradient penalties) take another route: the
backward recomputes the layer from its saved input with differentiable operations, the group's
sums going through :class:`AllReduceSum` (a differentiable all_reduce whose backward is again an
all_reduce), and returns ``torch.autograd.grad`` of that with ``create_graph=True``. So the
gradients it returns are themselves differentiable, across the group.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _kernels, comm
from . import _stats as ST
from . import functional as BF
from ._compat import is_compiling

__all__ = ["SyncNormFunction", "AllReduceSum"]


class AllReduceSum(torch.autograd.Function):
    """``sum over the ranks of group of t``, differentiable to any order (the gradient of a sum is the sum of the gradients)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Optional[comm.ProcessGroup]) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return comm.all_reduce_sum(t.detach().clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return AllReduceSum.apply(grad.contiguous(), ctx.group), None


class SyncNormFunction(torch.autograd.Function):
    """``y = weight * ((x - mean) * invstd * r + d) + bias`` with ``mean``/``invstd`` from the group.

    ``r`` and ``d`` are Batch Renormalization's corrections (constants for autograd); plain batch
    norm passes None for both (``r = 1``, ``d = 0``). Both, and a missing weight or bias, are folded
    into one per-channel ``scale`` and ``shift`` (:func:`syncbn.functional.fold_affine`), so every
    variant runs the same kernels. With ``mask``, padded positions give 0 and no gradient.

    Saved for backward: the input ``x`` itself (no copy, no float64 or normalized tensor; on CUDA a
    copy only when ``x`` is in none of the layouts the kernels take, as torch's own layer does),
    the mask if any, the weight and bias (for second-order gradients) and per-channel vectors:
    the saved bytes are the input's plus O(C).

    ``sync`` says whether the backward all-reduces: False for one process, and in eager steps
    where no rank's input needs a gradient (every rank knows it from the forward's statistics);
    compiled and captured steps always do. Then it runs exactly one all_reduce of ``2C + 1``
    values over ``group`` (float64; on the fused CUDA path in the statistics dtype, as torch's
    layer does, so that no cast runs around it), also on a rank whose batch is empty, so that ranks
    never wait on each other.
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
        counts: Optional[Tensor],
        group: Optional[comm.ProcessGroup],
        sync: bool,
        r: Optional[Tensor],
        d: Optional[Tensor],
        usable: Optional[Tensor],
        mask: Optional[Tensor],
        center: bool = False,
    ) -> Tensor:
        ctx.fused = _kernels.uses_fused_kernels(x) and mask is None
        ctx.center = center
        ctx.eps, ctx.count, ctx.counts, ctx.group, ctx.sync, ctx.usable = eps, count, counts, group, sync, usable
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else mean.dtype
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        if ctx.fused:
            x = _kernels.fused_layout(x)
            invstd = (var + eps).rsqrt_()
            # Plain batch norm passes weight and bias as they are (None for missing ones), as
            # torch's layer does; renorm folds r and d in (statistics dtype).
            scale, shift = _kernels.kernel_params(*BF.fold_affine(weight, bias, r, d), x)
            ctx.save_for_backward(x, mean, invstd, scale, r, d, mask, weight, bias)
            return _kernels.fused_normalize(x, mean, invstd, scale, shift)
        scale, shift = BF.fold_affine(weight, bias, r, d)
        ctx.save_for_backward(x, mean, var, scale, r, d, mask, weight, bias)
        return BF.normalize(x, mean, var, scale, shift, eps, mask)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, mean, spread, scale, r, d, mask, weight, bias = ctx.saved_tensors
        create_graph = torch.is_grad_enabled() and not is_compiling()
        with torch.no_grad():
            sums = _gradient_sums(ctx, grad_out, x, mean, spread, scale, mask, create_graph)
            if not create_graph:
                return _first_order(ctx, x, mean, spread, scale, r, d, mask, sums)
        return _second_order(ctx, grad_out, x, mean, spread, r, d, mask, weight, bias)


_flags: dict[tuple[bool, torch.device, torch.dtype], Tensor] = {}


def _flag(value: bool, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """A cached ``[1.0]`` or ``[0.0]`` of ``dtype`` on ``device`` (read only: torch.cat copies it)."""
    if is_compiling():
        # In a graph it is one node; filling the cache there would be a side effect that dynamo
        # refuses inside an autograd.Function (a fullgraph error when the compiled backward is
        # traced before any eager backward has filled it).
        return torch.full((1,), float(value), dtype=dtype, device=device)
    key = (value, device, dtype)
    flag = _flags.get(key)
    if flag is None:
        flag = _flags[key] = torch.tensor([float(value)], dtype=dtype, device=device)
    return flag


class _Sums(NamedTuple):
    grad_out: Tensor  # zero where padded
    x: Tensor  # the mean where padded
    invstd: Tensor
    sum_dy: Tensor  # local
    sum_dy_x: Tensor  # local
    group: Tensor  # the group's [sum_dy, sum_dy_x] (the local ones when not synchronized)
    # Fused path: the reduction kernel's sum(dy * xhat) and sum(dy) in the kernel weight's dtype.
    grad_weight: Optional[Tensor] = None
    grad_bias: Optional[Tensor] = None


def _gradient_sums(
    ctx: Any, grad_out: Tensor, x: Tensor, mean: Tensor, spread: Tensor, scale: Optional[Tensor],
    mask: Optional[Tensor], create_graph: bool,
) -> _Sums:
    """Local gradient sums, then (when synchronized) the group's, with the create_graph agreement."""
    c = mean.numel()
    if mask is not None:
        m = ST.expand_mask(mask, x.dim())
        grad_out = torch.where(m, grad_out, 0)
        x = torch.where(m, x, ST.channel_view(mean.to(x.dtype), x.dim()))  # xhat = 0 where padded
    kernel_grads: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
    if ctx.fused:
        invstd = spread
        grad_out = _kernels.fused_layout(grad_out, like=x)
        # sum_dy_x = sum(dy * (x - mean)), as the fused elementwise kernel takes it. The same pass
        # gives sum(dy * xhat) and sum(dy) in the weight's dtype, as torch's layer asks for them.
        need_w, need_b = ctx.needs_input_grad[1:3]
        sum_dy, sum_dy_x, *kernel_grads = _kernels.fused_grad_sums(
            grad_out, x, mean, invstd, scale, weight_g=need_w, bias_g=need_b
        )
    else:
        invstd = torch.rsqrt(spread + ctx.eps)
        # sum_dy_x = sum(dy * (x - mean)) * invstd: plain batch norm's grad_weight.
        sum_dy, sum_dy_x = BF.grad_sums(grad_out, x, mean, invstd)
    if ctx.sync is False:
        return _Sums(grad_out, x, invstd, sum_dy, sum_dy_x, torch.cat([sum_dy, sum_dy_x]), *kernel_grads)
    # One more value: how many ranks want second-order gradients. They all must, or none.
    if ctx.fused:
        # The kernel's own sums are float32 (float64 for float64 input): summing them over ranks in
        # float64 would add no accuracy, only a cast each way (and a cat of mixed dtypes, which is a
        # copy per input on CUDA). CUDA tensors never take the float64 shared-memory transport.
        local = torch.cat([sum_dy, sum_dy_x, _flag(create_graph, sum_dy.device, sum_dy.dtype)])
    else:
        local = torch.cat([sum_dy, sum_dy_x, _flag(create_graph, sum_dy.device)])  # float64 (promoted)
    reduced = comm.all_reduce_sum(local, ctx.group)
    # (The fused path is CUDA's: no host read there, also when its CPU emulation runs in tests.)
    if create_graph or (reduced.device.type == "cpu" and not ctx.fused and not is_compiling()):
        agree = int(reduced[-1].item())
        world = comm.group_size(ctx.group) if agree else 0
        if 0 < agree < world:
            raise ValueError(
                f"syncbn: expected every rank of the group to run this backward alike, got "
                f"{agree} of {world} ranks with create_graph=True (second-order gradients) and the "
                "others without; call backward/autograd.grad with the same create_graph on every rank"
            )
    return _Sums(grad_out, x, invstd, sum_dy, sum_dy_x, reduced[: 2 * c].to(mean.dtype), *kernel_grads)


def _first_order(
    ctx: Any, x: Tensor, mean: Tensor, spread: Tensor, scale: Optional[Tensor], r: Optional[Tensor],
    d: Optional[Tensor], mask: Optional[Tensor], sums: _Sums,
) -> tuple[Optional[Tensor], ...]:
    c = mean.numel()
    grad_out, x_filled, invstd, sum_dy, sum_dy_x, group_sums = sums[:6]
    if ctx.usable is not None:
        # A group below min_count normalized with the running statistics, constants for
        # autograd: the batch terms of the gradient vanish (every rank still reduced above).
        group_sums = group_sums * ctx.usable
    grad_x = grad_w = grad_b = None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    count = ctx.count
    if need_x and ctx.fused:
        # One int32 count per rank, as torch's layer passes them: the kernel adds them in int64,
        # so the group may hold more than 2**31 - 1 values per channel (the forward checks each
        # rank's count fits).
        if ctx.counts is not None:
            counts = ctx.counts
        else:
            counts = count.reshape(1) if isinstance(count, Tensor) else torch.tensor([count])
        counts = counts.to(device=x.device, dtype=torch.int32)
        # The non-channels-last kernel reads the weight in the statistics dtype (torch's layer
        # casts it the same way).
        w = scale if scale is None or scale.dtype == mean.dtype else scale.to(mean.dtype)
        grad_x = _kernels.fused_grad_input(
            grad_out, x_filled, mean, invstd, w, group_sums[:c], group_sums[c:], counts
        )
    elif need_x:
        means = group_sums / (count.clamp(min=1.0) if isinstance(count, Tensor) else max(count, 1))
        # Statistics with some |mean| > 4 std on some rank: center x first (the folded kernel
        # would cancel). The forward decided it.
        grad_x = BF.grad_input(
            grad_out, x_filled, mean, spread, ctx.eps, scale, means[:c], means[c:], ctx.center, invstd
        )
        if mask is not None:  # 0 where padded (finite there, as x was filled)
            grad_x.mul_(ST.expand_mask(mask, x.dim()).to(grad_x.dtype))
    if need_w:
        # Local contributions: DDP (or the user) sums/averages them over ranks like any weight grad.
        if sums.grad_weight is not None:
            sum_dy_xhat = sums.grad_weight  # from the fused reduction, no launch
        else:
            sum_dy_xhat = sum_dy_x * invstd if ctx.fused else sum_dy_x
        grad_w = sum_dy_xhat if r is None else sum_dy_xhat * r + d * sum_dy
        grad_w = grad_w.to(ctx.weight_dtype)
    if need_b:
        grad_b = (sum_dy if sums.grad_bias is None else sums.grad_bias).to(ctx.bias_dtype)
    return (grad_x, grad_w, grad_b) + (None,) * 13


def _second_order(
    ctx: Any, grad_out: Tensor, x: Tensor, mean: Tensor, spread: Tensor, r: Optional[Tensor],
    d: Optional[Tensor], mask: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    """Differentiable gradients: recompute the layer from ``x`` and differentiate it with create_graph.

    Every rank builds the same graph (its input is made a differentiable node even where it
    needs no gradient), so the all_reduces of the recomputation's backward pair up across ranks.
    """
    eps = ctx.eps
    sync = ctx.sync is not False
    stat = ST.stat_dtype(x.dtype)
    xs = x if x.requires_grad else x.detach().requires_grad_()
    with torch.enable_grad():
        xd = xs.to(stat)
        dims = ST.reduce_dims(x)
        m = None if mask is None else (mask.unsqueeze(1) if x.dim() > 1 else mask)
        if ctx.usable is not None and not bool(ctx.usable):
            mu, var = mean.detach(), (spread if not ctx.fused else spread.pow(-2) - eps).detach()
        else:
            count = float(ctx.count)
            s1 = (xd if m is None else torch.where(m, xd, 0)).sum(dims)
            mu = (AllReduceSum.apply(s1, ctx.group) if sync else s1) / count
            dev = xd - ST.channel_view(mu, x.dim())
            if m is not None:
                dev = torch.where(m, dev, 0)
            s2 = (dev * dev).sum(dims)
            var = (AllReduceSum.apply(s2, ctx.group) if sync else s2) / count
        xhat = (xd - ST.channel_view(mu, x.dim())) * ST.channel_view(torch.rsqrt(var + eps), x.dim())
        scale, shift = BF.fold_affine(weight, bias, r, d)
        y = xhat if scale is None else xhat * ST.channel_view(scale, x.dim())
        y = y if shift is None else y + ST.channel_view(shift, x.dim())
        if m is not None:
            y = torch.where(m, y, 0)
        y = y.to(x.dtype)
        want = [xs] + [p for p in (weight, bias) if p is not None and p.requires_grad]
        grads = list(torch.autograd.grad(y, want, grad_out, create_graph=True, allow_unused=True))
    grad_x = grads.pop(0) if ctx.needs_input_grad[0] else None
    grad_w = grads.pop(0) if weight is not None and weight.requires_grad else None
    grad_b = grads.pop(0) if bias is not None and bias.requires_grad else None
    if grad_x is None and ctx.needs_input_grad[0]:
        grad_x = torch.zeros_like(x)
    return (grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b if ctx.needs_input_grad[2] else None) + (None,) * 13
