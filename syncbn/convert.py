"""Swap batch-norm layers of an existing model for synchronized, renormalized, frozen or group-norm ones, and back.

Every converter here works from one table of rules, "exact source class -> how to build the target
and carry the state", looked up by ``type(layer)``, never by ``isinstance``: a subclass may compute
something else (timm's ``BatchNormAct2d`` adds an activation), and a converter that does not know a
class must not guess. The promise: **a conversion never changes what a model computes in one
process.** A batch-norm subclass that no rule covers and whose ``forward`` is not the one it
inherits from torch (or from syncbn) is refused, before anything changes, unless the caller passes
``skip_unknown=True`` or registers a rule with :func:`register_conversion`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import comm
from ._forward import check_options
from ._rules import (
    FREEZE,
    GROUP_NORM,
    INVERSE,
    LEAVE,
    REVERT,
    SOURCE,
    SYNC,
    UNFREEZE,
    UNKNOWN,
    DOMAIN,
    ConversionContext,
    Rule,
    qualname,
    rule_for,
)
from ._carry import restore
from .batchnorm import SyncBatchNorm
from .renorm import SyncBatchRenorm

__all__ = [
    "convert_sync_bn",
    "revert_sync_bn",
    "freeze_bn",
    "unfreeze_bn",
    "convert_bn_to_gn",
]


# ---------------------------------------------------------------------------------------------
# The walk every converter shares
# ---------------------------------------------------------------------------------------------


def _where(name: str) -> str:
    return repr(name) if name else "the root module"


def _convert(
    module: nn.Module,
    converter: str,
    caller: str,
    *,
    skip_unknown: bool = False,
    process_group: Optional[comm.ProcessGroup] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Plan every layer's rule and check the whole model first, then build; return the new root.

    An error therefore leaves the model untouched.
    """
    options = dict(options or {})
    plan: dict[int, tuple[Rule, ConversionContext]] = {}
    unknown: list[tuple[str, type]] = []
    for path, m in module.named_modules():
        if isinstance(m, DOMAIN[converter]) and isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            # After its first forward a lazy layer becomes its torch class (LazyBatchNorm2d -> BatchNorm2d).
            problem = "got an uninitialized lazy layer; run one forward pass first"
            raise ValueError(f"{caller}: {type(m).__name__} at {_where(path)}: {problem}")
        rule = rule_for(converter, m)
        if rule is None or rule == LEAVE:
            continue
        if rule == UNKNOWN:
            unknown.append((path, type(m)))
            continue
        assert isinstance(rule, Rule)
        ctx = ConversionContext(converter, path, process_group, options, rule.like)
        problem = rule.check(m, ctx) if rule.check is not None else None
        if problem:
            raise ValueError(f"{caller}: {type(m).__name__} at {_where(path)}: {problem}")
        plan[id(m)] = (rule, ctx)
    if unknown:
        _report_unknown(caller, converter, unknown, skip_unknown)

    done: dict[int, nn.Module] = {}

    def replace(m: nn.Module) -> nn.Module:
        if id(m) in done:  # a layer shared by two parents stays shared
            return done[id(m)]
        kept = m.__dict__.get(SOURCE)
        if converter in INVERSE and kept is not None and kept[0] == INVERSE[converter]:
            new = restore(m, kept[1])
            del m.__dict__[SOURCE]
        elif id(m) in plan:
            rule, ctx = plan[id(m)]
            new = rule.build(m, ctx)
            if rule.keep_source and new is not m:
                new.__dict__[SOURCE] = (converter, m)
        else:
            return m
        done[id(m)] = new
        return new

    return _map_modules(module, replace)


def _map_modules(module: nn.Module, replace: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Apply ``replace`` to ``module`` and, recursively, to its children; return the new root.

    A replaced layer is final: its rule already carried its children.
    """
    out = replace(module)
    if out is not module:
        return out
    for name, child in module.named_children():
        new = _map_modules(child, replace)
        if new is not child:
            module.add_module(name, new)
    return module


def _report_unknown(caller: str, converter: str, unknown: list[tuple[str, type]], skip: bool) -> None:
    layers = ", ".join(f"{_where(p)} ({qualname(c)})" for p, c in unknown)
    first = unknown[0][1].__name__
    if skip:
        warnings.warn(
            f"{caller}: left {len(unknown)} layer(s) unchanged whose class has no conversion rule "
            f"and overrides forward(): {layers}",
            UserWarning,
            stacklevel=3,
        )
        return
    if converter in INVERSE:
        remedy = "pass skip_unknown=True to leave them as they are (one warning lists them)"
    else:
        arg = {SYNC: "sync", FREEZE: "freeze", GROUP_NORM: "group_norm"}[converter]
        remedy = (
            f"register a rule: syncbn.register_conversion({first}, like=torch.nn.BatchNorm2d) if its "
            f"forward computes plain batch norm, or syncbn.register_conversion({first}, {arg}=build) "
            f"with build(layer, ctx) returning the new layer; or pass skip_unknown=True to leave "
            f"them as they are (one warning lists them)"
        )
    raise ValueError(
        f"{caller}: expected batch-norm layers whose forward() is torch's or has a conversion "
        f"rule, got {len(unknown)} whose class overrides it: {layers}. Converting them could change "
        f"what the model computes, so nothing was changed. To proceed, {remedy}."
    )


# ---------------------------------------------------------------------------------------------
# Public converters
# ---------------------------------------------------------------------------------------------

# Keys convert_sync_bn(renorm={...}) accepts.
_RENORM_KEYS = ("r_max", "d_max", "schedule", "momentum")


def convert_sync_bn(
    module: nn.Module,
    process_group: Optional[comm.ProcessGroup] = None,
    *,
    min_count: int = 2,
    fallback: str = "raise",
    debias: bool = False,
    renorm: Union[bool, Mapping[str, Any]] = False,
    skip_unknown: bool = False,
) -> nn.Module:
    """Replace every batch norm in ``module`` by a synchronized one that computes the same thing.

    ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` and subclasses that keep torch's ``forward``
    become :class:`SyncBatchNorm`; timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (batch norm,
    then dropout, then activation) become :class:`SyncBatchNormAct`, which applies the original
    layer's own ``drop`` and ``act`` modules. Classes are looked up exactly, so in one process the
    converted model computes what the original computes. A batch-norm subclass that overrides
    ``forward`` and has no rule is refused (``ValueError``, nothing changed) unless you register a
    rule with :func:`register_conversion` or pass ``skip_unknown=True``.

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
        skip_unknown: leave batch-norm subclasses without a rule that override ``forward`` as they
            are (one ``UserWarning`` lists them) instead of raising. Default: False.

    Raises:
        ValueError: bad ``renorm`` keys, ``renorm`` with a layer without running statistics, an
            uninitialized lazy batch norm, or batch-norm subclasses this function does not know;
            raised before the model is changed.

    Example::

        >>> model = syncbn.convert_sync_bn(torchvision.models.resnet18())
        >>> model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        >>> model = syncbn.convert_sync_bn(timm.create_model("efficientnet_b0"))  # keeps the activations
        >>> # Batch Renormalization with the paper's schedule:
        >>> model = syncbn.convert_sync_bn(
        ...     model, renorm={"schedule": syncbn.RenormSchedule(5000, 40000, 25000), "momentum": 0.01}
        ... )
    """
    caller = "syncbn.convert_sync_bn"
    check_options(caller, min_count, fallback)
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
    options = {"min_count": min_count, "fallback": fallback, "debias": debias, "renorm": renorm_opts}
    converted = _convert(
        module, SYNC, caller, skip_unknown=skip_unknown, process_group=process_group, options=options
    )
    for path, m in converted.named_modules():
        if isinstance(m, SyncBatchNorm):
            m._layer_path = path  # named in error messages and consistency checks
    return converted


def revert_sync_bn(module: nn.Module, *, skip_unknown: bool = False) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` (and :class:`SyncBatchRenorm`) in ``module`` back into a local batch norm.

    A layer made by :func:`convert_sync_bn` returns to its exact original class (``BatchNorm1d``,
    ``2d``, ``3d``, ``nn.SyncBatchNorm``, timm's ``BatchNormAct2d`` with its ``drop`` and ``act``,
    or the very layer object of a subclass); one built directly as :class:`SyncBatchNorm` becomes
    a :class:`BatchNormNd`, which accepts any ``(N, C, *)`` input (a :class:`SyncBatchNormAct`, a
    :class:`BatchNormAct`). Same Parameter and buffer objects, same ``state_dict`` keys.
    A subclass of :class:`SyncBatchNorm` that overrides ``forward`` is refused (``ValueError``,
    nothing changed) unless ``skip_unknown=True`` leaves it as it is with one warning.

    Example::

        >>> model = syncbn.revert_sync_bn(model)  # e.g. before exporting for single-device inference
    """
    return _convert(module, REVERT, "syncbn.revert_sync_bn", skip_unknown=skip_unknown)


def freeze_bn(module: nn.Module, *, skip_unknown: bool = False) -> nn.Module:
    """Replace every batch norm in ``module`` by a :class:`FrozenBatchNorm` with its current values.

    Torch's and syncbn's batch norms alike (``BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``,
    :class:`SyncBatchNorm`, :class:`SyncBatchRenorm`, :class:`BatchNormNd`) become fixed per-channel
    affine maps that equal their eval output in every mode, never update and never communicate:
    for fine-tuning with tiny batches. Norm-act layers (timm's ``BatchNormAct2d``,
    :class:`SyncBatchNormAct`) become a :class:`FrozenBatchNormAct` that keeps their ``drop`` and
    ``act``. The frozen layers' buffers share memory with the original weight, bias and running
    statistics, so their ``state_dict`` keys and values are unchanged (``weight``/``bias`` become
    buffers, so they leave ``module.parameters()``). Returns ``module`` changed in place, or a new
    module when ``module`` itself is a batch norm. :func:`unfreeze_bn` undoes it. Unknown
    batch-norm subclasses are handled as in :func:`convert_sync_bn`.

    Raises:
        ValueError: a batch norm without running statistics (nothing to freeze), or an unknown
            batch-norm subclass; raised before the model is changed.

    Example::

        >>> backbone = syncbn.freeze_bn(torchvision.models.resnet50(weights="DEFAULT"))
    """
    return _convert(module, FREEZE, "syncbn.freeze_bn", skip_unknown=skip_unknown)


def unfreeze_bn(module: nn.Module, *, skip_unknown: bool = False) -> nn.Module:
    """Turn every :class:`FrozenBatchNorm` in ``module`` back into a trainable batch norm.

    A layer made by :func:`freeze_bn` becomes its original layer again: the same class, options
    and Parameter objects (so an optimizer built before freezing stays valid, with the original
    ``requires_grad``), holding the frozen layer's current values and training flag. A
    :class:`FrozenBatchNorm` built directly becomes a :class:`BatchNormNd` with the same ``affine``
    (a :class:`FrozenBatchNormAct`, a :class:`BatchNormAct`); timm's ``FrozenBatchNormAct2d``
    becomes timm's ``BatchNormAct2d``. Subclasses of :class:`FrozenBatchNorm` that override
    ``forward`` are refused unless ``skip_unknown=True``, as in :func:`revert_sync_bn`.

    Example::

        >>> model = syncbn.unfreeze_bn(model)  # fine-tune the normalization layers too
    """
    return _convert(module, UNFREEZE, "syncbn.unfreeze_bn", skip_unknown=skip_unknown)


def convert_bn_to_gn(module: nn.Module, num_groups: int = 32, *, skip_unknown: bool = False) -> nn.Module:
    """Replace every batch norm in ``module`` by ``nn.GroupNorm(num_groups, C)``.

    GroupNorm (Wu & He 2018) normalizes each sample over groups of ``C / num_groups`` channels, so
    it does not depend on the batch size at all: an alternative to synchronization at 1-2 samples
    per device. The affine parameters carry over (same Parameter objects; ``affine=False`` gives
    ``GroupNorm(affine=False)``), as do eps and the training flag; running statistics are dropped.
    Norm-act layers become a :class:`GroupNormAct` with their ``drop`` and ``act``. Returns
    ``module`` changed in place, or a new module when ``module`` itself is a batch norm.

    Args:
        module: the model.
        num_groups: groups per layer; must divide every layer's channel count. Default: 32.
        skip_unknown: as in :func:`convert_sync_bn`. Default: False.

    Raises:
        ValueError: a layer's channel count is not divisible by ``num_groups``, or an unknown
            batch-norm subclass; raised before the model is changed.

    Example::

        >>> model = syncbn.convert_bn_to_gn(torchvision.models.resnet50(), num_groups=32)
    """
    caller = "syncbn.convert_bn_to_gn"
    if not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"{caller}: expected num_groups to be a positive int, got {num_groups!r}")
    return _convert(module, GROUP_NORM, caller, skip_unknown=skip_unknown, options={"num_groups": num_groups})




# torch's names for the same conversions, as classmethods of the layers (attached here, where the
# converter lives, so that the layers' module never imports this one).


def _convert_sync_batchnorm(
    cls: type, module: nn.Module, process_group: Optional[comm.ProcessGroup] = None
) -> nn.Module:
    """:func:`syncbn.convert_sync_bn` under torch's name, ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    Replaces every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by a
    :class:`SyncBatchNorm` synchronized over ``process_group`` (None: the default group),
    sharing the same Parameter and buffer objects, so code written for torch keeps working
    with ``nn.SyncBatchNorm`` changed to ``syncbn.SyncBatchNorm``. Returns ``module`` changed
    in place, or a new layer when ``module`` itself is a batch norm. Called on
    :class:`SyncBatchRenorm` it builds Batch Renormalization layers with the default limits
    (``renorm=True``). For syncbn's own options (``min_count``, ``fallback``, ``debias``,
    ``renorm`` limits and schedule) call :func:`syncbn.convert_sync_bn`.

    Example::

        >>> model = syncbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    """
    return convert_sync_bn(module, process_group, renorm=issubclass(cls, SyncBatchRenorm))


SyncBatchNorm.convert_sync_batchnorm = classmethod(_convert_sync_batchnorm)  # type: ignore[assignment]
