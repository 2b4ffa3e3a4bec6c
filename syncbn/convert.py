"""Swap batch-norm layers of an existing model for synchronized, renormalized, frozen or group-norm ones, and back."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import comm
from .batchnorm import SyncBatchNorm, _check_options
from .micro_batch import FrozenBatchNorm
from .renorm import SyncBatchRenorm

__all__ = [
    "convert_sync_bn",
    "revert_sync_bn",
    "BatchNormNd",
    "freeze_bn",
    "unfreeze_bn",
    "convert_bn_to_gn",
]

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


def _where(name: str) -> str:
    return repr(name) if name else "the root module"


def _check_layers(
    module: nn.Module,
    caller: str,
    check: Callable[[_BatchNorm], Optional[str]],
    kinds: tuple[type, ...] = (_BatchNorm,),
) -> None:
    """Raise ``ValueError`` for the first layer of ``kinds`` in ``module`` that ``check`` objects to.

    Runs over the whole model before anything is replaced, so an error leaves the model untouched.
    """
    for name, m in module.named_modules():
        if not isinstance(m, kinds):
            continue
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            problem = "got an uninitialized lazy layer; run one forward pass first"
        else:
            problem = check(m)
        if problem:
            raise ValueError(f"{caller}: {type(m).__name__} at {_where(name)}: {problem}")


# Keys convert_sync_bn(renorm={...}) accepts.
_RENORM_KEYS = ("r_max", "d_max", "schedule", "momentum")


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
    renorm: Union[bool, Mapping[str, Any]] = False,
) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by :class:`SyncBatchNorm`.

    Recursive; the new layers reuse the same Parameter and buffer objects, so an optimizer built
    before the conversion stays valid, and carry eps, momentum, affine, track_running_stats, the
    training flag, requires_grad, device, dtype and qconfig. Each synchronized layer records its
    module path (``layer_path``), which error messages and consistency mode name. Returns
    ``module`` changed in place, or a new module when ``module`` itself is a batch norm.
    :func:`revert_sync_bn` undoes it.

    Args:
        module: the model.
        process_group: group whose ranks share statistics; None is the default group.
        min_count, fallback, debias: passed to every new :class:`SyncBatchNorm`.
        renorm: build :class:`SyncBatchRenorm` layers instead. ``True`` uses its defaults
            (``r_max=3``, ``d_max=5``, no schedule); a dict sets any of ``r_max``, ``d_max``,
            ``schedule`` (one :class:`RenormSchedule` shared by all layers; each layer steps it
            with its own ``num_batches_tracked``) and ``momentum`` (default: each layer keeps its
            own; the paper uses a small one such as 0.01). Every converted layer must track
            running statistics. Default: False.

    Raises:
        ValueError: bad ``renorm`` keys, or ``renorm`` with a layer without running statistics;
            raised before the model is changed.

    Example::

        >>> model = syncbn.convert_sync_bn(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        >>> # Batch Renormalization with the paper's schedule:
        >>> model = syncbn.convert_sync_bn(
        ...     model, renorm={"schedule": syncbn.RenormSchedule(5000, 40000, 25000), "momentum": 0.01}
        ... )
    """
    caller = "syncbn.convert_sync_bn"
    _check_options(caller, min_count, fallback)
    renorm_opts: Optional[dict] = None
    if renorm is True:
        renorm_opts = {}
    elif isinstance(renorm, Mapping):
        renorm_opts = dict(renorm)
        unknown = sorted(set(renorm_opts) - set(_RENORM_KEYS))
        if unknown:
            raise ValueError(f"{caller}: expected renorm keys among {_RENORM_KEYS}, got {unknown}")
        if not renorm_opts.get("r_max", 1.0) >= 1.0 or not renorm_opts.get("d_max", 0.0) >= 0.0:
            raise ValueError(
                f"{caller}: expected renorm r_max >= 1 and d_max >= 0, got "
                f"r_max={renorm_opts.get('r_max')}, d_max={renorm_opts.get('d_max')}"
            )
    elif renorm is not False and renorm is not None:
        raise ValueError(f"{caller}: expected renorm to be a bool or a dict, got {type(renorm).__name__}")
    if renorm_opts is not None:
        _check_layers(
            module,
            caller,
            lambda m: None
            if m.track_running_stats
            else "expected track_running_stats=True for Batch Renormalization, got False",
            _CONVERTIBLE,
        )

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, _CONVERTIBLE):
            return m
        new: SyncBatchNorm
        if renorm_opts is not None:
            opts = dict(renorm_opts)
            new = SyncBatchRenorm(
                m.num_features,
                m.eps,
                opts.pop("momentum", m.momentum),
                m.affine,
                process_group,
                min_count=min_count,
                fallback=fallback,
                debias=debias,
                **opts,
                **_factory_kwargs(m),
            )
        else:
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
        new._syncbn_original_group = comm.GroupRef(getattr(m, "process_group", None))
        return _carry_state(m, new)

    converted = _map_modules(module, replace)
    for path, m in converted.named_modules():
        if isinstance(m, SyncBatchNorm):
            m.layer_path = path  # named in error messages and consistency checks
    return converted


def revert_sync_bn(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` (and :class:`SyncBatchRenorm`) in ``module`` back into a plain torch batch norm.

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
            args += (getattr(m, "_syncbn_original_group", comm.GroupRef()).value,)
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


def freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`FrozenBatchNorm` with its current values.

    Torch's and syncbn's batch norms alike (``BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    :class:`SyncBatchNorm`, :class:`SyncBatchRenorm`, :class:`BatchNormNd`) become fixed per-channel
    affine maps that equal their eval output in every mode, never update and never communicate:
    for fine-tuning with tiny batches. The frozen layers' buffers share memory with the original
    weight, bias and running statistics, so their ``state_dict`` keys and values are unchanged
    (``weight``/``bias`` become buffers, so they leave ``module.parameters()``). Returns ``module``
    changed in place, or a new module when ``module`` itself is a batch norm.
    :func:`unfreeze_bn` undoes it.

    Raises:
        ValueError: a batch norm without running statistics (nothing to freeze), raised before
            the model is changed.

    Example::

        >>> backbone = syncbn.freeze_bn(torchvision.models.resnet50(weights="DEFAULT"))
    """
    _check_layers(
        module,
        "syncbn.freeze_bn",
        lambda m: None
        if m.track_running_stats
        else "expected track_running_stats=True (running statistics to freeze), got False",
    )

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, _BatchNorm):
            return m
        frozen = FrozenBatchNorm(m.num_features, m.eps, m.affine, **_factory_kwargs(m))
        if m.affine:
            frozen.weight = m.weight.detach()
            frozen.bias = m.bias.detach()
        frozen.running_mean = m.running_mean
        frozen.running_var = m.running_var
        frozen.num_batches_tracked = m.num_batches_tracked
        frozen.training = m.training
        # Kept outside the module tree (no parameters, buffers or state_dict entries) so that
        # unfreeze_bn can give back the original layer with its Parameter objects.
        frozen.__dict__["_syncbn_unfrozen"] = m
        return frozen

    return _map_modules(module, replace)


def unfreeze_bn(module: nn.Module) -> nn.Module:
    """Turn every :class:`FrozenBatchNorm` in ``module`` back into a trainable batch norm.

    A layer made by :func:`freeze_bn` becomes its original layer again: the same class, options
    and Parameter objects (so an optimizer built before freezing stays valid, with the original
    ``requires_grad``), holding the frozen layer's current values and training flag. A
    :class:`FrozenBatchNorm` built directly becomes a :class:`BatchNormNd` with the same ``affine``.

    Example::

        >>> model = syncbn.unfreeze_bn(model)  # fine-tune the normalization layers too
    """

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, FrozenBatchNorm):
            return m
        original = m.__dict__.get("_syncbn_unfrozen")
        if original is None:
            kw = {"device": m.running_mean.device, "dtype": m.running_mean.dtype}
            original = BatchNormNd(m.num_features, m.eps, affine=m.affine, **kw)
        if original.affine:
            original.weight.data = m.weight
            original.bias.data = m.bias
        original.running_mean = m.running_mean
        original.running_var = m.running_var
        original.num_batches_tracked = m.num_batches_tracked
        original.eps = m.eps
        original.training = m.training
        return original

    return _map_modules(module, replace)


def convert_bn_to_gn(module: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every batch norm in ``module`` by ``nn.GroupNorm(num_groups, C)``.

    GroupNorm (Wu & He 2018) normalizes each sample over groups of ``C / num_groups`` channels, so
    it does not depend on the batch size at all: an alternative to synchronization at 1-2 samples
    per device. The affine parameters carry over (same Parameter objects; ``affine=False`` gives
    ``GroupNorm(affine=False)``), as do eps and the training flag; running statistics are dropped.
    Returns ``module`` changed in place, or a new module when ``module`` itself is a batch norm.

    Args:
        module: the model.
        num_groups: groups per layer; must divide every layer's channel count. Default: 32.

    Raises:
        ValueError: a layer's channel count is not divisible by ``num_groups``; raised before
            the model is changed.

    Example::

        >>> model = syncbn.convert_bn_to_gn(torchvision.models.resnet50(), num_groups=32)
    """
    caller = "syncbn.convert_bn_to_gn"
    if not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"{caller}: expected num_groups to be a positive int, got {num_groups!r}")

    def indivisible(m: _BatchNorm) -> Optional[str]:
        c = m.num_features
        if c % num_groups == 0:
            return None
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        return (
            f"expected a channel count divisible by num_groups={num_groups}, got {c} channels; "
            f"pass a num_groups that divides every layer's channel count (divisors of {c}: {divisors})"
        )

    _check_layers(module, caller, indivisible)

    def replace(m: nn.Module) -> nn.Module:
        if not isinstance(m, _BatchNorm):
            return m
        gn = nn.GroupNorm(num_groups, m.num_features, m.eps, m.affine, **_factory_kwargs(m))
        if m.affine:
            gn.weight = m.weight
            gn.bias = m.bias
        gn.training = m.training
        return gn

    return _map_modules(module, replace)
