"""Batch Renormalization (Ioffe 2017) with statistics synchronized across a process group."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import comm
from . import functional as BF
from .batchnorm import SyncBatchNorm

__all__ = ["SyncBatchRenorm", "RenormSchedule"]


class RenormSchedule:
    """The paper's warm-up and linear relaxation of Batch Renormalization's clip limits.

    For a training step ``t`` (the number of steps already taken) and final limits ``r_max``,
    ``d_max``:

    - ``t < warmup``: ``(1, 0)``, plain batch normalization;
    - then ``r_max(t) = 1 + (r_max - 1) * min(1, (t - warmup) / (r_max_at - warmup))`` and
      ``d_max(t) = d_max * min(1, (t - warmup) / (d_max_at - warmup))``: linear ramps that reach the
      final values at steps ``r_max_at`` and ``d_max_at`` and never pass them.

    The schedule holds no state: :class:`SyncBatchRenorm` reads ``t`` from its
    ``num_batches_tracked`` buffer, so the position in the schedule is saved with the checkpoint.

    Args:
        warmup: steps of plain batch normalization. Default: 5000.
        r_max_at: step at which ``r_max`` reaches its final value; at least ``warmup``. Default: 40000.
        d_max_at: step at which ``d_max`` reaches its final value; at least ``warmup``. Default: 25000.

    Example::

        >>> sched = RenormSchedule(warmup=5000, r_max_at=40000, d_max_at=25000)
        >>> sched.limits(22500, r_max=3.0, d_max=5.0)
        (2.0, 4.375)
    """

    def __init__(self, warmup: int = 5000, r_max_at: int = 40000, d_max_at: int = 25000) -> None:
        if warmup < 0:
            raise ValueError(f"RenormSchedule: expected warmup >= 0, got {warmup}")
        for name, at in (("r_max_at", r_max_at), ("d_max_at", d_max_at)):
            if at < warmup:
                raise ValueError(
                    f"RenormSchedule: expected {name} >= warmup ({warmup}), got {at}"
                )
        self.warmup = int(warmup)
        self.r_max_at = int(r_max_at)
        self.d_max_at = int(d_max_at)

    def _progress(self, step: int, at: int) -> float:
        if step < self.warmup:
            return 0.0
        if step >= at:
            return 1.0
        return (step - self.warmup) / (at - self.warmup)

    def limits(
        self, step: Union[int, Tensor], r_max: float, d_max: float
    ) -> tuple[Union[float, Tensor], Union[float, Tensor]]:
        """The ``(r_max, d_max)`` clip limits in force at training step ``step``.

        ``step`` may be a tensor (a layer's ``num_batches_tracked``): then the limits come back as
        0-dim float64 tensors on its device, the same values computed without reading it on the
        host (as a compiled or captured training step needs).
        """
        if isinstance(step, Tensor):
            return self._tensor_limits(step, r_max, d_max)
        pr = self._progress(step, self.r_max_at)
        pd = self._progress(step, self.d_max_at)
        # The final values exactly once reached (no 1-ulp overshoot from 1 + (r_max - 1) * 1.0).
        r = r_max if pr >= 1.0 else min(1.0 + (r_max - 1.0) * pr, r_max)
        d = d_max if pd >= 1.0 else min(d_max * pd, d_max)
        return r, d

    def _tensor_limits(self, step: Tensor, r_max: float, d_max: float) -> tuple[Tensor, Tensor]:
        t = step.to(torch.float64)

        def progress(at: int) -> Tensor:
            if at == self.warmup:
                return (t >= at).to(torch.float64)
            return ((t - self.warmup) / (at - self.warmup)).clamp(0.0, 1.0)

        pr, pd = progress(self.r_max_at), progress(self.d_max_at)
        r = torch.where(pr >= 1.0, r_max, torch.clamp(1.0 + (r_max - 1.0) * pr, max=r_max))
        d = torch.where(pd >= 1.0, d_max, torch.clamp(d_max * pd, max=d_max))
        return r, d

    def __repr__(self) -> str:
        return (
            f"RenormSchedule(warmup={self.warmup}, r_max_at={self.r_max_at}, "
            f"d_max_at={self.d_max_at})"
        )


class SyncBatchRenorm(SyncBatchNorm):
    r"""Batch Renormalization whose batch statistics span every rank of a process group.

    In training mode, with ``mu_B`` and the biased ``sigma_B^2`` of the whole group's batch (as in
    :class:`SyncBatchNorm`) and the running statistics ``mu``, ``sigma^2`` *before* this step's
    update:

    .. math::

        \sigma_B = \sqrt{\sigma_B^2 + \epsilon}, \qquad \sigma = \sqrt{\sigma^2 + \epsilon}, \qquad
        r = \mathrm{clip}\!\left(\frac{\sigma_B}{\sigma}, \frac{1}{r_{max}}, r_{max}\right), \qquad
        d = \mathrm{clip}\!\left(\frac{\mu_B - \mu}{\sigma}, -d_{max}, d_{max}\right)

    .. math::

        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    ``r`` and ``d`` are constants for autograd (gradients flow through ``mu_B`` and ``sigma_B``
    as in batch norm). Eval mode is exactly batch-norm eval with the running statistics, which
    are updated as torch does (unbiased ``running_var``) and are identical on every rank. With
    ``r_max=1`` and ``d_max=0`` it computes what :class:`SyncBatchNorm` computes. The forward and
    backward make the same single all_reduce each as :class:`SyncBatchNorm`.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variances for stability. Default: 1e-5.
        momentum: weight of the new batch in the running averages (``None``: cumulative
            average). The paper uses a small value, as the running statistics enter the training
            output. Default: 0.01.
        affine: learn per-channel ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: must be True at construction, as ``r`` and ``d`` compare the batch
            with the running statistics. Switched off on a built layer (fine-tuning), training
            uses the batch statistics without ``r`` and ``d`` and updates no buffers, as torch's
            layers do. Default: True.
        process_group: group whose ranks share statistics; None is the default group.
        device, dtype: factory kwargs for parameters and buffers.
        bias: with ``affine=True``, also learn ``bias``; False leaves ``self.bias`` None, as
            torch's ``bias=False``. Default: True.
        r_max: final limit of ``r``, at least 1. Default: 3.0.
        d_max: final limit of ``|d|``, at least 0. Default: 5.0.
        schedule: a :class:`RenormSchedule` (or any object with ``limits(step, r_max, d_max)``)
            that ramps the limits from plain batch norm up to ``r_max``/``d_max``, stepped by
            ``num_batches_tracked``; None applies ``r_max``/``d_max`` from the first step.
        min_count, fallback, debias: as in :class:`SyncBatchNorm`.

    The positional arguments are those of :class:`SyncBatchNorm` and
    :class:`torch.nn.SyncBatchNorm`; everything from ``bias`` on is keyword-only. ``forward``
    takes a ``mask`` as :class:`SyncBatchNorm` does.

    Shape:
        - Input: ``(N, C, *)`` with at least 2 dims; ``N`` may differ across ranks and be 0.
        - Output: same shape as the input.

    Buffers and ``state_dict`` keys are those of ``nn.BatchNorm2d``; the schedule's step counter is
    ``num_batches_tracked``, so resuming from a checkpoint resumes the schedule.

    Example::

        >>> # xdoctest: +SKIP("distributed")
        >>> bn = syncbn.SyncBatchRenorm(64, schedule=syncbn.RenormSchedule(5000, 40000, 25000))
        >>> y = bn(torch.randn(2, 64, 32, 32))
        >>> bn.current_limits()  # (r_max, d_max) for the next step
        (1.0, 0.0)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[comm.ProcessGroup] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        schedule: Optional[RenormSchedule] = None,
        min_count: int = 2,
        fallback: str = "raise",
        debias: bool = False,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__}({num_features}): expected track_running_stats=True (Batch "
                "Renormalization corrects the batch statistics towards the running ones), got False; "
                "use syncbn.SyncBatchNorm(track_running_stats=False) for batch statistics only"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            process_group,
            device,
            dtype,
            bias=bias,
            min_count=min_count,
            fallback=fallback,
            debias=debias,
        )
        name = self._layer_name()
        if not r_max >= 1.0:
            raise ValueError(f"{name}: expected r_max >= 1, got {r_max}")
        if not d_max >= 0.0:
            raise ValueError(f"{name}: expected d_max >= 0, got {d_max}")
        if schedule is not None and not callable(getattr(schedule, "limits", None)):
            raise ValueError(
                f"{name}: expected schedule to be None or have a limits(step, r_max, d_max) method "
                f"(e.g. syncbn.RenormSchedule), got {type(schedule).__name__}"
            )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.schedule = schedule

    def current_limits(self) -> tuple[float, float]:
        """The ``(r_max, d_max)`` the next training step uses, from the schedule and step counter."""
        if self.schedule is None:
            return self.r_max, self.d_max
        step = int(self.num_batches_tracked.item())
        return self.schedule.limits(step, self.r_max, self.d_max)

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
        if self.schedule is not None:
            extra += f", schedule={self.schedule!r}"
        return extra

    def _renorm_limits(self) -> Optional[tuple[Union[float, Tensor], Union[float, Tensor]]]:
        if not (self.training and self.track_running_stats):
            return None
        if isinstance(self.schedule, RenormSchedule):
            # Stepped on the device: no host read of the step counter in a training forward.
            return self.schedule.limits(BF.snapshot(self.num_batches_tracked), self.r_max, self.d_max)
        return self.current_limits()
