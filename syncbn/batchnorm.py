"""SyncBatchNorm: batch normalization with statistics over a whole process group."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from . import comm
from . import functional as BF
from ._autograd import SyncNormFunction
from ._compat import is_compiling

__all__ = ["SyncBatchNorm", "sync_batch_norm"]

_FALLBACKS = ("raise", "running")

# Receives a layer's group batch statistics: (mean, biased var, count) -> None. The count is a
# Python int on one process and a 0-dim float64 tensor (zero for an unusable batch) in a group.
StatsSink = Callable[[Tensor, Tensor, Union[int, Tensor]], None]

# Take the synchronized path (local statistics, all_reduce, SyncNormFunction) even in a group of
# one rank. Only benchmarks/gpu_check.py and tests set it, to run that path where one process per
# device is all there is (NCCL refuses two ranks on one GPU).
_ALWAYS_SYNC = False

# Recent torch batch norms (2.13 among them) take a keyword-only ``bias``: affine=True, bias=False
# is a learnt scale without a shift. syncbn's layers accept it on every torch, building the same
# thing themselves where torch's constructor does not take it.
_TORCH_NORM_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


def _check_input(name: str, x: Tensor, num_features: int) -> None:
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{name}: expected input of shape (N, {num_features}, *) with at least 2 dims, "
            f"got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        # Checked on every rank, also on an empty batch, so that no rank enters the collective alone.
        raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}; convert it with .float()")


def _check_eps(name: str, eps: float, training: bool) -> None:
    # torch's F.batch_norm checks this in its forward; the synchronized path must too, on every
    # rank before the collective (eps is the same on every rank).
    if training and not eps > 0:
        raise ValueError(
            f"{name}: eps must be positive during training (it keeps var + eps away from 0), got "
            f"{eps}; construct the layer with eps > 0 (default 1e-5)"
        )
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be non-negative, got {eps}; construct the layer with eps > 0")


def _check_options(name: str, min_count: int, fallback: str) -> None:
    if fallback not in _FALLBACKS:
        raise ValueError(f"{name}: expected fallback to be one of {_FALLBACKS}, got {fallback!r}")
    if min_count < 2:
        raise ValueError(
            f"{name}: expected min_count >= 2 (the unbiased running variance divides by count - 1), "
            f"got {min_count}"
        )


def _batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    training: bool,
    momentum: Optional[float],
    eps: float,
    group: Optional[comm.ProcessGroup],
    name: str,
    min_count: int = 2,
    fallback: str = "raise",
    debias: bool = False,
    renorm: Optional[tuple[float, float]] = None,
    stats_sink: Optional[StatsSink] = None,
) -> Tensor:
    """Shared forward of every synchronized layer.

    Decides *whether* to communicate (training with a group of more than one rank) and takes every
    branch from the group's total count, which all ranks hold after the same all_reduce.
    ``renorm=(r_max, d_max)`` switches to Batch Renormalization. With ``stats_sink`` the group's
    batch statistics go to ``stats_sink(mean, biased var, count)`` (in the statistics dtype) instead of
    into the running averages, which stay untouched (gradient accumulation, precise statistics).
    """
    if not training and running_mean is not None:
        return BF.normalize(x, running_mean, running_var, weight, bias, eps)

    sync = training and (_ALWAYS_SYNC or comm.group_size(group) > 1)
    # Activation checkpointing runs the forward again inside backward: same statistics (and, when
    # synchronized, the same all_reduce on every rank, since every rank recomputes), but the
    # running averages, the step counter and the stats sink already took this batch.
    recompute = training and _in_backward()
    tracking = training and running_mean is not None and not recompute
    # As in torch's layers, every training forward of a layer that tracks running statistics is one
    # step, counted before the batch is looked at: also an empty batch (on this rank or on every
    # rank), one below min_count (fallback or error). momentum=None divides by this count. While a
    # stats sink collects (accumulate_bn_stats), the sink's owner counts the step instead.
    factor = _step(momentum, num_batches_tracked, debias) if tracking and stats_sink is None else 0.0
    if not sync and renorm is None and stats_sink is None:
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        if count >= min_count:
            # Single process: torch's own fused kernel, so results equal nn.BatchNorm bit for bit.
            # A recomputation passes factor 0 (buffers unchanged) rather than no buffers, so that it
            # saves the same tensors as the original forward, as non-reentrant checkpoint checks.
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, float(factor), eps)
        _check_count(name, count, min_count, fallback, running_mean is not None, sync)
        return _below_min_count(x, running_mean, running_var, weight, bias, eps)

    mean, var, count = BF.local_stats(x)
    if sync:
        if comm.debug_enabled():
            owned = running_mean if running_mean is not None else weight
            comm.check_consistency(name, x, group, key=owned)
        packed = comm.all_reduce_sum(BF.pack_stats(mean, var, count), group)
        mean, var, count = BF.unpack_stats(packed, mean.dtype)
        if fallback == "raise" or running_mean is None:
            host_count = _check_group_count(name, count, min_count, running_mean is not None)
            usable: Optional[Tensor] = None if host_count is not None else count >= min_count
            if host_count is not None:
                # Eagerly the check has read the count anyway: plain Python arithmetic from here
                # on, a dozen small tensor ops fewer per call.
                count = host_count
                if count == 0:
                    # Every rank of the group is empty: nothing to normalize, nothing to learn from.
                    return _below_min_count(x, None, None, weight, bias, eps)
        else:
            # The count stays a tensor and every decision is tensor arithmetic that every rank
            # computes alike, with no host read (torch.compile and CUDA graphs need that). Below
            # min_count the running statistics stand in, as constants for autograd.
            usable = count >= min_count
            mean = torch.where(usable, mean, running_mean.to(mean.dtype))
            var = torch.where(usable, var, running_var.to(var.dtype))
    else:
        _check_count(name, count, min_count, fallback, running_mean is not None, sync)
        usable = None
        if count < min_count:
            return _below_min_count(x, running_mean, running_var, weight, bias, eps)

    r = d = None
    if renorm is not None and running_mean is not None:
        r, d = BF.renorm_factors(mean, var, running_mean, running_var, eps, *renorm)
    if stats_sink is not None and not recompute:
        # An unusable group batch adds nothing to the collected statistics.
        stats_sink(mean, var, count if usable is None else count * usable)
    elif tracking:
        BF.update_running_stats(
            running_mean, running_var, mean, var, count,
            factor if usable is None else usable.to(torch.float64) * factor,  # float64, as a Python float
        )
    return SyncNormFunction.apply(x, weight, bias, mean, var, eps, count, group, sync, r, d, usable)


def _below_min_count(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """One process below min_count (after the checks): the running statistics, or an empty batch."""
    if running_mean is None:
        # Only an empty batch gets here: nothing to normalize, nothing to learn from.
        ones = torch.ones(x.shape[1], dtype=BF.stat_dtype(x.dtype), device=x.device)
        return BF.normalize(x, torch.zeros_like(ones), ones, weight, bias, eps)
    return BF.normalize(x, running_mean, running_var, weight, bias, eps)


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


def _check_count(name: str, count: int, min_count: int, fallback: str, tracks_running: bool, sync: bool) -> None:
    """Raise the too-few-values ``ValueError`` for a local ``count`` (0 means an empty batch: no error)."""
    if 0 < count < min_count and not (fallback == "running" and tracks_running):
        where = "across the process group" if sync else "in the batch"
        raise ValueError(_too_few(name, count, min_count, where, tracks_running))


def _check_group_count(name: str, count: Tensor, min_count: int, tracks_running: bool) -> Optional[int]:
    """Fail loudly on every rank when the group has 1 to ``min_count - 1`` values per channel.

    Eagerly the count is read on the host (the one host read of a synchronized forward, as torch's
    own layer has one), the ``ValueError`` names it, and the count is returned. Where the host
    cannot look (under ``torch.compile``, or while a CUDA graph is captured) ``torch._assert_async``
    stops the step instead, with the same advice: a RuntimeError at this layer on CPU, a device-side
    assert on CUDA; then it returns None.
    """
    if is_compiling() or (count.is_cuda and torch.cuda.is_current_stream_capturing()):
        ok = (count >= min_count) | (count == 0)
        where = "across the process group (count not read on the host: compiled or captured)"
        torch._assert_async(ok, _too_few(name, f"1 to {min_count - 1}", min_count, where, tracks_running))
        return None
    n = int(count.item())
    if 0 < n < min_count:
        raise ValueError(_too_few(name, n, min_count, "across the process group", tracks_running))
    return n


def _in_backward() -> bool:
    """True while autograd runs a backward pass, where a forward is a checkpoint's recomputation.

    False while torch.compile traces: a compiled graph's recomputation replays pure ops only, never
    the buffer updates, and the query would otherwise break the graph at every layer.
    """
    if is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _step(
    momentum: Optional[float], num_batches_tracked: Optional[Tensor], debias: bool
) -> Union[float, Tensor]:
    """Count one more tracked batch and return this step's running-average factor (no host read)."""
    if num_batches_tracked is None:
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) needs a num_batches_tracked counter")
        return momentum
    num_batches_tracked.add_(1)
    return BF.exponential_average_factor(momentum, num_batches_tracked, debias)


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Optional[comm.ProcessGroup] = None,
) -> Tensor:
    """Functional synchronized batch norm: :func:`torch.nn.functional.batch_norm` over a group.

    In training mode with an initialized group of more than one rank, the statistics are those of
    the concatenation of every rank's ``input``; ``running_mean``/``running_var`` (if given) are
    updated in place with ``momentum`` and the unbiased variance. Otherwise it equals
    ``F.batch_norm``. Every rank of the group must call it the same number of times.

    Args:
        input: ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers, or None to always use batch statistics.
        weight, bias: ``(C,)`` affine parameters, or None.
        training: use (and update) batch statistics.
        momentum: running-average factor.
        eps: added to the variance for stability.
        process_group: group to synchronize over; None is the default group.

    Example::

        >>> x = torch.randn(8, 4, 5, 5)
        >>> y = sync_batch_norm(x, None, None, training=True)
    """
    name = "syncbn.sync_batch_norm"
    if running_mean is None:
        _check_input(name, input, input.shape[1] if input.dim() >= 2 else -1)
    else:
        _check_input(name, input, running_mean.numel())
    return _batch_norm(
        input,
        running_mean,
        running_var,
        None,
        weight,
        bias,
        training=training,
        momentum=momentum,
        eps=eps,
        group=process_group,
        name=name,
    )


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose batch statistics span every rank of a process group.

    A drop-in for :class:`torch.nn.BatchNorm1d`/``2d``/``3d`` and :class:`torch.nn.SyncBatchNorm`
    that runs on CPU with Gloo as well as on CUDA (see the README on GPUs). For an input ``x`` of shape
    ``(N, C, *)`` on each of the ``W`` ranks of the group, in training mode

    .. math::

        \mu_c = \frac{1}{M}\sum_{w,n,s} x^{(w)}_{n,c,s}, \qquad
        \sigma^2_c = \frac{1}{M}\sum_{w,n,s} (x^{(w)}_{n,c,s} - \mu_c)^2, \qquad
        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\,\gamma_c + \beta_c

    where ``M`` is the number of values of channel ``c`` on all ranks together, so uneven and
    empty batches are weighted by their counts. The forward makes one all_reduce of a float64
    vector of ``2C + 1`` values (sums, sums of squares, count); the backward one all_reduce of
    ``2C`` gradient sums. Running statistics follow torch: ``running_var`` stores the unbiased
    variance ``M / (M - 1) * sigma^2``, ``momentum=None`` is the cumulative average, and
    ``num_batches_tracked`` counts steps; every rank holds identical values. Eval mode uses the
    running statistics and never communicates. With no initialized group, or a group of one rank,
    it computes exactly what ``nn.BatchNorm`` computes.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages; None for a cumulative
            average. Default: 0.1.
        affine: learn per-channel ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: keep running averages for eval; if False, eval also uses batch
            statistics (without communicating). Default: True.
        process_group: group whose ranks share statistics; None is the default group.
        device, dtype: factory kwargs for parameters and buffers.
        bias: with ``affine=True``, also learn ``bias``; False leaves ``self.bias`` None (a
            learnt scale without a shift), as torch's ``bias=False``. Accepted on every
            supported torch version. Default: True.
        min_count: fewest values per channel (over the group) to compute batch statistics from.
            Default: 2.
        fallback: what to do below ``min_count``: ``"raise"`` a ``ValueError`` on every rank, or
            ``"running"`` to normalize with the running statistics (no update). Default: "raise".
        debias: update the running statistics with the adaptive rate
            ``momentum / (1 - (1 - momentum)**t)``, the bias-corrected average of a
            zero-initialised EMA. Default: False.

    The positional arguments are those of :class:`torch.nn.SyncBatchNorm` (``process_group``
    before ``device`` and ``dtype``); everything from ``bias`` on is keyword-only. In training a
    layer that tracks running statistics adds 1 to ``num_batches_tracked`` at every forward, as
    torch's layers do, whatever the batch holds: also when it is empty on this rank or on every
    rank, or below ``min_count``; the running averages change only when the group's batch has at
    least ``min_count`` values per channel.

    Shape:
        - Input: ``(N, C, *)`` with at least 2 dims; ``N`` may differ across ranks and be 0.
        - Output: same shape, dtype and memory format as the input. Half inputs get float32
          statistics.

    Example::

        >>> # xdoctest: +SKIP("distributed")
        >>> torch.distributed.init_process_group("gloo")
        >>> bn = syncbn.SyncBatchNorm(64)
        >>> y = bn(torch.randn(2, 64, 32, 32))  # statistics of all ranks' samples together
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[comm.ProcessGroup] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        min_count: int = 2,
        fallback: str = "raise",
        debias: bool = False,
    ) -> None:
        bias_kwarg = {"bias": bias} if _TORCH_NORM_TAKES_BIAS else {}
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            **bias_kwarg,
        )
        if affine and not bias and not _TORCH_NORM_TAKES_BIAS:
            self.register_parameter("bias", None)
        self.process_group = process_group
        self.min_count = min_count
        self.fallback = fallback
        self.debias = debias
        # Set by syncbn.accumulate_bn_stats / recompute_bn_stats to collect statistics instead of
        # updating the running averages; None in normal use.
        self.stats_sink: Optional[StatsSink] = None
        # Module path within the converted model, set by convert_sync_bn ("" when built directly).
        self.layer_path = ""
        _check_options(self._layer_name(), min_count, fallback)

    @property
    def process_group(self) -> Optional[comm.ProcessGroup]:
        """The group whose ranks share statistics (None: the default group)."""
        return self._group_ref.value

    @process_group.setter
    def process_group(self, group: Optional[comm.ProcessGroup]) -> None:
        # Held through a GroupRef so that copy.deepcopy (EMA models) and pickling keep working.
        self._group_ref = comm.GroupRef(group)

    def _layer_name(self) -> str:
        # convert_sync_bn records where the layer sits, so messages (and consistency mode) can
        # tell apart layers of the same class and width.
        path = self.layer_path
        where = f" at {path!r}" if path else ""
        return f"{type(self).__name__}({self.num_features}){where}"

    def _check_input_dim(self, input: Tensor) -> None:
        _check_input(self._layer_name(), input, self.num_features)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: Optional[comm.ProcessGroup] = None
    ) -> nn.Module:
        """:func:`syncbn.convert_sync_bn` under torch's name, ``nn.SyncBatchNorm.convert_sync_batchnorm``.

        Replaces every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by a
        :class:`SyncBatchNorm` synchronized over ``process_group`` (None: the default group),
        sharing the same Parameter and buffer objects, so code written for torch keeps working
        with ``nn.SyncBatchNorm`` changed to ``syncbn.SyncBatchNorm``. Returns ``module`` changed
        in place, or a new layer when ``module`` itself is a batch norm. For syncbn's own options
        (``min_count``, ``fallback``, ``debias``, ``renorm``) call :func:`syncbn.convert_sync_bn`.

        Example::

            >>> model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
        """
        from .convert import convert_sync_bn  # convert imports this module

        return convert_sync_bn(module, process_group)

    def reset_parameters(self) -> None:
        # torch's, but also right on torch versions whose own does not expect bias=False.
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.affine and self.bias is None and "bias=" not in extra:
            extra = extra.replace(", track_running_stats", ", bias=False, track_running_stats")
        if self.min_count != 2 or self.fallback != "raise":
            extra += f", min_count={self.min_count}, fallback={self.fallback!r}"
        if self.debias:
            extra += ", debias=True"
        return extra

    def forward(self, input: Tensor) -> Tensor:
        name = self._layer_name()
        _check_input(name, input, self.num_features)
        _check_eps(name, self.eps, self.training or self.running_mean is None)
        return _batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            group=self.process_group,
            name=name,
            min_count=self.min_count,
            fallback=self.fallback,
            debias=self.debias,
            renorm=self._renorm_limits(),
            stats_sink=self.stats_sink,
        )

    def _renorm_limits(self) -> Optional[tuple[float, float]]:
        """Batch Renormalization's ``(r_max, d_max)`` for this call; None for plain batch norm."""
        return None
