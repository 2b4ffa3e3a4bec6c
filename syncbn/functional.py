"""Pure per-channel batch-normalization math: normalize, running averages, Batch Renorm, the backward's sums.

Nothing here talks to other processes; the statistics a rank sends and their merge are in
:mod:`syncbn._stats`, the CUDA kernels in :mod:`syncbn._kernels`.

Conventions: ``x`` has shape ``(N, C, *)``; per-channel vectors have shape ``(C,)``.
"""

from __future__ import annotations

import math

from typing import Optional, Union

import torch
from torch import Tensor

from . import _compat
from ._compat import is_compiling
from ._stats import HALF_DTYPES, channel_view, expand_mask, reduce_dims

__all__ = [
    "exponential_average_factor",
    "update_running_stats",
    "normalize",
    "renorm_factors",
    "snapshot",
    "fold_affine",
    "empty_sums",
    "grad_sums",
    "grad_input",
]


def exponential_average_factor(
    momentum: Optional[float], num_batches_tracked: Optional[Tensor], debias: bool = False
) -> Union[float, Tensor]:
    """The running-average weight of this step, given the already incremented step counter.

    ``momentum=None`` gives the cumulative average ``1 / t`` as torch does (0 without a counter,
    as torch's layers use then). With ``debias`` the rate is ``m / (1 - (1 - m)**t)``, which makes
    the buffers equal the bias-corrected average ``r_t / (1 - (1 - m)**t)`` of a zero-initialised
    EMA ``r_t`` (at ``m = 0`` its limit, ``1 / t``). Those come back as 0-dim float64 tensors on the counter's device (no host read; the
    same float64 arithmetic as on the host); a fixed momentum comes back as the float itself.
    """
    if num_batches_tracked is None:
        return 0.0 if momentum is None else momentum
    if momentum is not None and not debias:
        return momentum
    t = num_batches_tracked.to(torch.float64)
    if momentum is None or momentum == 0.0:
        # momentum -> 0 of the debiased rate is 1 / t as well (the cumulative average).
        return t.reciprocal()
    if 0.0 < momentum < 1.0:
        # 1 - (1 - m)**t as -expm1(t * log1p(-m)): no cancellation for small m.
        return momentum / -torch.expm1(t * math.log1p(-momentum))
    return momentum / (1.0 - torch.pow(1.0 - momentum, t))


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Union[int, Tensor],
    factor: Union[float, Tensor],
    round_once: bool = True,
) -> None:
    """``running = (1 - factor) * running + factor * batch`` in place, with the unbiased variance.

    float16 and bfloat16 buffers on CPU are updated as torch's CPU kernel does, in double and
    rounded once (``round_once=False`` keeps the in-place update, as on the fused CUDA path).

    With a Python ``count`` it must be at least 2 (the unbiased variance divides by
    ``count - 1``). A tensor ``count`` (and ``factor``) needs no host read; where it is below 2 the
    Bessel ratio is kept finite, and the caller passes ``factor = 0``, which leaves the buffers
    exactly as they were.
    """
    with torch.no_grad():
        if isinstance(count, Tensor):
            bessel = count / (count.clamp(min=2.0) - 1.0)
        else:
            bessel = count / (count - 1)
        # torch's order (Normalization.cpp's update): (1 - m) * running + m * batch. lerp_ would
        # compute running + m * (batch - running), NaN where running is infinite.
        half = running_mean.dtype in HALF_DTYPES or running_var.dtype in HALF_DTYPES
        if round_once and half and running_mean.device.type == "cpu":
            # Half buffers, as torch's CPU kernel updates them: in double, rounded once (in place,
            # the two roundings cost a bfloat16 buffer a unit in its last place, which an eval
            # output at large |mean|/std shows; for float32 buffers a float32 unit).
            f64 = factor.to(torch.float64) if isinstance(factor, Tensor) else factor
            for buf, batch64 in ((running_mean, mean.to(torch.float64)), (running_var, var.to(torch.float64) * bessel)):
                buf.copy_(buf.to(torch.float64) * (1 - f64) + batch64 * f64)
            return
        if isinstance(factor, Tensor):
            factor = factor.to(running_mean.dtype)
            keep = 1 - factor
            running_mean.mul_(keep).addcmul_(mean.to(running_mean.dtype), factor)
            running_var.mul_(keep).addcmul_(var.to(running_var.dtype) * bessel, factor)
            return
        # A Python factor: the batch statistics (float64 from the merge) are added in the
        # promoted dtype and rounded once into the buffer, two operators per buffer.
        keep = 1 - factor
        running_mean.mul_(keep).add_(mean, alpha=factor)
        if isinstance(bessel, Tensor):
            running_var.mul_(keep).add_(var * bessel, alpha=factor)
        else:
            running_var.mul_(keep).add_(var, alpha=factor * bessel)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, with torch's fused kernel.

    Output has the dtype and memory format of ``x``; with ``mask``, 0 where the mask is False
    (whatever ``x`` holds there, NaN included). Differentiable in ``x``, ``weight`` and ``bias``
    with ``mean`` and ``var`` held constant (the eval-mode gradient).
    """
    if weight is not None and weight.dtype != mean.dtype and weight.dtype == x.dtype:
        # Half parameters with a half input (a model cast with .half()): the kernel takes float32
        # statistics with float32 parameters only, and computes in float32 either way.
        weight = weight.to(mean.dtype)
    if bias is not None and bias.dtype != mean.dtype and bias.dtype == x.dtype:
        bias = bias.to(mean.dtype)
    if mask is None:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    m = expand_mask(mask, x.dim())
    out = torch.batch_norm(torch.where(m, x, 0), weight, bias, mean, var, False, 0.0, eps, False)
    return out * m.to(out.dtype)


def renorm_factors(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: Union[float, Tensor],
    d_max: Union[float, Tensor],
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``r`` and ``d`` (Ioffe 2017), both free of autograd history.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma_B = sqrt(var + eps)`` from the batch and ``sigma = sqrt(running_var + eps)``. The
    limits may be 0-dim tensors (a schedule stepped on the device).
    """
    # Every input is free of autograd history (batch statistics, buffers), so no no_grad region is
    # needed (inside one, torch.compile recomputes r and d in the backward, see snapshot).
    mean, var = mean.detach(), var.detach()
    rm = snapshot(running_mean).to(mean.dtype)
    sigma = (snapshot(running_var).to(var.dtype) + eps).sqrt()
    r = (var + eps).sqrt() / sigma
    d = (mean - rm) / sigma
    if isinstance(r_max, Tensor):
        # float64 limits, rounded to the statistics dtype only at the end, as Python floats are.
        r_lo, r_hi = (1.0 / r_max).to(r.dtype), r_max.to(r.dtype)
        d_hi = torch.as_tensor(d_max, dtype=torch.float64, device=d.device)
        d_lo, d_hi = (-d_hi).to(d.dtype), d_hi.to(d.dtype)
        return torch.minimum(torch.maximum(r, r_lo), r_hi), torch.minimum(torch.maximum(d, d_lo), d_hi)
    return r.clamp_(1.0 / r_max, r_max), d.clamp_(-d_max, d_max)


if _compat.HAS_CUSTOM_OP:

    @torch.library.custom_op("syncbn::snapshot", mutates_args=())
    def _snapshot_op(t: Tensor) -> Tensor:
        return t.clone()

    @_snapshot_op.register_fake
    def _(t: Tensor) -> Tensor:
        return torch.empty_like(t)


def snapshot(t: Tensor) -> Tensor:
    """``t``'s values at this point of the forward, also for a compiled backward.

    A compiled graph's partitioner may recompute cheap values in the backward from the graph's
    inputs instead of saving them; for a buffer that the same forward then updates in place
    (running statistics, the step counter), that reads the updated values: Batch Renorm's r and d,
    and the schedule's limits, would be wrong in the gradient. A custom
    operator is never recomputed, so its output is saved. Eagerly it is ``t`` itself.
    """
    if is_compiling() and _compat.HAS_CUSTOM_OP:
        return _snapshot_op(t)
    return t.detach()


def fold_affine(
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    r: Optional[Tensor],
    d: Optional[Tensor],
    like: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The per-channel ``(scale, shift)`` of ``weight * (xhat * r + d) + bias``.

    ``scale = weight * r`` and ``shift = weight * d + bias``, with a missing ``weight``/``r`` taken as
    1 and a missing ``bias``/``d`` as 0; plain batch norm (``r``, ``d`` None) returns ``(weight,
    bias)`` themselves. With ``like`` (a statistics vector), both come back as tensors of its dtype,
    ones and zeros standing in for missing ones, as the fused kernels want them.
    """
    scale, shift = weight, bias
    if r is not None:
        scale = r if weight is None else weight * r
        wd = d if weight is None else weight * d
        shift = wd if bias is None else bias + wd
    if like is not None:
        scale = torch.ones_like(like) if scale is None else scale.to(like.dtype)
        shift = torch.zeros_like(like) if shift is None else shift.to(like.dtype)
    return scale, shift


def empty_sums(grad_out: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero gradient sums for an empty batch, computed *from* ``grad_out``.

    Under torch.compile the backward's all_reduce must stay in the backward graph: sums that did not
    depend on the incoming gradient would let the graph partitioner run that collective during
    the forward on this rank alone, while its peers wait in their backward.
    """
    zeros = grad_out.sum(reduce_dims(grad_out)).to(dtype)
    return zeros, zeros.clone()


def _dense(t: Tensor) -> bool:
    """Contiguous in torch's default or channels-last layout (the layouts the fused kernels read)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` over the local batch.

    One fused pass: torch's training-mode batch-norm backward given the batch's ``mean`` and
    ``invstd`` (the contract autograd uses for ``F.batch_norm`` on every device), whose grad_bias and
    grad_weight are exactly these sums. An empty batch gives zeros. For a masked batch, pass
    ``grad_out`` zero at padded positions and ``x`` equal to ``mean`` there.
    """
    if x.numel() == 0:
        return empty_sums(grad_out, mean.dtype)
    if x.dtype in HALF_DTYPES and not (_dense(x) and _dense(grad_out)):
        # On a strided half input torch's CPU kernel accumulates sum(dy) in the input's precision
        # (a bfloat16 ulp of the local sum); its contiguous and channels-last kernels in float32.
        x, grad_out = x.contiguous(), grad_out.contiguous()
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, None, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    scale: Optional[Tensor],
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
    center: bool = False,
    invstd: Optional[Tensor] = None,
) -> Tensor:
    """Training-mode batch-norm input gradient from the group's gradient means.

    With ``xhat = (x - mean) * invstd`` and ``a = scale * invstd`` (``scale`` is the effective
    per-channel weight, None for 1):
    ``dx = a * (dy - mean_dy - xhat * mean_dy_xhat)``, where both means run over the whole group's
    batch. Computed as ``a * dy + (xhat * (-a * mean_dy_xhat) + (-a * mean_dy))``: one fused
    eval-mode batch-norm pass over ``x`` and one multiply-add with ``dy``. The kernel folds its
    affine form into ``x * alpha + beta``, which cancels where ``|mean|`` is many standard
    deviations: ``center=True`` subtracts ``mean`` first (one more pass), for such statistics.
    ``invstd``: ``rsqrt(var + eps)`` when the caller has it already.
    """
    if invstd is None:
        invstd = torch.rsqrt(var + eps)
    a = invstd if scale is None else scale * invstd
    neg_a = a.neg()
    if center:
        x = x - channel_view(mean.to(x.dtype), x.dim())
        mean = torch.zeros_like(mean)
    out = torch.batch_norm(x, neg_a * mean_dy_xhat, neg_a * mean_dy, mean, var, False, 0.0, eps, False)
    return out.addcmul_(grad_out, channel_view(a, x.dim()))
