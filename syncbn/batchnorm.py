"""SyncBatchNorm: batch normalization with statistics over a whole process group; its functional form; BatchNormNd."""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _compat, _config, _forward, _masking, comm
from . import _stats as ST
from ._compat import NORM_TAKES_BIAS
from ._forward import check_input

__all__ = ["SyncBatchNorm", "sync_batch_norm", "BatchNormNd"]

# Process-unique layer numbers: consistency mode counts each layer's calls by them.
_keys = itertools.count(1)


def check_eps(name: str, eps: float, batch_stats: bool) -> None:
    """``ValueError`` for an ``eps`` torch's ``F.batch_norm`` would refuse (checked before any collective)."""
    if batch_stats and not eps > 0:
        raise ValueError(
            f"{name}: eps must be positive during training (it keeps var + eps away from 0), got "
            f"{eps}; construct the layer with eps > 0 (default 1e-5)"
        )
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be non-negative, got {eps}; construct the layer with eps > 0")


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
    *,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Functional synchronized batch norm: :func:`torch.nn.functional.batch_norm` over a group.

    In training mode with an initialized group of more than one rank, the statistics are those of
    the concatenation of every rank's ``input``; ``running_mean``/``running_var`` (if given) are
    updated in place with ``momentum`` and the unbiased variance. Otherwise it equals
    ``F.batch_norm``. Every rank of the group must call it the same number of times.

    Args:
        input: ``(N, C, *)``, floating point.
        running_mean, running_var: ``(C,)`` buffers, or None to always use batch statistics.
        weight, bias: ``(C,)`` affine parameters, or None.
        training: use (and update) batch statistics.
        momentum: running-average factor.
        eps: added to the variance for stability.
        process_group: group to synchronize over; None is the default group.
        mask: bool ``(N, *input.shape[2:])``, True where a position holds data; statistics use
            those positions only and the output is 0 elsewhere (see :class:`SyncBatchNorm`).

    Raises:
        ValueError: on every rank, before any collective: an input that is not ``(N, C, *)``
            floating point, a mask of the wrong shape or dtype, ``eps <= 0`` in training, or
            ``weight``/``bias``/running buffers of a dtype torch's kernels refuse with the input's
            (they take the input's dtype, or float32 with a half input). On every rank after the
            forward's all_gather (the first point where the group's count is known): a group
            with 1 value per channel.

    Example::

        >>> x = torch.randn(8, 4, 5, 5)
        >>> y = sync_batch_norm(x, None, None, training=True)
    """
    name = "syncbn.sync_batch_norm"
    channels = running_mean.numel() if running_mean is not None else (input.shape[1] if input.dim() >= 2 else -1)
    if mask is not None:
        check_input(name, input, channels)
        ST.check_mask(name, input, mask)
    check_eps(name, eps, training or running_mean is None)
    return _forward.batch_norm(
        input, running_mean, running_var, None, weight, bias,
        training=training, track=training, momentum=momentum, eps=eps, group=process_group,
        name=name, mask=mask, num_features=channels,
    )


@torch.fx.wrap
def _fx_call(module: nn.Module, input: Tensor, mask: Optional[Tensor]) -> Tensor:
    """What an FX graph calls for a synchronized layer: the layer's forward, as a leaf.

    Its hooks are not called here: the tracer ran them around the traced forward, so the graph
    holds their effect already (calling the module would apply them twice).
    """
    return module.forward(input) if mask is None else module.forward(input, mask)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization whose batch statistics span every rank of a process group.

    A drop-in for :class:`torch.nn.BatchNorm1d`/``2d``/``3d`` and :class:`torch.nn.SyncBatchNorm`
    that runs on CPU with Gloo as well as on CUDA (see the GPU page of the docs). For an input ``x`` of shape
    ``(N, C, *)`` on each of the ``W`` ranks of the group, in training mode

    .. math::

        \mu_c = \frac{1}{M}\sum_{w,n,s} x^{(w)}_{n,c,s}, \qquad
        \sigma^2_c = \frac{1}{M}\sum_{w,n,s} (x^{(w)}_{n,c,s} - \mu_c)^2, \qquad
        y = \frac{x - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\,\gamma_c + \beta_c

    where ``M`` is the number of values of channel ``c`` on all ranks together, so uneven and
    empty batches are weighted by their counts. The forward makes one all_gather of each rank's
    ``3C + 3`` float64 statistics (mean as a corrected float64 pair, variance, count, whether its
    input needs a gradient, whether it corrected its mean), merged by every rank alike with the parallel-variance formula
    (``syncbn._stats.merge_rows``); the backward one all_reduce of ``2C + 1`` gradient sums,
    skipped on every rank when no rank's input needs a gradient. Running statistics follow torch:
    ``running_var`` stores the unbiased variance ``M / (M - 1) * sigma^2``, ``momentum=None`` is the
    cumulative average, ``num_batches_tracked`` counts steps, and switching
    ``track_running_stats`` off on a built layer makes training use and update no buffers; every
    rank holds identical values. Eval mode uses the running statistics and never communicates.
    With no initialized group, or a group of one rank, it computes exactly what ``nn.BatchNorm``
    computes.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages; None for a cumulative
            average. Default: 0.1.
        affine: learn per-channel ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: keep running averages for eval; if False at construction (no
            buffers), eval also uses batch statistics (each rank its own, without
            communicating). Switched off on a built layer, training uses batch statistics and
            leaves the buffers and the step count alone, and eval still uses the buffers, as in
            torch. Default: True.
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

    Masks. ``forward(input, mask)`` takes a bool ``mask`` of shape ``(N, *input.shape[2:])``, True
    where a position holds data (padded sequences): the statistics, their count, ``min_count``
    and the running averages use the valid positions of every rank only, gradients are the exact
    derivatives of that, and the output is 0 at padded positions, so padding never reaches a
    later layer (see "Masks for padded sequences" in the docs' semantics page). :func:`syncbn.masked` hands a mask to layers
    whose caller passes none.

    Shape:
        - Input: ``(N, C, *)`` with at least 2 dims; ``N`` may differ across ranks and be 0.
        - Mask (optional): ``(N, *)`` bool, the input's shape without the channel dim.
        - Output: same shape, dtype and memory format as the input. Half inputs get float32
          statistics.

    Raises:
        ValueError: on every rank, before any collective: an input that is not ``(N, C, *)``
            floating point, a bad mask, ``eps <= 0`` in training, or parameters/buffers of a
            dtype torch's kernels refuse with the input's (they take the input's dtype, or
            float32 with a half input). On every rank after the forward's all_gather (the first
            point where the group's count is known), with ``fallback="raise"``: a group with 1 to
            ``min_count - 1`` values per channel.

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
        bias_kwarg = {"bias": bias} if NORM_TAKES_BIAS else {}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **bias_kwarg
        )
        if affine and not bias and not NORM_TAKES_BIAS:
            self.register_parameter("bias", None)
        self.process_group = process_group
        self.min_count = min_count
        self.fallback = fallback
        self.debias = debias
        # Set by syncbn.accumulate_bn_stats / recompute_bn_stats to collect statistics instead of
        # updating the running averages; None in normal use.
        self._stats_sink: Optional[_forward.StatsSink] = None
        # Module path within the converted model, set by convert_sync_bn ("" when built directly).
        self._layer_path = ""
        self._syncbn_key = next(_keys)
        _forward.check_options(self._layer_name(), min_count, fallback)
        comm.prepare_token(self._device())

    def _device(self) -> Optional[torch.device]:
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.device
        return None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "SyncBatchNorm":
        # .to(), .cuda(), ...: the collectives' chain under torch.compile needs a token there.
        out = super()._apply(fn, *args, **kwargs)
        comm.prepare_token(self._device())
        return out

    @property
    def process_group(self) -> Optional[comm.ProcessGroup]:
        """The group whose ranks share statistics; None means the default group."""
        return self._group_ref.value

    @process_group.setter
    def process_group(self, group: Optional[comm.ProcessGroup]) -> None:
        if isinstance(group, (str, bool, int, float, torch.device, torch.dtype)):
            # nn.BatchNorm2d's 6th and 7th positional arguments are device and dtype; here (as in
            # nn.SyncBatchNorm) the 6th is the process group.
            raise TypeError(
                f"{type(self).__name__}: process_group must be a torch.distributed ProcessGroup or "
                f"None, got {group!r}; pass device and dtype by keyword (device=..., dtype=...)"
            )
        # Held through a GroupRef so that copy.deepcopy (EMA models) and pickling keep working.
        self._group_ref = comm.GroupRef(group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # A copy or an unpickled layer is another layer for consistency mode.
        self.__dict__["_syncbn_key"] = next(_keys)
        self.__dict__.setdefault("_stats_sink", None)
        self.__dict__.setdefault("_layer_path", "")

    def _layer_name(self) -> str:
        # convert_sync_bn records where the layer sits, so messages (and consistency mode) can
        # tell apart layers of the same class and width.
        path = self._layer_path
        where = f" at {path!r}" if path else ""
        return f"{type(self).__name__}({self.num_features}){where}"

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self._layer_name(), input, self.num_features)

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

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Normalize ``input`` ``(N, C, *)`` with the group's batch statistics (training) or the
        running statistics (eval); the output has ``input``'s shape, dtype and memory format.

        ``mask`` (bool, ``(N, *)``: the input's shape without the channel dim, True where a
        position holds data) restricts the statistics to the valid positions of every rank; the
        output is 0 elsewhere. Without it, a mask set by :func:`syncbn.masked` applies, if any.
        Raises ``ValueError`` as listed in the class docstring.
        """
        if _compat.is_fx_tracing():
            return _fx_call(self, input, mask)
        name = self._layer_name()
        if mask is not None or (_masking.active() and not (self.training and _config.debug())):
            # A mask is checked against the input's shape: the input first. (Otherwise the shared
            # forward checks it, after the ranks compared the call in consistency mode.)
            check_input(name, input, self.num_features)
        mask = _masking.resolve(name, self, input, mask)
        # torch's rule: training without track_running_stats uses (and updates) no buffers; eval
        # uses the buffers when there are any, else the batch's own statistics.
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        check_eps(name, self.eps, self.training or running_mean is None)
        return _forward.batch_norm(
            input,
            running_mean,
            running_var,
            self.num_batches_tracked,
            self.weight,
            self.bias,
            training=self.training,
            track=self.training and self.track_running_stats,
            momentum=self.momentum,
            eps=self.eps,
            group=self.process_group,
            name=name,
            key=self._syncbn_key,
            min_count=self.min_count,
            fallback=self.fallback,
            debias=self.debias,
            renorm=self._renorm_limits(),
            stats_sink=self._stats_sink,
            mask=mask,
            num_features=self.num_features,
        )

    def _renorm_limits(self) -> Optional[tuple[Any, Any]]:
        """Batch Renormalization's ``(r_max, d_max)`` for this call; None for plain batch norm."""
        return None


class BatchNormNd(_BatchNorm):
    """``nn.BatchNorm2d`` without the input-rank check: plain local batch norm for any ``(N, C, *)``.

    What :func:`syncbn.revert_sync_bn` turns a directly built :class:`SyncBatchNorm` into. Its
    ``state_dict`` keys are those of ``nn.BatchNorm2d``.

    Example::

        >>> bn = syncbn.BatchNormNd(4)
        >>> y = bn(torch.randn(8, 4, 3, 3, 3))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormNd: expected input of shape (N, C, *), got {tuple(input.shape)}")
