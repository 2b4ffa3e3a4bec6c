"""Pure per-channel batch-normalization math: local statistics, the group merge, normalize, running averages.

Nothing here talks to other processes. A synchronized layer asks :func:`local_row` for its rank's
statistics, hands the row to :func:`syncbn.comm.all_gather`, and turns every rank's rows into the
group's mean and variance with :func:`merge_rows`; the CUDA kernels live in :mod:`syncbn._kernels`.

Conventions: ``x`` has shape ``(N, C, *)``; per-channel vectors have shape ``(C,)``; a ``mask``
is a bool tensor of shape ``(N, *x.shape[2:])``, True where a position holds data.

Accuracy of the merge. Each rank sends its channels' mean as an unevaluated float64 sum
``hi + lo`` (``lo`` is a correction computed only when the mean is large against the spread, see
:func:`local_row`), its biased variance and its count. :func:`merge_rows` combines them in float64
in rank order, around a reference every rank shares (the first non-empty rank's ``hi``):
``M2 = sum_i n_i var_i + sum_i n_i (d_i - m)^2`` with ``d_i = (hi_i - K) + lo_i``, the
parallel-variance formula of Chan, Golub and LeVeque (1979), which never subtracts large sums of
squares. So the group's variance keeps the accuracy of each rank's own two-pass variance at any
``|mean| / std`` (no ``E[x^2] - E[x]^2`` cancellation) and over the whole float64 range (no squares
of means), and every rank computes bit-identical results from the same rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _compat, _kernels
from ._compat import is_compiling

__all__ = [
    "stat_dtype",
    "channel_view",
    "reduce_dims",
    "check_mask",
    "row_size",
    "local_row",
    "GroupStats",
    "merge_rows",
    "exponential_average_factor",
    "update_running_stats",
    "normalize",
    "renorm_factors",
    "snapshot",
    "fold_affine",
    "grad_sums",
    "grad_input",
]

_HALF = (torch.float16, torch.bfloat16)
# A rank refines its channels' means (one more pass over its batch) when some channel's
# |mean| exceeds this many standard deviations: below it, rounding the mean to its dtype costs the
# group's variance less than a few units in the last place (see local_row).
_REFINE_RATIO = 4.0


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float32 for half inputs."""
    return torch.float32 if dtype in _HALF else dtype


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(C,)`` vector so that it broadcasts against an ``(N, C, *)`` tensor of ``ndim`` dims."""
    return v.reshape((-1,) + (1,) * (ndim - 2))


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim of ``x`` but the channel dim 1."""
    return [0] + list(range(2, x.dim()))


def check_mask(name: str, x: Tensor, mask: Tensor) -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool tensor of shape ``(N, *x.shape[2:])`` on ``x``'s device."""
    want = (x.shape[0],) + tuple(x.shape[2:])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != want:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{name}: expected mask to be a bool tensor of shape {want} (input shape {tuple(x.shape)} "
            f"without the channel dim), True where a position holds data; got {got}"
        )
    if mask.device != x.device:
        raise ValueError(f"{name}: expected mask on {x.device} like the input, got {mask.device}")


def row_size(channels: int) -> int:
    """Length of one rank's statistics row: ``[hi (C), lo (C), var (C), count, needs_grad, refined]``."""
    return 3 * channels + 3


def _expand_mask(mask: Tensor, ndim: int) -> Tensor:
    return mask.unsqueeze(1) if ndim > 1 else mask


def _kernel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a non-empty ``x`` from torch's CPU batch-norm statistics kernel.

    One pass over ``x`` accumulated in double (two-pass variance). Half inputs get float32
    statistics (scratch float32 buffers with momentum 0 make the kernel return that dtype).
    """
    if x.dtype in _HALF:
        c = x.shape[1]
        scratch_mean = torch.zeros(c, dtype=torch.float32, device=x.device)
        scratch_var = torch.ones(c, dtype=torch.float32, device=x.device)
        return torch.batch_norm_update_stats(x, scratch_mean, scratch_var, 0.0)
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _mean_correction(x: Tensor, mean: Tensor, dims: list[int], mask: Optional[Tensor]) -> Tensor:
    """``mean(x - mean)`` in float64, for ``mean`` in ``x``'s dtype: what rounding the mean to it lost.

    ``x - mean`` is exact where ``x`` lies within a factor 2 of ``mean`` (Sterbenz), which is the
    case this is called for (``|mean|`` many standard deviations away from 0), so the correction is
    accurate to the dtype's epsilon times the spread instead of times the mean.
    """
    diff = x - channel_view(mean, x.dim())
    if mask is not None:
        diff = torch.where(_expand_mask(mask, x.dim()), diff, 0)
    n = x.numel() // x.shape[1] if mask is None else mask.sum()
    return diff.sum(dims, dtype=torch.float64) / n


def _local_row_impl(x: Tensor, mask: Optional[Tensor], needs_grad: float) -> Tensor:
    c = x.shape[1]
    dims = reduce_dims(x)
    f64 = dict(dtype=torch.float64, device=x.device)
    if mask is not None:
        m = _expand_mask(mask, x.dim())
        count: Union[int, Tensor] = mask.sum(dtype=torch.float64)  # a tensor: no host read
        n = count.clamp(min=1.0)
        xs = x.to(stat_dtype(x.dtype))
        mean = torch.where(m, xs, 0).sum(dims, dtype=torch.float64) / n
        dev = torch.where(m, xs - channel_view(mean.to(xs.dtype), x.dim()), 0)
        var = (dev * dev).sum(dims, dtype=torch.float64) / n
        tail = torch.stack([count, count.new_tensor(needs_grad), count.new_zeros(())])
        return torch.cat([mean, torch.zeros(c, **f64), var, tail])
    count = x.numel() // c if c else 0
    if count == 0:
        return torch.cat([torch.zeros(3 * c, **f64), torch.tensor([0.0, needs_grad, 0.0], **f64)])
    if _kernels.uses_fused_kernels(x):
        mean, var = _kernels.local_stats(x)
    else:
        mean, var = _kernel_stats(x)
    lo, refined = None, 0.0
    # Refine the mean where rounding it to its dtype would show in the group's variance (some
    # channel's mean^2 > 16 var). CPU only, where the host read is free; half inputs are
    # quantized coarser than their float32 mean is rounded.
    if x.device.type == "cpu" and x.dtype not in _HALF:
        if torch.addcmul(var, mean, mean, value=-1.0 / _REFINE_RATIO**2).min().item() < 0:
            mean = mean.to(x.dtype)
            lo, refined = _mean_correction(x, mean, dims, None), 1.0
    if lo is None:
        lo = _constant((0.0,) * c, x.device)
    return torch.cat([mean, lo, var, _constant((float(count), needs_grad, refined), x.device)])


# Small read-only float64 vectors that local_row would otherwise build at every call (torch.cat
# copies them). Bounded: cleared when full.
_constants: dict[tuple, Tensor] = {}


def _constant(values: tuple, device: torch.device) -> Tensor:
    key = (values, device)
    t = _constants.get(key)
    if t is None:
        if len(_constants) >= 256:
            _constants.clear()
        t = _constants[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return t


if _compat.HAS_CUSTOM_OP:

    @torch.library.custom_op("syncbn::local_row", mutates_args=())
    def _local_row_op(x: Tensor, mask: Optional[Tensor], needs_grad: float) -> Tensor:
        return _local_row_impl(x, mask, needs_grad)

    @_local_row_op.register_fake
    def _(x: Tensor, mask: Optional[Tensor], needs_grad: float) -> Tensor:
        return x.new_empty(row_size(x.shape[1]), dtype=torch.float64)


def local_row(x: Tensor, mask: Optional[Tensor] = None, needs_grad: bool = False) -> Tensor:
    """This rank's statistics row: float64 ``[hi (C), lo (C), var (C), count, needs_grad, refined]``.

    ``hi + lo`` is each channel's mean over the batch (over the positions where ``mask`` is True),
    ``var`` its biased variance (two-pass, accumulated in double), ``count`` the number of values
    per channel and ``needs_grad`` 1.0 when this rank's input needs a gradient. ``hi`` comes from
    torch's statistics kernel in the statistics dtype; where some channel's ``|mean|`` exceeds 4
    standard deviations, ``lo`` holds the float64 correction ``mean(x - hi)`` (one more pass over
    the batch) and ``refined`` is 1.0, else both are 0. An empty batch (or mask) gives zeros. No autograd history. Under
    ``torch.compile`` this is one opaque operator with a fake implementation, so batch sizes may
    change between steps without breaking the graph.
    """
    x = x.detach()
    if is_compiling() and _compat.HAS_CUSTOM_OP:
        return _local_row_op(x, mask, float(needs_grad))
    return _local_row_impl(x, mask, float(needs_grad))


class GroupStats(NamedTuple):
    """The group's statistics, identical on every rank (all float64).

    Attributes:
        mean: ``(C,)`` mean over every rank's values.
        var: ``(C,)`` biased variance.
        count: 0-dim total count per channel (exact below 2**53).
        counts: ``(W,)`` each rank's count, in group-rank order.
        any_grad: 0-dim, 1.0 when some rank's input needs a gradient.
    """

    mean: Tensor
    var: Tensor
    count: Tensor
    counts: Tensor
    any_grad: Tensor


def merge_rows(rows: Tensor, refined: bool = True) -> GroupStats:
    """Merge every rank's :func:`local_row` (``(W, 3C + 3)``, group-rank order) into the group's statistics.

    Chan, Golub and LeVeque's pairwise update in closed form, around the shared reference
    ``K`` (the first non-empty rank's ``hi``): ``d_i = (hi_i - K) + lo_i``, ``m = sum n_i d_i / M``,
    ``mean = K + m``, ``var = (sum n_i var_i + sum n_i (d_i - m)^2) / M``. Empty ranks weigh
    nothing; an empty group gives zeros. No host read. ``refined=False`` tells that no rank sent
    a correction (every channel's ``|mean| <= 4 std`` on every rank): then ``K = 0`` loses nothing
    and the merge takes a third of the operations.
    """
    c = (rows.shape[1] - 3) // 3
    hi, lo, var = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c : 3 * c]
    counts = rows[:, 3 * c]
    any_grad = rows[:, 3 * c + 1].amax()
    total = counts.sum()
    if rows.shape[0] == 1:
        return GroupStats(hi[0] + lo[0], var[0], total, counts, any_grad)
    n = counts.unsqueeze(1)
    safe = total.clamp(min=1.0)
    if not refined:
        mean = torch.mv(hi.t(), counts).div_(safe)
        d = hi - mean
        return GroupStats(mean, torch.mv(torch.addcmul(var, d, d).t(), counts).div_(safe), total, counts, any_grad)
    nonempty = counts > 0
    present = nonempty.unsqueeze(1)
    # The first non-empty rank's hi, selected without indexing by a value (compile-friendly) and
    # without multiplying other rows by 0 (a non-finite row would give NaN).
    first = (nonempty & (nonempty.cumsum(0) == 1)).unsqueeze(1)
    ref = torch.where(first, hi, 0).sum(0)
    d = torch.where(present, (hi - ref) + lo, 0)
    m = (n * d).sum(0) / safe
    spread = torch.where(present, n * (var + (d - m).square()), 0).sum(0)
    return GroupStats(ref + m, spread / safe, total, counts, any_grad)


def exponential_average_factor(
    momentum: Optional[float], num_batches_tracked: Optional[Tensor], debias: bool = False
) -> Union[float, Tensor]:
    """The running-average weight of this step, given the already incremented step counter.

    ``momentum=None`` gives the cumulative average ``1 / t`` as torch does (0 without a counter,
    as torch's layers use then). With ``debias`` the rate is ``m / (1 - (1 - m)**t)``, which makes
    the buffers equal the bias-corrected average ``r_t / (1 - (1 - m)**t)`` of a zero-initialised
    EMA ``r_t``. Those come back as 0-dim float64 tensors on the counter's device (no host read; the
    same float64 arithmetic as on the host); a fixed momentum comes back as the float itself.
    """
    if num_batches_tracked is None:
        return 0.0 if momentum is None else momentum
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
    mask: Optional[Tensor] = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, with torch's fused kernel.

    Output has the dtype and memory format of ``x``; with ``mask``, 0 where the mask is False.
    Differentiable in ``x``, ``weight`` and ``bias`` with ``mean`` and ``var`` held constant (the
    eval-mode gradient).
    """
    out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    if mask is not None:
        out = torch.where(_expand_mask(mask, x.dim()), out, 0)
    return out


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


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` over the local batch.

    One fused pass: torch's training-mode batch-norm backward given the batch's ``mean`` and
    ``invstd`` (the contract autograd uses for ``F.batch_norm`` on every device), whose grad_bias and
    grad_weight are exactly these sums. An empty batch gives zeros. For a masked batch, pass
    ``grad_out`` zero at padded positions and ``x`` equal to ``mean`` there.
    """
    if x.numel() == 0:
        return empty_sums(grad_out, mean.dtype)
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
