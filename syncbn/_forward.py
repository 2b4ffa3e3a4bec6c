"""The forward every synchronized layer shares: which statistics, whether to communicate, the fallbacks and the running averages.

Modules decide *whether* to communicate (training with a group of more than one rank) and hand
everything else here; :class:`syncbn._autograd.SyncNormFunction` decides *how* the backward
communicates. Every branch that changes what the ranks do next is taken from the group's merged
statistics, which every rank holds after the same all_gather.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _compat, _config, _consistency, _kernels, comm
from . import _stats as ST
from . import functional as BF
from ._autograd import SyncNormFunction
from ._compat import is_compiling

__all__ = ["batch_norm", "FALLBACKS", "check_options", "StatsSink"]

FALLBACKS = ("raise", "running")

# Receives a layer's group statistics: (mean, biased var, count), float64 (count a Python int, or
# a 0-dim tensor that is 0 for an unusable batch in compiled steps) -> None.
StatsSink = Callable[[Tensor, Tensor, Union[int, Tensor]], None]

# Per-rank counts travel to the fused CUDA backward as int32, as torch's own layer passes them.
_INT32_MAX = 2**31 - 1


def check_options(name: str, min_count: int, fallback: str) -> None:
    """``ValueError`` for a ``fallback`` not in :data:`FALLBACKS` or a ``min_count`` below 2."""
    if fallback not in FALLBACKS:
        raise ValueError(f"{name}: expected fallback to be one of {FALLBACKS}, got {fallback!r}")
    if min_count < 2:
        raise ValueError(
            f"{name}: expected min_count >= 2 (the unbiased running variance divides by count - 1), "
            f"got {min_count}"
        )


def check_input(name: str, x: Tensor, num_features: int) -> None:
    """``ValueError`` unless ``x`` is a floating-point ``(N, num_features, *)`` tensor."""
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{name}: expected input of shape (N, {num_features}, *) with at least 2 dims, "
            f"got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        # Checked on every rank, also on an empty batch, so that no rank enters the collective alone.
        raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}; convert it with .float()")


def _check_dtypes(name: str, x: Tensor, *params: Optional[Tensor]) -> None:
    """``ValueError`` for parameter or buffer dtypes torch's batch norm kernels refuse with ``x``.

    They take parameters and buffers of the input's dtype, or float32 ones with a float16 or
    bfloat16 input. Checked on every rank of a synchronized call before any collective (an empty
    batch too), so that a refused combination raises everywhere instead of on the ranks whose
    kernel happens to look; unsynchronized, where torch's kernel would raise (a non-empty batch).
    """
    for p in params:
        if p is None or p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in ST.HALF_DTYPES):
            continue
        wanted = f"{x.dtype}" + (" or torch.float32" if x.dtype in ST.HALF_DTYPES else "")
        raise ValueError(
            f"{name}: expected parameters and buffers of dtype {wanted} for an input of dtype "
            f"{x.dtype}, got {p.dtype}. Cast the input (x.to({p.dtype})) or the layer "
            f"(layer.to({x.dtype})), or run the model under torch.autocast"
        )


def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    training: bool,
    track: bool,
    momentum: Optional[float],
    eps: float,
    group: Optional[comm.ProcessGroup],
    name: str,
    key: int = 0,
    min_count: int = 2,
    fallback: str = "raise",
    debias: bool = False,
    renorm: Optional[tuple[Any, Any]] = None,
    stats_sink: Optional[StatsSink] = None,
    mask: Optional[Tensor] = None,
    num_features: Optional[int] = None,
) -> Tensor:
    """Shared forward of every synchronized layer, following torch's rule for buffers.

    ``training`` is the module's flag; ``track`` says whether this forward counts a step and
    updates the running buffers (torch: ``training and track_running_stats``). The caller passes
    the buffers torch's layer would pass to ``F.batch_norm``: None in training without
    ``track_running_stats``. Without buffers the batch's statistics are used, also in eval (then
    each rank's own, never communicating). ``renorm=(r_max, d_max)`` switches to Batch
    Renormalization. With ``stats_sink`` the group's batch statistics go to the sink instead of
    into the running averages (gradient accumulation, precise statistics). ``key`` tells layers
    apart in consistency mode. With ``num_features`` the input's shape and dtype are checked
    here (:func:`check_input`), after the consistency check when that mode is on.
    """
    world = comm.group_size(group)
    sync = training and (world > 1 or _config.current().always_sync)
    if sync and _config.debug():
        # Consistency mode: the ranks compare this call before any rank checks its input alone, so
        # that an input only one rank got wrong raises on every rank (the check tolerates any
        # shape and dtype).
        _consistency.check_consistency(name, x, group, key)
    if num_features is not None:
        check_input(name, x, num_features)
    if sync or x.numel() or world > 1:
        # In a group of one, an empty batch passes as in torch (whose kernel looks at no value);
        # in a larger group a rank cannot tell whether the group's batch is empty.
        _check_dtypes(name, x, weight, bias, running_mean, running_var)
    if running_mean is not None and not training:
        return BF.normalize(x, running_mean, running_var, weight, bias, eps, mask)
    # Activation checkpointing runs the forward again inside backward: same statistics (and, when
    # synchronized, the same collective on every rank, since every rank recomputes), but the
    # running averages, the step counter and the stats sink already took this batch. A compiled
    # graph's recomputation replays pure ops only, never the buffer updates.
    recompute = training and not is_compiling() and _compat.in_backward()
    # As in torch's layers, every training forward of a layer that tracks running statistics is one
    # step, counted before the batch is looked at: also an empty batch (on this rank or on every
    # rank), one below min_count (fallback or error). momentum=None divides by this count. While a
    # stats sink collects (accumulate_bn_stats), the sink's owner counts the step instead.
    counted = training and track and not recompute and stats_sink is None
    factor = count_step(momentum, num_batches_tracked, debias) if counted else 0.0
    update = counted and running_mean is not None
    if not sync and renorm is None and stats_sink is None and mask is None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        if count >= min_count:
            # One process: torch's own fused kernel, so results equal nn.BatchNorm bit for bit.
            # A recomputation passes factor 0 (buffers unchanged) rather than no buffers, so that it
            # saves the same tensors as the original forward, as non-reentrant checkpoint checks.
            keep = running_mean is not None and (update or recompute)
            rm, rv = (running_mean, running_var) if keep else (None, None)
            return F.batch_norm(x, rm, rv, weight, bias, True, float(factor) if update else 0.0, eps)
        _check_count(name, count, min_count, fallback, running_mean is not None, "in the batch")
        return _below_min_count(x, running_mean, running_var, weight, bias, eps, None)

    needs_grad = x.requires_grad and torch.is_grad_enabled()
    if mask is None and _kernels.uses_fused_kernels(x):
        # Laid out once, before the statistics read it, as torch's layer does: the fused kernels
        # then read it in their fastest layout and the normalization reuses it (a copy only for
        # an input in none of the layouts they take; its backward passes the gradient through).
        x = _kernels.fused_layout(x)
    row = ST.local_row(x, mask, needs_grad)
    if sync:
        rows = comm.all_gather(row, group)
    else:
        rows = row.unsqueeze(0)
    stat = ST.stat_dtype(x.dtype)
    tracks = running_mean is not None
    where = "across the process group" if sync else "in the batch"
    usable: Optional[Tensor] = None
    if not is_compiling() and not _compat.is_capturing(x):
        # The one host read of a synchronized forward (torch's own layer has one too): the ranks'
        # counts and whether any rank's input needs a gradient, identical on every rank.
        c = x.shape[1]
        head = rows[:, 3 * c :].tolist()  # per rank: count, needs_grad, refined
        counts = [int(h[0]) for h in head]
        count = sum(counts)
        _check_count(name, count, min_count, fallback, tracks, where)
        if count < min_count:
            # An empty group (nothing to normalize, nothing to learn from) or the running-statistics
            # fallback: the same branch on every rank, and no collective in the backward.
            return _below_min_count(x, running_mean, running_var, weight, bias, eps, mask)
        if max(counts) > _INT32_MAX and _kernels.uses_fused_kernels(x):
            raise ValueError(
                f"{name}: expected at most {_INT32_MAX} values per channel on each rank (torch's "
                f"fused CUDA kernels count them in int32), got {max(counts)}; split the batch"
            )
        backward_sync = sync and any(h[1] > 0 for h in head)
        refined = any(h[2] > 0 for h in head)
        st = ST.merge_rows(rows, refined=refined, total=count)
        mean, var, total = st.mean, st.var, count
        if refined and stat != torch.float64:
            # (A variance beyond the statistics dtype's range marks its row refined.)
            overflow = _variance_overflow(mean, var, stat)
            if bool(overflow.any()):
                raise ValueError(_overflow_message(name, stat, var, overflow))
    else:
        # Compiled steps and CUDA-graph capture: the count stays a tensor and every decision is
        # tensor arithmetic that every rank computes alike, with no host read.
        # The backward always communicates here (deciding to skip would read a flag on the host).
        st = ST.merge_rows(rows)
        total = st.count
        mean, var = st.mean, st.var
        usable = total >= min_count
        if fallback == "raise" or not tracks:
            ok = usable | (total == 0)
            msg = _too_few(name, f"1 to {min_count - 1}", min_count, where + " (count not read on the host)", tracks)
            _compat.assert_async(ok, msg)
        else:
            mean = torch.where(usable, mean, running_mean.to(mean.dtype))
            var = torch.where(usable, var, running_var.to(var.dtype))
        if stat != torch.float64:
            _compat.assert_async(
                ~_variance_overflow(mean, var, stat).any(),
                f"{name}: the batch variance of some channel exceeds the range of {stat}; " + _OVERFLOW_REMEDY,
            )
        backward_sync = sync
        refined = True  # (the backward centers x: no host read to decide it)

    r = d = None
    mean_s, var_s = mean.to(stat), var.to(stat)
    if renorm is not None and tracks:
        r, d = BF.renorm_factors(mean_s, var_s, running_mean, running_var, eps, *renorm)
    if stats_sink is not None and not recompute:
        # An unusable group batch adds nothing to the collected statistics.
        stats_sink(mean, var, total if usable is None else total * usable)
    elif update:
        BF.update_running_stats(
            running_mean, running_var, mean, var, total,
            factor if usable is None else usable.to(torch.float64) * factor,  # float64, as a Python float
            round_once=not _kernels.uses_fused_kernels(x),
        )
    return SyncNormFunction.apply(
        x, weight, bias, mean_s, var_s, eps, total, st.counts if sync else None, group, backward_sync,
        r, d, usable, mask, refined,
    )


_OVERFLOW_REMEDY = "normalize in float64 (x.double() and layer.double()) or scale the input down"


def _variance_overflow(mean: Tensor, var: Tensor, stat: torch.dtype) -> Tensor:
    """Channels whose float64 batch variance the statistics dtype cannot hold, with a finite mean.

    (An infinite value in the batch makes the mean non-finite: NaN statistics, as in torch.)
    """
    return mean.isfinite() & (var > torch.finfo(stat).max)


def _overflow_message(name: str, stat: torch.dtype, var: Tensor, overflow: Tensor) -> str:
    c = int(overflow.nonzero()[0, 0])
    return (
        f"{name}: expected batch variances within the range of {stat} (at most "
        f"{torch.finfo(stat).max:.3g}), got {float(var[c]):.3g} for channel {c}: normalizing with it "
        f"would give every value the layer's bias. {_OVERFLOW_REMEDY[0].upper() + _OVERFLOW_REMEDY[1:]}."
    )


def _below_min_count(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    mask: Optional[Tensor],
) -> Tensor:
    """Fewer than min_count values (after the checks): the running statistics, or an empty batch."""
    if running_mean is None:
        # Only an empty batch gets here: nothing to normalize, nothing to learn from.
        ones = torch.ones(x.shape[1], dtype=ST.stat_dtype(x.dtype), device=x.device)
        return BF.normalize(x, torch.zeros_like(ones), ones, weight, bias, eps, mask)
    return BF.normalize(x, running_mean, running_var, weight, bias, eps, mask)


def _too_few(name: str, count: Any, min_count: int, where: str, tracks_running: bool) -> str:
    remedy = (
        "pass fallback='running' to normalize with the running statistics"
        if tracks_running
        else "track running statistics and pass fallback='running'"
    )
    return (
        f"{name}: expected at least {min_count} values per channel {where} to compute batch "
        f"statistics, got {count}. Use a larger batch, drop the last incomplete batch "
        f"(DataLoader(drop_last=True)), or {remedy}."
    )


def _check_count(name: str, count: int, min_count: int, fallback: str, tracks_running: bool, where: str) -> None:
    """Raise the too-few-values ``ValueError`` (0 means an empty batch or group: no error)."""
    if 0 < count < min_count and not (fallback == "running" and tracks_running):
        raise ValueError(_too_few(name, count, min_count, where, tracks_running))


def count_step(
    momentum: Optional[float], num_batches_tracked: Optional[Tensor], debias: bool
) -> Union[float, Tensor]:
    """Count one more tracked batch and return this step's running-average factor (no host read)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return BF.exponential_average_factor(momentum, num_batches_tracked, debias)
