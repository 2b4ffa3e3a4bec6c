"""Swap batch-norm layers of an existing model for synchronized ones, and back."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm
from .batchnorm import SyncBatchNorm

__all__ = ["convert_sync_bn", "revert_sync_bn", "BatchNormNd"]

# The classes convert_sync_bn replaces; anything else (InstanceNorm, LazyBatchNorm, subclasses of
# our own layers) is left alone.
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _carry_state(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """Make ``dst`` share ``src``'s Parameter and buffer objects and flags (optimizer state stays valid)."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _map_modules(module: nn.Module, replace: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Apply ``replace`` to ``module`` and, recursively, to its children; return the new root."""
    out = replace(module)
    for name, child in module.named_children():
        out.add_module(name, _map_modules(child, replace))
    return out


def _factory_kwargs(module: _BatchNorm) -> dict:
    ref = module.weight if module.affine else module.running_mean
    return {"device": None, "dtype": None} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def convert_sync_bn(
    module: nn.Module,
    process_group: Optional[comm.ProcessGroup] = None,
    *,
    min_count: int = 2,
    fallback: str = "raise",
    debias: bool = False,
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by :class:`SyncBatchNorm`.

    Recursive; the new layers reuse the same Parameter and buffer objects, so an optimizer built
    before the conversion stays valid, and carry eps, momentum, affine, track_running_stats, the
    training flag, requires_grad, device, dtype and qconfig. Returns ``module`` changed in place,
    or a new module when ``module`` itself is a batch norm. :func:`revert_sync_bn` undoes it.

    Args:
        module: the model.
        process_group: group whose ranks share statistics; None is the default group.
        min_count, fallback, debias: passed to every new :class:`SyncBatchNorm`.

    Example::

        >>> model = syncbn.convert_sync_bn(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    """

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, _CONVERTIBLE):
            return m
        new = SyncBatchNorm(
            m.num_features,
            m.eps,
            m.momentum,
            m.affine,
            m.track_running_stats,
            process_group,
            min_count=min_count,
            fallback=fallback,
            debias=debias,
            **_factory_kwargs(m),
        )
        new._syncbn_original_class = type(m)
        new._syncbn_original_process_group = getattr(m, "process_group", None)
        return _carry_state(m, new)

    return _map_modules(module, replace)


def revert_sync_bn(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` in ``module`` back into a plain torch batch norm.

    A layer made by :func:`convert_sync_bn` returns to its exact original class (``BatchNorm1d``,
    ``2d``, ``3d`` or ``nn.SyncBatchNorm``); one built directly as :class:`SyncBatchNorm` becomes a
    :class:`BatchNormNd`, which accepts any ``(N, C, *)`` input. Same Parameter and buffer
    objects, same ``state_dict`` keys.

    Example::

        >>> model = syncbn.revert_sync_bn(model)  # e.g. before exporting for single-device inference
    """

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, SyncBatchNorm):
            return m
        cls = getattr(m, "_syncbn_original_class", BatchNormNd)
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if cls is nn.SyncBatchNorm:
            args += (getattr(m, "_syncbn_original_process_group", None),)
        return _carry_state(m, cls(*args, **_factory_kwargs(m)))

    return _map_modules(module, replace)


class BatchNormNd(_BatchNorm):
    """``nn.BatchNorm2d`` without the input-rank check: plain local batch norm for any ``(N, C, *)``.

    What :func:`revert_sync_bn` turns a directly built :class:`SyncBatchNorm` into. Its
    ``state_dict`` keys are those of ``nn.BatchNorm2d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormNd: expected input of shape (N, C, *), got {tuple(input.shape)}")
