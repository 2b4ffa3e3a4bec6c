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

import inspect
import sys
import warnings
from dataclasses import dataclass, field
from dataclasses import replace as _with
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import comm
from .batchnorm import SyncBatchNorm, _check_options
from .micro_batch import FrozenBatchNorm
from .norm_act import BatchNormAct, FrozenBatchNormAct, GroupNormAct, SyncBatchNormAct, SyncBatchRenormAct
from .norm_act import _DropAct
from .renorm import SyncBatchRenorm

__all__ = [
    "convert_sync_bn",
    "revert_sync_bn",
    "BatchNormNd",
    "freeze_bn",
    "unfreeze_bn",
    "convert_bn_to_gn",
    "register_conversion",
    "ConversionContext",
]


class BatchNormNd(_BatchNorm):
    """``nn.BatchNorm2d`` without the input-rank check: plain local batch norm for any ``(N, C, *)``.

    What :func:`revert_sync_bn` turns a directly built :class:`SyncBatchNorm` into. Its
    ``state_dict`` keys are those of ``nn.BatchNorm2d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormNd: expected input of shape (N, C, *), got {tuple(input.shape)}")


# ---------------------------------------------------------------------------------------------
# The context a rule builds with
# ---------------------------------------------------------------------------------------------

# The converters, by the names register_conversion uses for them.
_SYNC, _REVERT, _FREEZE, _UNFREEZE, _GN = "sync", "revert", "freeze", "unfreeze", "group_norm"


@dataclass(frozen=True)
class ConversionContext:
    """What a conversion rule gets besides the layer: where it is, and the converter's options.

    Attributes:
        converter: ``"sync"`` (:func:`convert_sync_bn`), ``"freeze"`` (:func:`freeze_bn`) or
            ``"group_norm"`` (:func:`convert_bn_to_gn`).
        path: the layer's module path in the model (``""`` for the root).
        process_group: the group ``convert_sync_bn`` was given (None: the default group).
        options: the converter's other options: ``min_count``, ``fallback``, ``debias`` and
            ``renorm`` (None or a dict) for ``"sync"``; ``num_groups`` for ``"group_norm"``.
        like: the class whose rule applies when it is not the layer's own (a subclass that keeps
            its base's forward, ``register_conversion(cls, like=...)``); None otherwise.
    """

    converter: str
    path: str = ""
    process_group: Optional[comm.ProcessGroup] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    like: Optional[type] = None

    def default(self, module: nn.Module, like: Optional[type] = None) -> nn.Module:
        """Build what this converter builds for a plain batch norm, sharing ``module``'s state.

        ``module`` is treated as ``like`` (default: the nearest torch batch-norm class it derives
        from): the result is a :class:`SyncBatchNorm` / :class:`SyncBatchRenorm`,
        :class:`FrozenBatchNorm` or ``nn.GroupNorm`` with ``module``'s Parameter and buffer
        objects, options, training flag and child modules. For rules that wrap the standard layer.
        """
        base = like if like is not None else _rule_base(type(module))
        rule = _BUILTIN[self.converter].get(base) if base is not None else None
        if not isinstance(rule, _Rule):
            raise ValueError(
                f"syncbn.ConversionContext.default: expected a batch norm derived from a torch "
                f"batch-norm class (or like=nn.BatchNorm2d, ...), got {type(module).__qualname__}"
            )
        return rule.build(module, _with(self, like=base))


# ---------------------------------------------------------------------------------------------
# Carrying state
# ---------------------------------------------------------------------------------------------


def _factory_kwargs(module: nn.Module) -> dict:
    ref = getattr(module, "weight", None)
    if ref is None:
        ref = getattr(module, "running_mean", None)
    return {"device": None, "dtype": None} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _accepts_bias(cls: type) -> bool:
    """Whether ``cls(...)`` takes torch's ``bias=`` keyword (torch >= 2.13), following ``**kwargs`` to the base."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return False
        if "bias" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _bias_kwargs(cls: type, src: nn.Module) -> dict:
    """``bias=False`` for a source whose affine layer has no bias, where ``cls`` accepts it.

    Where it does not, :func:`_carry` sets ``bias = None`` on the built layer instead.
    """
    if getattr(src, "affine", False) and getattr(src, "bias", 0) is None and _accepts_bias(cls):
        return {"bias": False}
    return {}


def _carry(src: nn.Module, dst: nn.Module, *, affine: str = "share") -> nn.Module:
    """Make ``dst`` hold ``src``'s state: the same Parameter and buffer objects, flags and children.

    The one place where state moves between layers, for every converter. ``affine`` says how the
    weight and bias move: ``"share"`` the Parameter objects; ``"detach"`` detached views as
    buffers (frozen layers); ``"data"`` into ``dst``'s own Parameters (unfreezing a layer built
    directly). ``bias is None`` (torch's ``affine=True, bias=False``) carries over as ``None``.
    """
    if getattr(dst, "affine", False):
        for name in ("weight", "bias"):
            value = getattr(src, name, None)
            if value is None or affine == "share":
                setattr(dst, name, value)
            elif affine == "detach":
                setattr(dst, name, value.detach())
            else:
                getattr(dst, name).data = value
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in dst._buffers and getattr(src, name, None) is not None:
            setattr(dst, name, getattr(src, name))
    for name, child in src.named_children():
        dst.add_module(name, child)  # norm-act layers: the same drop and act objects
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _restore(current: nn.Module, original: nn.Module) -> nn.Module:
    """Give back ``original`` (kept by a rule) holding ``current``'s state: the inverse of any rule.

    Only what ``current`` holds under the same name moves (a builder may have returned a wrapper
    that shares the original's Parameter objects instead).
    """
    held = {**current._parameters, **current._buffers}
    for name, param in list(original._parameters.items()):
        if name not in held:
            continue
        value = held[name]
        if isinstance(value, nn.Parameter) or value is None:
            setattr(original, name, value)
        elif param is not None:
            param.data = value  # a frozen layer's buffer shares the Parameter's memory
    for name in list(original._buffers):
        if name in current._buffers:
            setattr(original, name, current._buffers[name])
    for name in list(original._modules):
        if name in current._modules:
            original.add_module(name, current._modules[name])
    for name in ("eps", "momentum"):
        if hasattr(original, name) and hasattr(current, name):
            setattr(original, name, getattr(current, name))
    original.training = current.training
    return original


# Where a rule keeps (converter, source layer) for the inverse converter: in __dict__, outside the
# module tree (no parameters, buffers or state_dict entries of its own).
_SOURCE = "_syncbn_source"


# ---------------------------------------------------------------------------------------------
# Built-in rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """How one converter handles one exact class."""

    build: Callable[[nn.Module, ConversionContext], nn.Module]
    # Returns a problem ("expected ..., got ...") that makes the converter refuse the model.
    check: Optional[Callable[[nn.Module, ConversionContext], Optional[str]]] = None
    # Keep the source layer so that the inverse converter gives back that very object.
    keep_source: bool = False
    # The class the rule was written for, when it is not the layer's own (ConversionContext.like).
    like: Optional[type] = None


# A class the converter knows and leaves as it is (say, syncbn's own layers in convert_sync_bn).
_LEAVE = "leave"

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OUR_SYNC = (SyncBatchNorm, SyncBatchRenorm, SyncBatchNormAct, SyncBatchRenormAct)
_NORM_ACT_SYNC = (SyncBatchNormAct, SyncBatchRenormAct)

# timm's norm-act classes, recognised by name so that syncbn never imports timm. timm >= 0.9 keeps
# them in timm.layers; older releases in timm.models.layers.
_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")
_TIMM_BN_ACT = tuple(f"{m}.BatchNormAct2d" for m in _TIMM_MODULES)
_TIMM_SYNC_ACT = tuple(f"{m}.SyncBatchNormAct" for m in _TIMM_MODULES)
_TIMM_FROZEN_ACT = tuple(f"{m}.FrozenBatchNormAct2d" for m in _TIMM_MODULES)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_norm_act(cls: type) -> bool:
    """Whether ``cls`` normalizes and then applies ``drop`` and ``act`` (syncbn's or timm's classes)."""
    timm = _TIMM_BN_ACT + _TIMM_SYNC_ACT + _TIMM_FROZEN_ACT
    return issubclass(cls, (_DropAct, GroupNormAct)) or any(_qualname(c) in timm for c in cls.__mro__)


def _sync_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    opts = ctx.options
    norm_act = _is_norm_act(ctx.like or type(m))
    common = dict(min_count=opts["min_count"], fallback=opts["fallback"], debias=opts["debias"])
    common.update(_factory_kwargs(m))
    new: SyncBatchNorm
    renorm = opts.get("renorm")
    if renorm is not None:
        extra = dict(renorm)
        momentum = extra.pop("momentum", m.momentum)
        cls = SyncBatchRenormAct if norm_act else SyncBatchRenorm
        args: tuple = (m.num_features, m.eps, momentum, m.affine, ctx.process_group)
        new = cls(*args, **extra, **common, **_bias_kwargs(cls, m))
    else:
        cls = SyncBatchNormAct if norm_act else SyncBatchNorm
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, ctx.process_group)
        new = cls(*args, **common, **_bias_kwargs(cls, m))
    new._syncbn_original_class = type(m)
    new._syncbn_original_group = comm.GroupRef(getattr(m, "process_group", None))
    return _carry(m, new)


def _sync_check(m: nn.Module, ctx: ConversionContext) -> Optional[str]:
    if ctx.options.get("renorm") is not None and not m.track_running_stats:
        return "expected track_running_stats=True for Batch Renormalization, got False"
    return None


def _timm_class(src: nn.Module, name: str) -> type:
    """timm's class ``name``, from the module that defined ``src``'s class (loaded, since ``src`` exists)."""
    return getattr(sys.modules[type(src).__module__], name)


def _revert_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    cls = m.__dict__.get("_syncbn_original_class")
    if cls is None:
        cls = BatchNormAct if isinstance(m, _NORM_ACT_SYNC) else BatchNormNd
    args: tuple = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if issubclass(cls, nn.SyncBatchNorm):
        args += (getattr(m, "_syncbn_original_group", comm.GroupRef()).value,)
    return _carry(m, cls(*args, **_bias_kwargs(cls, m), **_factory_kwargs(m)))


def _tracking_check(m: nn.Module, ctx: ConversionContext) -> Optional[str]:
    if m.track_running_stats:
        return None
    return "expected track_running_stats=True (running statistics to freeze), got False"


def _freeze_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    cls = FrozenBatchNormAct if _is_norm_act(ctx.like or type(m)) else FrozenBatchNorm
    frozen = cls(m.num_features, m.eps, m.affine, **_bias_kwargs(cls, m), **_factory_kwargs(m))
    return _carry(m, frozen, affine="detach")


def _unfreeze_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    # Layers freeze_bn made give back their source (see _restore); these were built directly.
    cls = BatchNormAct if isinstance(m, FrozenBatchNormAct) else BatchNormNd
    new = cls(m.num_features, m.eps, affine=m.affine, **_bias_kwargs(cls, m), **_factory_kwargs(m))
    return _carry(m, new, affine="data")


def _unfreeze_timm_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    # timm's own FrozenBatchNormAct2d (timm's freeze_batch_norm_2d): back to its BatchNormAct2d.
    w = m.weight
    new = _timm_class(m, "BatchNormAct2d")(w.shape[0], m.eps, device=w.device, dtype=w.dtype)
    return _carry(m, new, affine="data")


def _gn_check(m: nn.Module, ctx: ConversionContext) -> Optional[str]:
    c, g = m.num_features, ctx.options["num_groups"]
    if c % g == 0:
        return None
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    return (
        f"expected a channel count divisible by num_groups={g}, got {c} channels; "
        f"pass a num_groups that divides every layer's channel count (divisors of {c}: {divisors})"
    )


def _gn_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    g = ctx.options["num_groups"]
    if _is_norm_act(ctx.like or type(m)):
        cls: type = GroupNormAct
    else:
        cls = nn.GroupNorm
    gn = cls(g, m.num_features, m.eps, m.affine, **_bias_kwargs(cls, m), **_factory_kwargs(m))
    return _carry(m, gn)


_SYNC_RULE = _Rule(_sync_build, _sync_check)
_REVERT_RULE = _Rule(_revert_build)
_FREEZE_RULE = _Rule(_freeze_build, _tracking_check, keep_source=True)
_GN_RULE = _Rule(_gn_build, _gn_check)

RuleEntry = Union[_Rule, str]

# converter -> exact class (or "module.QualName" for classes recognised by name) -> rule.
_BUILTIN: dict[str, dict[Union[type, str], RuleEntry]] = {
    _SYNC: {
        **{c: _SYNC_RULE for c in _TORCH_BN + (BatchNormNd, BatchNormAct)},
        **{n: _SYNC_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
        **{c: _LEAVE for c in _OUR_SYNC},
    },
    _REVERT: {c: _REVERT_RULE for c in _OUR_SYNC},
    _FREEZE: {
        **{c: _FREEZE_RULE for c in _TORCH_BN + _OUR_SYNC + (BatchNormNd, BatchNormAct)},
        **{n: _FREEZE_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
    },
    _UNFREEZE: {
        FrozenBatchNorm: _Rule(_unfreeze_build),
        FrozenBatchNormAct: _Rule(_unfreeze_build),
        **{n: _Rule(_unfreeze_timm_build) for n in _TIMM_FROZEN_ACT},
    },
    _GN: {
        **{c: _GN_RULE for c in _TORCH_BN + _OUR_SYNC + (BatchNormNd, BatchNormAct)},
        **{n: _GN_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
    },
}

# Rules from register_conversion: class -> converter -> rule.
_USER_RULES: dict[type, dict[str, _Rule]] = {}

# The layers each converter considers at all; anything else is not a batch norm and stays.
_DOMAIN: dict[str, tuple[type, ...]] = {
    _SYNC: (_BatchNorm,),
    _REVERT: (SyncBatchNorm,),
    _FREEZE: (_BatchNorm,),
    _UNFREEZE: (FrozenBatchNorm,),
    _GN: (_BatchNorm,),
}


def _builtin(converter: str, cls: type) -> Optional[RuleEntry]:
    table = _BUILTIN[converter]
    return table.get(cls, table.get(_qualname(cls)))


def _rule_base(cls: type) -> Optional[type]:
    """The nearest class in ``cls``'s MRO that has built-in rules (torch's, timm's or syncbn's)."""
    for base in cls.__mro__:
        if any(_builtin(c, base) is not None for c in (_SYNC, _FREEZE)):
            return base
    return None


_UNKNOWN = "unknown"

# The converter whose kept source each inverse converter gives back.
_INVERSE = {_REVERT: _SYNC, _UNFREEZE: _FREEZE}


def _rule_for(converter: str, m: nn.Module) -> Optional[RuleEntry]:
    """The rule for ``m``; None when the converter leaves it alone; ``_UNKNOWN`` when it must refuse."""
    cls = type(m)
    user = _USER_RULES.get(cls)
    if user is not None and converter not in _INVERSE:
        return user.get(converter, _UNKNOWN)
    rule = _builtin(converter, cls)
    if rule is not None:
        return rule
    if not isinstance(m, _DOMAIN[converter]):
        return None
    # A subclass that keeps the forward of a class with built-in rules computes what that class
    # computes: convert it the same way, and keep the layer itself for the way back (its own
    # constructor may take other arguments).
    for base in cls.__mro__[1:]:
        base_rule = _builtin(converter, base)
        if base_rule is None:
            continue
        if base_rule == _LEAVE:  # already one of syncbn's synchronized layers: nothing to change
            return _LEAVE
        if getattr(cls, "forward") is not getattr(base, "forward"):
            return _UNKNOWN
        assert isinstance(base_rule, _Rule)
        return _Rule(base_rule.build, base_rule.check, keep_source=converter not in _INVERSE, like=base)
    return _UNKNOWN


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
    plan: dict[int, tuple[_Rule, ConversionContext]] = {}
    unknown: list[tuple[str, type]] = []
    for path, m in module.named_modules():
        if isinstance(m, _DOMAIN[converter]) and isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            # After its first forward a lazy layer becomes its torch class (LazyBatchNorm2d -> BatchNorm2d).
            problem = "got an uninitialized lazy layer; run one forward pass first"
            raise ValueError(f"{caller}: {type(m).__name__} at {_where(path)}: {problem}")
        rule = _rule_for(converter, m)
        if rule is None or rule == _LEAVE:
            continue
        if rule == _UNKNOWN:
            unknown.append((path, type(m)))
            continue
        assert isinstance(rule, _Rule)
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
        kept = m.__dict__.get(_SOURCE)
        if converter in _INVERSE and kept is not None and kept[0] == _INVERSE[converter]:
            new = _restore(m, kept[1])
            del m.__dict__[_SOURCE]
        elif id(m) in plan:
            rule, ctx = plan[id(m)]
            new = rule.build(m, ctx)
            if rule.keep_source and new is not m:
                new.__dict__[_SOURCE] = (converter, m)
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
    layers = ", ".join(f"{_where(p)} ({_qualname(c)})" for p, c in unknown)
    first = unknown[0][1].__name__
    if skip:
        warnings.warn(
            f"{caller}: left {len(unknown)} layer(s) unchanged whose class has no conversion rule "
            f"and overrides forward(): {layers}",
            UserWarning,
            stacklevel=3,
        )
        return
    if converter in _INVERSE:
        remedy = "pass skip_unknown=True to leave them as they are (one warning lists them)"
    else:
        arg = {_SYNC: "sync", _FREEZE: "freeze", _GN: "group_norm"}[converter]
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
    options = {"min_count": min_count, "fallback": fallback, "debias": debias, "renorm": renorm_opts}
    converted = _convert(
        module, _SYNC, caller, skip_unknown=skip_unknown, process_group=process_group, options=options
    )
    for path, m in converted.named_modules():
        if isinstance(m, SyncBatchNorm):
            m.layer_path = path  # named in error messages and consistency checks
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
    return _convert(module, _REVERT, "syncbn.revert_sync_bn", skip_unknown=skip_unknown)


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
    return _convert(module, _FREEZE, "syncbn.freeze_bn", skip_unknown=skip_unknown)


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
    return _convert(module, _UNFREEZE, "syncbn.unfreeze_bn", skip_unknown=skip_unknown)


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
    return _convert(module, _GN, caller, skip_unknown=skip_unknown, options={"num_groups": num_groups})


Builder = Callable[[nn.Module, ConversionContext], nn.Module]


def register_conversion(
    cls: type,
    *,
    like: Optional[type] = None,
    sync: Optional[Builder] = None,
    freeze: Optional[Builder] = None,
    group_norm: Optional[Builder] = None,
) -> None:
    """Tell syncbn's converters how to handle your batch-norm class ``cls`` (looked up exactly).

    Either ``like``: ``cls`` computes what that batch-norm class computes (its ``forward`` only
    adds logging, hooks, a reshape ...), so every converter treats it as that class; or one
    builder per converter, ``build(layer, ctx) -> nn.Module``, for a class that computes something
    else. A builder returns the new layer, or ``layer`` itself to leave it as it is (a layer that
    synchronizes on its own); ``ctx.default(layer)`` builds what the converter builds for a plain
    batch norm with ``layer``'s Parameters and buffers, to wrap or extend. A converter with no
    builder for ``cls`` refuses it as unknown. :func:`revert_sync_bn` and :func:`unfreeze_bn` give
    back the very layer object that a registered rule replaced, holding the current Parameters,
    buffers and child modules. Registering ``cls`` again replaces its rule.

    Args:
        cls: the exact class (subclasses need their own registration).
        like: a class with built-in rules, e.g. ``torch.nn.BatchNorm2d``; excludes the builders.
        sync: builder for :func:`convert_sync_bn` (``ctx.process_group``, ``ctx.options``).
        freeze: builder for :func:`freeze_bn`.
        group_norm: builder for :func:`convert_bn_to_gn` (``ctx.options["num_groups"]``).

    Raises:
        ValueError: ``cls`` is not a class or already has built-in rules, ``like`` has no
            built-in rules, or neither (or both) of ``like`` and builders are given.

    Example::

        >>> class LoggedBN(torch.nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         print(x.shape)
        ...         return super().forward(x)
        >>> syncbn.register_conversion(LoggedBN, like=torch.nn.BatchNorm2d)
        >>> class ScaledBN(torch.nn.BatchNorm2d):  # computes 2 * BN(x)
        ...     def forward(self, x):
        ...         return 2 * super().forward(x)
        >>> # Scale: a module of yours computing 2 * x; freeze_bn and convert_bn_to_gn still refuse it
        >>> syncbn.register_conversion(
        ...     ScaledBN, sync=lambda m, ctx: torch.nn.Sequential(ctx.default(m), Scale(2.0))
        ... )
    """
    name = "syncbn.register_conversion"
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{name}: expected an nn.Module subclass, got {cls!r}")
    if any(_builtin(c, cls) is not None for c in _BUILTIN):
        raise ValueError(
            f"{name}: expected a class without built-in rules, got {_qualname(cls)}, which syncbn's "
            f"converters already handle"
        )
    builders = {_SYNC: sync, _FREEZE: freeze, _GN: group_norm}
    given = {k: b for k, b in builders.items() if b is not None}
    if (like is None) == (not given):
        raise ValueError(
            f"{name}: expected either like=<a batch-norm class> or builders (sync=, freeze=, "
            f"group_norm=), got {'both' if given else 'neither'}"
        )
    rules: dict[str, _Rule] = {}
    if like is not None:
        if not isinstance(like, type) or _builtin(_SYNC, like) is None or _builtin(_SYNC, like) == _LEAVE:
            raise ValueError(
                f"{name}: expected like= to be a batch-norm class syncbn converts (e.g. "
                f"torch.nn.BatchNorm2d), got {like!r}"
            )
        for converter in (_SYNC, _FREEZE, _GN):
            base = _builtin(converter, like)
            if isinstance(base, _Rule):
                rules[converter] = _Rule(base.build, base.check, keep_source=True, like=like)
    else:
        for converter, build in given.items():
            if not callable(build):
                raise ValueError(f"{name}: expected {converter}= to be callable(layer, ctx), got {build!r}")
            rules[converter] = _Rule(build, keep_source=True)
    _USER_RULES[cls] = rules
