"""Pure per-channel batch-normalization math.

Nothing here talks to other processes: the layers ask these functions for local statistics,
hand the packed vector to :mod:`syncbn.comm`, and come back here to turn the group's sums into
mean and variance, to normalize and to update running averages.

Conventions: ``x`` has shape ``(N, C, *)``; per-channel vectors have shape ``(C,)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._compat import is_compiling

__all__ = [
    "stat_dtype",
    "channel_view",
    "uses_fused_kernels",
    "fused_layout",
    "local_stats",
    "pack_stats",
    "unpack_stats",
    "exponential_average_factor",
    "update_running_stats",
    "normalize",
    "renorm_factors",
    "snapshot",
    "fold_affine",
    "grad_sums",
    "grad_input",
    "fused_normalize",
    "fused_grad_sums",
    "fused_grad_input",
]

_HALF = (torch.float16, torch.bfloat16)

# Two implementations of the same math sit side by side:
# - the *fused* path calls exactly the kernels torch's own nn.SyncBatchNorm calls (and CI-tests) on
#   CUDA: batch_norm_update_stats, batch_norm_elemt, batch_norm_backward_reduce and
#   batch_norm_backward_elemt. They exist for CUDA only: 3 passes over activation memory forward
#   (stats, then read and write), 5 backward (reduce dy and x, then read dy and x, write dx).
# - the *composed* path everywhere else (CPU, and devices without those kernels) uses only the
#   training-mode statistics and backward and the eval-mode batch_norm, whose contracts every
#   device implements because plain nn.BatchNorm needs them.
_FUSED_DEVICE_TYPES = ("cuda",)
# Where the fused kernels come from. Only tests replace it (with CPU emulations of the CUDA
# kernels, to check how this module calls them on machines without a GPU).
_kernels: object = torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float32 for half inputs."""
    return torch.float32 if dtype in _HALF else dtype


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(C,)`` vector so that it broadcasts against an ``(N, C, *)`` tensor of ``ndim`` dims."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


def uses_fused_kernels(x: Tensor) -> bool:
    """Whether ``x`` goes through torch's fused SyncBatchNorm kernels (CUDA) or the composed path."""
    return x.device.type in _FUSED_DEVICE_TYPES


def fused_layout(t: Tensor, like: Optional[Tensor] = None) -> Tensor:
    """``t`` in a layout the fused kernels take: contiguous, channels_last or channels_last_3d.

    With ``like``, in ``like``'s layout (the backward kernels want ``dy`` laid out as ``x``). A
    tensor already in such a layout is returned as is (no copy).
    """
    ref = t if like is None else like
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if ref.dim() == (4 if fmt is torch.channels_last else 5) and ref.is_contiguous(memory_format=fmt):
            if like is None or t.is_contiguous(memory_format=fmt):
                return t
            return t.contiguous(memory_format=fmt)
    return t.contiguous()


def local_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of ``x`` over every dim but 1, and the count.

    Uses torch's batch-norm statistics kernel: one pass over ``x``, accumulated in double on CPU,
    Welford in float32 (float64 for float64 input) on CUDA. Half inputs give float32 statistics.
    An empty ``x`` gives zeros and a count of 0. The results carry no autograd history: the
    layers' backward accounts for them in closed form.
    """
    x = x.detach()
    c = x.shape[1]
    count = x.numel() // c if c else 0
    dtype = stat_dtype(x.dtype)
    if count == 0:
        zeros = torch.zeros(2, c, dtype=dtype, device=x.device)
        return zeros[0], zeros[1], 0
    if uses_fused_kernels(x):
        # The CUDA kernel returns float32 statistics for half inputs by itself (no scratch buffers).
        mean, var = _kernels.batch_norm_update_stats(x, None, None, 0.0)
    elif x.dtype in _HALF:
        # The kernel returns statistics in the dtype of the running buffers it is given; scratch
        # float32 buffers (momentum 0) make it return float32 and leave the module's buffers alone.
        scratch_mean = torch.zeros(c, dtype=dtype, device=x.device)
        scratch_var = torch.ones(c, dtype=dtype, device=x.device)
        mean, var = torch.batch_norm_update_stats(x, scratch_mean, scratch_var, 0.0)
    else:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean, var, count


def pack_stats(mean: Tensor, var: Tensor, count: Union[int, Tensor]) -> Tensor:
    """Pack local statistics as float64 ``[sum (C), sum of squares (C), count (1)]``.

    Sums of values and of squares add across ranks, so one all_reduce of this vector gives the
    group's sums. The float64 merge itself adds a relative error of ~1e-16 * (mean/std)**2 to the
    variance; what limits float32 and half inputs is that each rank's mean arrives rounded to
    float32 (see the README's guarantees for measured errors). float64 sums of squares overflow
    for values beyond about 1e150. ``count`` may be a 0-dim tensor (no host read).
    """
    c = mean.numel()
    packed = torch.cat([mean, var, mean.new_ones(1)]).to(torch.float64)
    m = packed[:c]
    packed[c : 2 * c].addcmul_(m, m)  # n * (var + mean^2) = sum of squares
    return packed.mul_(count)


def unpack_stats(packed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance (in ``dtype``) and total count from a (reduced) packed vector.

    Works in place on ``packed``. The count comes back as a 0-dim float64 tensor (exact for any
    count below 2**53), so nothing is read on the host. The variance is clamped at 0: rounding can
    never make it negative. A count of 0 gives zeros.
    """
    c = (packed.numel() - 1) // 2
    count = packed[-1]
    # Dividing by at least 1 leaves the all-zero sums of an empty group at zero.
    moments = packed[: 2 * c].div_(count.clamp(min=1.0))
    mean = moments[:c]
    moments[c:].addcmul_(mean, mean, value=-1.0).clamp_(min=0.0)
    out = moments.to(dtype)
    return out[:c], out[c:], count


def exponential_average_factor(
    momentum: Optional[float], num_batches_tracked: Tensor, debias: bool = False
) -> Union[float, Tensor]:
    """The running-average weight of this step, given the already incremented step counter.

    ``momentum=None`` gives the cumulative average ``1 / t`` as torch does. With ``debias`` the
    rate is ``m / (1 - (1 - m)**t)``, which makes the buffers equal the bias-corrected average
    ``r_t / (1 - (1 - m)**t)`` of a zero-initialised EMA ``r_t``. Those two come back as 0-dim
    float64 tensors computed on the counter's device (no host read; the same float64 arithmetic
    as on the host); a fixed momentum comes back as the float itself.
    """
    if momentum is not None and not debias:
        return momentum
    t = num_batches_tracked.to(torch.float64)
    if momentum is None:
        return t.reciprocal()
    return momentum / (1.0 - torch.pow(1.0 - momentum, t))


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Union[int, Tensor],
    factor: Union[float, Tensor],
) -> None:
    """``running = (1 - factor) * running + factor * batch`` in place, with the unbiased variance.

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
        if isinstance(factor, Tensor):
            factor = factor.to(running_mean.dtype)
        unbiased = var.to(running_var.dtype) * bessel
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(unbiased, factor)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, with torch's fused kernel.

    Output has the dtype and memory format of ``x``. Differentiable in ``x``, ``weight`` and
    ``bias`` with ``mean`` and ``var`` held constant (the eval-mode gradient).
    """
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


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


if hasattr(torch.library, "custom_op"):  # torch >= 2.4

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
    if is_compiling() and hasattr(torch.ops.syncbn, "snapshot"):
        return torch.ops.syncbn.snapshot(t)
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


def _empty_sums(grad_out: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero gradient sums for an empty batch, computed *from* ``grad_out``.

    Under torch.compile the backward's all_reduce must stay in the backward graph: sums that did not
    depend on the incoming gradient would let the graph partitioner run that collective during
    the forward on this rank alone, while its peers wait in their backward.
    """
    zeros = grad_out.sum([0] + list(range(2, grad_out.dim()))).to(dtype)
    return zeros, zeros.clone()


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` over the local batch.

    One fused pass: torch's training-mode batch-norm backward given the batch's ``mean`` and
    ``invstd`` (the contract autograd uses for ``F.batch_norm`` on every device), whose grad_bias and
    grad_weight are exactly these sums. An empty batch gives zeros.
    """
    if x.numel() == 0:
        return _empty_sums(grad_out, mean.dtype)
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
) -> Tensor:
    """Training-mode batch-norm input gradient from the group's gradient means.

    With ``xhat = (x - mean) * invstd`` and ``a = scale * invstd`` (``scale`` is the effective
    per-channel weight, None for 1):
    ``dx = a * (dy - mean_dy - xhat * mean_dy_xhat)``, where both means run over the whole group's
    batch. Computed as ``a * dy + (xhat * (-a * mean_dy_xhat) + (-a * mean_dy))``: one fused
    eval-mode batch-norm pass over ``x`` and one multiply-add with ``dy``.
    """
    invstd = torch.rsqrt(var + eps)
    a = invstd if scale is None else scale * invstd
    neg_a = a.neg()
    out = torch.batch_norm(x, neg_a * mean_dy_xhat, neg_a * mean_dy, mean, var, False, 0.0, eps, False)
    return out.addcmul_(grad_out, channel_view(a, x.dim()))


def fused_normalize(x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean) * invstd * scale + shift`` with torch's ``batch_norm_elemt`` kernel (CUDA).

    ``x`` in a :func:`fused_layout`; ``mean``, ``invstd``, ``scale`` and ``shift`` in the statistics
    dtype (:func:`fold_affine` with ``like``). One read and one write of ``x``'s memory.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    return _kernels.batch_norm_elemt(x, scale, shift, mean, invstd, 0.0)


def fused_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` with ``batch_norm_backward_reduce`` (CUDA).

    One read of ``dy`` and ``x``. The kernel is asked for its input-gradient sums only (the weight
    gradients follow from them in closed form), so it never needs an affine weight; ``scale`` only
    tells it the parameter dtype. An empty batch gives zeros.
    """
    if x.numel() == 0:
        return _empty_sums(grad_out, mean.dtype)
    sum_dy, sum_dy_xmu, _, _ = _kernels.batch_norm_backward_reduce(
        grad_out, x, mean, invstd, scale, True, False, False
    )
    return sum_dy, sum_dy_xmu


def fused_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: Tensor,
) -> Tensor:
    """Training-mode input gradient with ``batch_norm_backward_elemt`` (CUDA).

    ``dx = scale * invstd * (dy - sum_dy / M - (x - mean) * invstd**2 * sum_dy_xmu / M)`` where the
    sums are the group's and ``M`` is the sum of ``count`` (an int32 tensor on ``x``'s device, so
    the kernel reads it without a host round trip). One read of ``dy`` and ``x``, one write.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    return _kernels.batch_norm_backward_elemt(grad_out, x, mean, invstd, scale, sum_dy, sum_dy_xmu, count)
