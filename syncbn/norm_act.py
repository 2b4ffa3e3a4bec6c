"""Norm + activation layers: a batch norm followed by the ``drop`` and ``act`` modules it carries.

timm builds most of its convolutional networks (EfficientNet, MobileNetV3, RegNet, CSPNet, DenseNet,
...) from ``timm.layers.BatchNormAct2d``: a subclass of ``nn.BatchNorm2d`` whose forward is batch
norm, then ``self.drop``, then ``self.act``. A converter that swaps it for a plain batch norm keeps
``drop`` and ``act`` as children nobody calls, and the activations vanish. The layers here are what
syncbn's converters build from such a layer: each keeps the original ``drop`` and ``act`` module
objects and applies them after its own normalization, so a conversion never changes what the model
computes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _masking, comm
from ._compat import NORM_TAKES_BIAS
from .batchnorm import SyncBatchNorm, check_input
from .frozen import FrozenBatchNorm
from .renorm import SyncBatchRenorm

__all__ = ["SyncBatchNormAct", "SyncBatchRenormAct", "FrozenBatchNormAct", "BatchNormAct", "GroupNormAct"]


class _DropAct:
    """Mixin: ``forward(x) = act(drop(<the normalization's forward>(x)))``.

    ``drop`` and ``act`` are child modules; one that is absent is the identity (timm's
    ``SyncBatchNormAct`` may lack either), so a converted layer holds exactly the children of its
    source. With a mask (``mask=`` or :func:`syncbn.masked`), padded positions stay 0 after
    ``act`` too (an activation such as sigmoid would otherwise move them).
    """

    def _init_drop_act(self, drop: Optional[nn.Module], act: Optional[nn.Module]) -> None:
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        norm = super().forward  # type: ignore[misc]
        masked = isinstance(self, (SyncBatchNorm, FrozenBatchNorm))
        if masked:
            name = f"{type(self).__name__}({self.num_features})"  # type: ignore[attr-defined]
            mask = _masking.resolve(name, self, input, mask)
            out = norm(input, mask)
        elif mask is not None:
            raise ValueError(f"{type(self).__name__}: expected no mask (only synchronized and frozen layers take one)")
        else:
            out = norm(input)
        modules = self._modules  # type: ignore[attr-defined]
        if modules.get("drop") is not None:
            out = modules["drop"](out)
        if modules.get("act") is not None:
            out = modules["act"](out)
        if mask is not None:
            out = torch.where(mask.unsqueeze(1) if out.dim() > 1 else mask, out, 0)
        return out


class SyncBatchNormAct(_DropAct, SyncBatchNorm):
    r""":class:`~syncbn.SyncBatchNorm` followed by a dropout and an activation module.

    .. math::

        y = \mathrm{act}(\mathrm{drop}(\mathrm{SyncBatchNorm}(x)))

    with the statistics of the whole process group (see :class:`~syncbn.SyncBatchNorm`).
    :func:`syncbn.convert_sync_bn` builds it from timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``,
    passing the original layer's own ``drop`` and ``act`` objects; :func:`syncbn.revert_sync_bn`
    gives back the timm layer. The ``state_dict`` keys are those of a batch norm plus whatever
    ``drop`` and ``act`` hold (timm's layers have the same).

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group: as
            :class:`~syncbn.SyncBatchNorm`.
        act: applied last; None for identity (no child module). Default: None.
        drop: applied between normalization and activation (e.g. ``nn.Dropout``); None for
            identity (no child module). Default: None.
        **kwargs: the keyword options of :class:`~syncbn.SyncBatchNorm` (``min_count``,
            ``fallback``, ``debias``, ``device``, ``dtype``).

    Shape:
        - Input: ``(N, C, *)``; Output: what ``act`` makes of the normalized ``(N, C, *)``.

    Example::

        >>> layer = syncbn.SyncBatchNormAct(16, act=torch.nn.SiLU())
        >>> y = layer(torch.randn(4, 16, 8, 8))  # SiLU(batch norm over every rank's samples)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[comm.ProcessGroup] = None,
        *,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, **kwargs)
        self._init_drop_act(drop, act)


class SyncBatchRenormAct(_DropAct, SyncBatchRenorm):
    r""":class:`~syncbn.SyncBatchRenorm` followed by a dropout and an activation module.

    What ``convert_sync_bn(model, renorm=...)`` builds from timm's ``BatchNormAct2d``:
    ``y = act(drop(SyncBatchRenorm(x)))``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group: as
            :class:`~syncbn.SyncBatchRenorm` (the positional order of :class:`~syncbn.SyncBatchNorm`).
        act, drop: as :class:`SyncBatchNormAct`.
        **kwargs: the keyword options of :class:`~syncbn.SyncBatchRenorm` (``r_max``, ``d_max``,
            ``schedule``, ``min_count``, ``fallback``, ``debias``, ``device``, ``dtype``).

    Example::

        >>> layer = syncbn.SyncBatchRenormAct(16, act=torch.nn.ReLU(), r_max=2.0)
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[comm.ProcessGroup] = None,
        *,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, **kwargs)
        self._init_drop_act(drop, act)


class FrozenBatchNormAct(_DropAct, FrozenBatchNorm):
    r""":class:`~syncbn.FrozenBatchNorm` followed by a dropout and an activation module.

    ``y = act(drop(gamma * (x - mu) / sqrt(sigma^2 + eps) + beta))`` with fixed buffers: what
    :func:`syncbn.freeze_bn` builds from a norm-act layer, keeping its ``drop`` and ``act``.
    Same ``state_dict`` keys as the layer it froze; :func:`syncbn.unfreeze_bn` gives that layer back.

    Args:
        num_features, eps, affine, device, dtype: as :class:`~syncbn.FrozenBatchNorm`.
        act, drop: as :class:`SyncBatchNormAct`.

    Example::

        >>> layer = syncbn.FrozenBatchNormAct(16, act=torch.nn.ReLU())
        >>> y = layer(torch.randn(2, 16, 4, 4))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(num_features, eps, affine, device=device, dtype=dtype, bias=bias)
        self._init_drop_act(drop, act)


class BatchNormAct(_DropAct, _BatchNorm):
    """Local batch norm (torch's own forward) for any ``(N, C, *)`` input, then ``drop`` and ``act``.

    What :func:`syncbn.revert_sync_bn` turns a directly built :class:`SyncBatchNormAct` into, and
    :func:`syncbn.unfreeze_bn` a directly built :class:`FrozenBatchNormAct` (a layer converted from
    timm's ``BatchNormAct2d`` goes back to that class instead).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``nn.BatchNorm2d``.
        act, drop: as :class:`SyncBatchNormAct`.

    Example::

        >>> layer = syncbn.BatchNormAct(16, act=torch.nn.ReLU())
        >>> y = layer(torch.randn(4, 16, 8, 8))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        bias: bool = True,
    ) -> None:
        bias_kwarg = {"bias": bias} if NORM_TAKES_BIAS else {}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **bias_kwarg
        )
        if affine and not bias and not NORM_TAKES_BIAS:
            self.register_parameter("bias", None)
        self._init_drop_act(drop, act)

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(f"BatchNormAct({self.num_features})", input, self.num_features)


class GroupNormAct(_DropAct, nn.GroupNorm):
    """``nn.GroupNorm``, then ``drop`` and ``act``: what :func:`syncbn.convert_bn_to_gn` makes of a norm-act layer.

    The argument order is that of timm's ``GroupNormAct`` (channels first), not ``nn.GroupNorm``'s.

    Args:
        num_channels: ``C``, the number of channels.
        num_groups: groups to normalize over; must divide ``num_channels``. Default: 32.
        eps, affine, device, dtype: as ``nn.GroupNorm``.
        act, drop: as :class:`SyncBatchNormAct`.

    Example::

        >>> layer = syncbn.GroupNormAct(16, 4, act=torch.nn.ReLU())
        >>> y = layer(torch.randn(1, 16, 8, 8))
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self._init_drop_act(drop, act)
