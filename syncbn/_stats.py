"""Local statistics and the group merge: what each rank sends, and how the group's statistics come out of it.

A synchronized layer asks :func:`local_row` for its rank's statistics, hands the row to
:func:`syncbn.comm.all_gather`, and turns every rank's rows into the group's mean and variance
with :func:`merge_rows`. Nothing here talks to other processes.

Accuracy of the merge. Each rank sends its channels' mean as an unevaluated float64 sum
``hi + lo`` (``lo`` is a correction computed only when the mean is large against the spread, see
:func:`local_row`), its biased variance and its count. :func:`merge_rows` combines them in float64
in rank order, around a reference every rank shares (the first non-empty rank's ``hi``):
``M2 = sum_i n_i var_i + sum_i n_i (d_i - m)^2`` with ``d_i = (hi_i - K) + lo_i``, the
parallel-variance formula of Chan, Golub and LeVeque (1979), which never subtracts large sums of
squares. So the group's variance keeps the accuracy of each rank's own two-pass variance at any
``|mean| / std`` (no ``E[x^2] - E[x]^2`` cancellation) and over the range of torch's own
statistics kernel (no squares of means), and every rank computes bit-identical results from the
same rows.

Conventions: ``x`` has shape ``(N, C, *)``; per-channel vectors have shape ``(C,)``; a ``mask``
is a bool tensor of shape ``(N, *x.shape[2:])``, True where a position holds data.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _compat, _kernels
from ._compat import is_compiling

__all__ = [
    "stat_dtype",
    "channel_view",
    "reduce_dims",
    "expand_mask",
    "check_mask",
    "row_size",
    "local_row",
    "GroupStats",
    "merge_rows",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# A rank refines its channels' means (one more pass over its batch) when some channel's
# |mean| exceeds this many standard deviations: below it, rounding the mean to its dtype costs the
# group's variance less than a few units in the last place (see local_row).
_REFINE_RATIO = 4.0
# A row whose variance exceeds this fraction of its dtype's largest value is flagged too (as
# refined), so that the forward checks the group's variance fits the statistics dtype.
_FLAG_VARIANCE = 1.0 / 128


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float32 for half inputs."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


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


def expand_mask(mask: Tensor, ndim: int) -> Tensor:
    """``(N, *S)`` mask as ``(N, 1, *S)``, broadcastable against an ``(N, C, *S)`` tensor."""
    return mask.unsqueeze(1) if ndim > 1 else mask


def _kernel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a non-empty ``x`` from torch's CPU batch-norm statistics kernel.

    On CPU torch's kernel makes two passes over ``x`` (the mean, then the squared deviations from
    it), accumulated in double, and returns the biased variance. Half inputs get float32
    statistics (scratch float32 buffers with momentum 0 make the kernel return that dtype).
    """
    if x.dtype in HALF_DTYPES:
        c = x.shape[1]
        scratch_mean = torch.zeros(c, dtype=torch.float32, device=x.device)
        scratch_var = torch.ones(c, dtype=torch.float32, device=x.device)
        return torch.batch_norm_update_stats(x, scratch_mean, scratch_var, 0.0)
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def _refine(x: Tensor, hi: Tensor, dims: list[int], wide: bool = False) -> tuple[Tensor, Tensor]:
    """float64 ``lo = mean(x - hi)`` and biased variance ``mean((x - hi)**2) - lo**2`` around ``hi``.

    ``hi`` is the mean in the statistics dtype, as torch's kernel rounded it; the kernel's variance
    is the second moment around that rounded mean (``var + lo**2``), not the variance. ``x - hi``
    (in the statistics dtype, which holds every value of ``x`` exactly) is exact where ``x`` lies
    within a factor 2 of ``hi`` (Sterbenz), which is the case this is called for (``|mean|`` many
    standard deviations away from 0), so both are accurate to the dtype's epsilon times the
    spread instead of times the mean. ``wide=True`` computes in float64 throughout (a float64
    copy of ``x``): for deviations whose squares overflow the statistics dtype.
    """
    if wide:
        diff = x.double() - channel_view(hi.double(), x.dim())
    else:
        diff = x - channel_view(hi, x.dim())
    return _moments_around(diff, dims, x.numel() // x.shape[1])


def _moments_around(diff: Tensor, dims: list[int], n: Union[int, Tensor]) -> tuple[Tensor, Tensor]:
    """float64 ``lo = sum(diff) / n`` and ``sum(diff**2) / n - lo**2`` (the variance around ``hi + lo``).

    ``diff`` is ``x - hi`` (0 where masked). A channel holding inf or NaN gets ``lo = 0``: it keeps
    the kernel's mean (inf or NaN, as in torch) and sends no correction, which merge_rows relies on.
    """
    lo = diff.sum(dims, dtype=torch.float64) / n
    var = ((diff * diff).sum(dims, dtype=torch.float64) / n - lo * lo).clamp_(min=0.0)
    return lo.nan_to_num_(0.0, 0.0, 0.0), var


def _masked_stats(x: Tensor, mask: Tensor, count: Tensor, dims: list[int]) -> tuple[Tensor, Tensor, bool]:
    """float64 mean and biased variance over the valid positions of ``x`` (any values where padded), and a flag.

    On CPU: torch's statistics kernel over ``x`` with its padding set to 0 (one copy, one pass),
    then the valid positions' statistics in closed form from those of the whole:
    ``mean = mean_z * T / n``, ``var = (var_z - mean_z**2 * (T - n) / n) * T / n`` (``T`` positions,
    ``n`` valid). Where that subtraction would cancel (some channel's ``mean_z**2 (T - n) / n``
    above ``var_z / 16``), where the kernel's rounded mean would show (some ``|mean| > 4 std``),
    and on other devices (no host read there), two passes over the valid values instead, with
    float64 sums, the variance taken around the exact mean. The flag (CPU only) is True where
    some variance nears the statistics dtype's range: then the passes run in float64 (torch's
    kernel squares deviations in the input's dtype) and the forward checks the group's variance.
    """
    m = expand_mask(mask, x.dim())
    n = count.clamp(min=1.0)
    xz = torch.where(m, x, 0)
    stat = stat_dtype(x.dtype)
    total = xz.numel() // xz.shape[1] if xz.shape[1] else 0
    wide = False
    if x.device.type == "cpu" and total:
        mean_z, var_z = (t.double() for t in _kernel_stats(xz))
        shrink = (total - count) / n  # padded positions per valid one
        mean, var = mean_z * (total / n), (var_z - shrink * mean_z.square()) * (total / n)
        cancel, rounding, top = torch.stack(
            [(var_z - 16.0 * shrink * mean_z.square()).min(), (16.0 * var - mean.square()).min(), var_z.max()]
        ).tolist()
        wide = stat != torch.float64 and top > _FLAG_VARIANCE * torch.finfo(stat).max
        if cancel >= 0 and rounding >= 0 and not wide:
            return mean, var, False
    xs = xz.double() if wide else xz.to(stat)
    hi = (xs.sum(dims, dtype=torch.float64) / n).to(xs.dtype)
    lo, var = _moments_around(torch.where(m, xs - channel_view(hi, x.dim()), 0), dims, n)
    return hi.double() + lo, var, wide


def _local_row_impl(x: Tensor, mask: Optional[Tensor], needs_grad: float) -> Tensor:
    c = x.shape[1]
    dims = reduce_dims(x)
    f64 = dict(dtype=torch.float64, device=x.device)
    if mask is not None:
        count = mask.sum(dtype=torch.float64)  # a tensor: no host read
        mean, var, flagged = _masked_stats(x, mask, count, dims)
        tail = torch.stack([count, count.new_tensor(needs_grad), count.new_tensor(float(flagged))])
        return torch.cat([mean, _zeros(c, x.device), var, tail])
    count = x.numel() // c if c else 0
    if count == 0:
        return torch.cat([torch.zeros(3 * c, **f64), torch.tensor([0.0, needs_grad, 0.0], **f64)])
    fused = _kernels.uses_fused_kernels(x)
    if fused:
        mean, var = _kernels.local_stats(x)
    else:
        mean, var = _kernel_stats(x)
    lo, refined = None, 0.0
    # Refine the mean where rounding it to its dtype would show in the group's variance (some
    # channel's mean^2 > 16 var), and flag a variance beyond its dtype's range with a finite mean
    # (the forward then refuses the batch). CPU only, where the host read is free. Never on the
    # fused path, which is CUDA's (its CPU emulation in tests behaves as CUDA does).
    if not fused and x.device.type == "cpu":
        low, top = _refinement_check(mean, var)
        if var.dtype != torch.float64 and top > _FLAG_VARIANCE * torch.finfo(var.dtype).max:
            # A variance near or beyond the statistics dtype's range (torch's kernel squares the
            # deviations in that dtype: inf once one of them exceeds its square root): float64
            # statistics, and the row flagged (as refined) so that the forward checks the group's
            # variance fits. Unrefined rows keep mean^2 <= 16 var, so the group's variance is at
            # most 65 times the largest row's. Not for a batch holding inf (NaN statistics, as
            # in torch).
            if bool(mean.isfinite().all()):
                lo, var = _refine(x, mean, dims, wide=True)
            refined = 1.0
        elif low < 0:
            lo, var = _refine(x, mean, dims)
            refined = 1.0
    if lo is None:
        lo = _zeros(c, x.device)
    return torch.cat([mean, lo, var, _constant((float(count), needs_grad, refined), x.device)])


def _refinement_check(mean: Tensor, var: Tensor) -> tuple[float, float]:
    """``min(var - mean^2 / 16)`` and ``max(var)`` over the channels, NaN channels left out.

    (A NaN in the batch makes its channel's statistics NaN; it must not hide the other channels.)
    Without NaN: one reduction each; with NaN (rare), they are taken again around it.
    """
    spread = torch.addcmul(var, mean, mean, value=-1.0 / _REFINE_RATIO**2)
    if var.dtype == torch.float64:
        # (No range flag for float64 statistics: only the spread is read.)
        low = spread.amin().item()
        if low == low:
            return low, 0.0
    else:
        low, top = torch.stack([spread.amin(), var.amax()]).tolist()
        if low == low and top == top:
            return low, top
    low, neg_top = torch.stack([spread, -var]).nan_to_num_(0.0, math.inf, -math.inf).amin(1).tolist()
    return low, -neg_top


# Small read-only float64 vectors that local_row would otherwise build at every call (torch.cat
# copies them). Bounded: cleared when full.
_constants: dict[tuple, Tensor] = {}


def _cached(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    t = _constants.get(key)
    if t is None:
        if len(_constants) >= 256:
            _constants.clear()
        t = _constants[key] = make()
    return t


def _constant(values: tuple, device: torch.device) -> Tensor:
    return _cached((values, device), lambda: torch.tensor(values, dtype=torch.float64, device=device))


def _zeros(c: int, device: torch.device) -> Tensor:
    """A cached float64 ``(c,)`` vector of zeros (keyed by its length, not by its values)."""
    return _cached(("zeros", c, device), lambda: torch.zeros(c, dtype=torch.float64, device=device))


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
    standard deviations, ``lo`` holds the float64 correction ``mean(x - hi)`` and ``var`` the
    variance around ``hi + lo`` (one more pass over the batch), and ``refined`` is 1.0, else both
    are 0. ``refined`` is also 1.0 where a float32 variance nears float32's range (the statistics
    are then computed in float64; the forward checks the group's fits). An empty batch (or mask) gives zeros. No autograd history. Under
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
        count: 0-dim total count per channel (exact below 2**53), or the Python number the
            caller passed as ``total``.
        counts: ``(W,)`` each rank's count, in group-rank order.
    """

    mean: Tensor
    var: Tensor
    count: Union[Tensor, float]
    counts: Tensor


def merge_rows(rows: Tensor, refined: bool = True, total: Optional[float] = None) -> GroupStats:
    """Merge every rank's :func:`local_row` (``(W, 3C + 3)``, group-rank order) into the group's statistics.

    Chan, Golub and LeVeque's pairwise update in closed form, around the shared reference
    ``K`` (the first non-empty rank's ``hi``): ``d_i = (hi_i - K) + lo_i``, ``m = sum n_i d_i / M``,
    ``mean = K + m``, ``var = (sum n_i var_i + sum n_i (d_i - m)^2) / M``. Empty ranks weigh
    nothing; an empty group gives zeros. No host read. ``refined=False`` tells that no rank sent
    a correction (every channel's ``|mean| <= 4 std`` on every rank): then ``K = 0`` loses nothing
    and the merge takes a third of the operations. ``total``: the group's count, when the caller
    read it on the host already (no reduction for it then).
    """
    c = (rows.shape[1] - 3) // 3
    hi, var = rows[:, :c], rows[:, 2 * c : 3 * c]
    counts = rows[:, 3 * c]
    if total is None:
        total = counts.sum()
        safe: Union[Tensor, float] = total.clamp(min=1.0)
    else:
        safe = float(max(total, 1))
    if rows.shape[0] == 1:
        return GroupStats(hi[0] + rows[0, c : 2 * c], var[0], total, counts)
    if not refined:
        # Weights n_i / M, then two matrix-vector products (the fewest operators: this runs at
        # every synchronized layer's forward).
        w = counts / safe
        mean = torch.mv(hi.t(), w)
        d = hi - mean
        return GroupStats(mean, torch.mv(torch.addcmul(var, d, d).t(), w), total, counts)
    lo = rows[:, c : 2 * c]
    n = counts.unsqueeze(1)
    nonempty = counts > 0
    present = nonempty.unsqueeze(1)
    # The first non-empty rank's hi, selected without indexing by a value (compile-friendly) and
    # without multiplying other rows by 0 (a non-finite row would give NaN).
    first = (nonempty & (nonempty.cumsum(0) == 1)).unsqueeze(1)
    ref = torch.where(first, hi, 0).sum(0)
    d = torch.where(present, (hi - ref) + lo, 0)
    m = (n * d).sum(0) / safe
    spread = torch.where(present, n * (var + (d - m).square()), 0).sum(0)
    mean = ref + m
    # An infinite value in some rank's batch makes K or a d_i infinite and K + m NaN; torch's
    # kernel gives the plain weighted mean there (inf, or NaN for inf and -inf). A rank whose
    # statistics are not finite never sends a correction (its lo is 0).
    plain = torch.where(present, n * (hi + lo), 0).sum(0) / safe
    return GroupStats(torch.where(mean.isfinite(), mean, plain), spread / safe, total, counts)
