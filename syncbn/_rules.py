"""The conversion rule table: which exact class each converter turns into which, and how state moves.

Every converter (:mod:`syncbn.convert`) works from this one table of rules, "exact source class ->
how to build the target and carry the state", looked up by ``type(layer)``, never by
``isinstance``: a subclass may compute something else (timm's ``BatchNormAct2d`` adds an
activation), and a converter that does not know a class must not guess. State moves in one place,
:func:`carry`: the same Parameter and buffer objects, flags, child modules and hooks.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from dataclasses import replace as _with
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm
from ._carry import bias_kwargs, carry, factory_kwargs, restore
from .batchnorm import BatchNormNd, SyncBatchNorm
from .frozen import FrozenBatchNorm
from .norm_act import BatchNormAct, FrozenBatchNormAct, GroupNormAct, SyncBatchNormAct, SyncBatchRenormAct
from .norm_act import _DropAct
from .renorm import SyncBatchRenorm

__all__ = ["ConversionContext", "register_conversion", "Builder"]


# ---------------------------------------------------------------------------------------------
# The context a rule builds with
# ---------------------------------------------------------------------------------------------

# The converters, by the names register_conversion uses for them.
SYNC, REVERT, FREEZE, UNFREEZE, GROUP_NORM = "sync", "revert", "freeze", "unfreeze", "group_norm"


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
        base = like if like is not None else rule_base(type(module))
        rule = BUILTIN[self.converter].get(base) if base is not None else None
        if not isinstance(rule, Rule):
            raise ValueError(
                f"syncbn.ConversionContext.default: expected a batch norm derived from a torch "
                f"batch-norm class (or like=nn.BatchNorm2d, ...), got {type(module).__qualname__}"
            )
        return rule.build(module, _with(self, like=base))


# Where a rule keeps (converter, source layer) for the inverse converter: in __dict__, outside the
# module tree (no parameters, buffers or state_dict entries of its own).
SOURCE = "_syncbn_source"


# ---------------------------------------------------------------------------------------------
# Built-in rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How one converter handles one exact class."""

    build: Callable[[nn.Module, ConversionContext], nn.Module]
    # Returns a problem ("expected ..., got ...") that makes the converter refuse the model.
    check: Optional[Callable[[nn.Module, ConversionContext], Optional[str]]] = None
    # Keep the source layer so that the inverse converter gives back that very object.
    keep_source: bool = False
    # The class the rule was written for, when it is not the layer's own (ConversionContext.like).
    like: Optional[type] = None


# A class the converter knows and leaves as it is (say, syncbn's own layers in convert_sync_bn).
LEAVE = "leave"

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OUR_SYNC = (SyncBatchNorm, SyncBatchRenorm, SyncBatchNormAct, SyncBatchRenormAct)
_NORM_ACT_SYNC = (SyncBatchNormAct, SyncBatchRenormAct)

# timm's norm-act classes, recognised by name so that syncbn never imports timm. timm >= 0.9 keeps
# them in timm.layers; older releases in timm.models.layers.
_TIMM_MODULES = ("timm.layers.norm_act", "timm.models.layers.norm_act")
_TIMM_BN_ACT = tuple(f"{m}.BatchNormAct2d" for m in _TIMM_MODULES)
_TIMM_SYNC_ACT = tuple(f"{m}.SyncBatchNormAct" for m in _TIMM_MODULES)
_TIMM_FROZEN_ACT = tuple(f"{m}.FrozenBatchNormAct2d" for m in _TIMM_MODULES)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_norm_act(cls: type) -> bool:
    """Whether ``cls`` normalizes and then applies ``drop`` and ``act`` (syncbn's or timm's classes)."""
    timm = _TIMM_BN_ACT + _TIMM_SYNC_ACT + _TIMM_FROZEN_ACT
    return issubclass(cls, (_DropAct, GroupNormAct)) or any(qualname(c) in timm for c in cls.__mro__)


def _sync_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    opts = ctx.options
    norm_act = _is_norm_act(ctx.like or type(m))
    common = dict(min_count=opts["min_count"], fallback=opts["fallback"], debias=opts["debias"])
    common.update(factory_kwargs(m))
    new: SyncBatchNorm
    renorm = opts.get("renorm")
    if renorm is not None:
        extra = dict(renorm)
        momentum = extra.pop("momentum", m.momentum)
        cls = SyncBatchRenormAct if norm_act else SyncBatchRenorm
        args: tuple = (m.num_features, m.eps, momentum, m.affine, True, ctx.process_group)
        new = cls(*args, **extra, **common, **bias_kwargs(cls, m))
    else:
        cls = SyncBatchNormAct if norm_act else SyncBatchNorm
        args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, ctx.process_group)
        new = cls(*args, **common, **bias_kwargs(cls, m))
    new._syncbn_original_class = type(m)
    new._syncbn_original_group = comm.GroupRef(getattr(m, "process_group", None))
    return carry(m, new)


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
    return carry(m, cls(*args, **bias_kwargs(cls, m), **factory_kwargs(m)))


def _tracking_check(m: nn.Module, ctx: ConversionContext) -> Optional[str]:
    if m.track_running_stats:
        return None
    return "expected track_running_stats=True (running statistics to freeze), got False"


def _freeze_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    cls = FrozenBatchNormAct if _is_norm_act(ctx.like or type(m)) else FrozenBatchNorm
    frozen = cls(m.num_features, m.eps, m.affine, **bias_kwargs(cls, m), **factory_kwargs(m))
    return carry(m, frozen, affine="detach")


def _unfreeze_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    # Layers freeze_bn made give back their source (see restore); these were built directly.
    cls = BatchNormAct if isinstance(m, FrozenBatchNormAct) else BatchNormNd
    new = cls(m.num_features, m.eps, affine=m.affine, **bias_kwargs(cls, m), **factory_kwargs(m))
    return carry(m, new, affine="data")


def _unfreeze_timm_build(m: nn.Module, ctx: ConversionContext) -> nn.Module:
    # timm's own FrozenBatchNormAct2d (timm's freeze_batch_norm_2d): back to its BatchNormAct2d.
    w = m.weight
    new = _timm_class(m, "BatchNormAct2d")(w.shape[0], m.eps, device=w.device, dtype=w.dtype)
    return carry(m, new, affine="data")


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
    kw = dict(eps=m.eps, affine=m.affine, **bias_kwargs(nn.GroupNorm, m), **factory_kwargs(m))
    if _is_norm_act(ctx.like or type(m)):
        return carry(m, GroupNormAct(m.num_features, g, **kw))
    return carry(m, nn.GroupNorm(g, m.num_features, **kw))


_SYNC_RULE = Rule(_sync_build, _sync_check)
_REVERT_RULE = Rule(_revert_build)
_FREEZE_RULE = Rule(_freeze_build, _tracking_check, keep_source=True)
_GN_RULE = Rule(_gn_build, _gn_check)

RuleEntry = Union[Rule, str]

# converter -> exact class (or "module.QualName" for classes recognised by name) -> rule.
BUILTIN: dict[str, dict[Union[type, str], RuleEntry]] = {
    SYNC: {
        **{c: _SYNC_RULE for c in _TORCH_BN + (BatchNormNd, BatchNormAct)},
        **{n: _SYNC_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
        **{c: LEAVE for c in _OUR_SYNC},
    },
    REVERT: {c: _REVERT_RULE for c in _OUR_SYNC},
    FREEZE: {
        **{c: _FREEZE_RULE for c in _TORCH_BN + _OUR_SYNC + (BatchNormNd, BatchNormAct)},
        **{n: _FREEZE_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
    },
    UNFREEZE: {
        FrozenBatchNorm: Rule(_unfreeze_build),
        FrozenBatchNormAct: Rule(_unfreeze_build),
        **{n: Rule(_unfreeze_timm_build) for n in _TIMM_FROZEN_ACT},
    },
    GROUP_NORM: {
        **{c: _GN_RULE for c in _TORCH_BN + _OUR_SYNC + (BatchNormNd, BatchNormAct)},
        **{n: _GN_RULE for n in _TIMM_BN_ACT + _TIMM_SYNC_ACT},
    },
}

# Rules from register_conversion: class -> converter -> rule.
USER_RULES: dict[type, dict[str, Rule]] = {}

# The layers each converter considers at all; anything else is not a batch norm and stays.
DOMAIN: dict[str, tuple[type, ...]] = {
    SYNC: (_BatchNorm,),
    REVERT: (SyncBatchNorm,),
    FREEZE: (_BatchNorm,),
    UNFREEZE: (FrozenBatchNorm,),
    GROUP_NORM: (_BatchNorm,),
}


def builtin(converter: str, cls: type) -> Optional[RuleEntry]:
    table = BUILTIN[converter]
    return table.get(cls, table.get(qualname(cls)))


def rule_base(cls: type) -> Optional[type]:
    """The nearest class in ``cls``'s MRO that has built-in rules (torch's, timm's or syncbn's)."""
    for base in cls.__mro__:
        if any(builtin(c, base) is not None for c in (SYNC, FREEZE)):
            return base
    return None


UNKNOWN = "unknown"

# The converter whose kept source each inverse converter gives back.
INVERSE = {REVERT: SYNC, UNFREEZE: FREEZE}


def rule_for(converter: str, m: nn.Module) -> Optional[RuleEntry]:
    """The rule for ``m``; None when the converter leaves it alone; ``UNKNOWN`` when it must refuse."""
    cls = type(m)
    user = USER_RULES.get(cls)
    if user is not None and converter not in INVERSE:
        return user.get(converter, UNKNOWN)
    rule = builtin(converter, cls)
    if rule is not None:
        return rule
    if not isinstance(m, DOMAIN[converter]):
        return None
    # A subclass that keeps the forward of a class with built-in rules computes what that class
    # computes: convert it the same way, and keep the layer itself for the way back (its own
    # constructor may take other arguments).
    for base in cls.__mro__[1:]:
        base_rule = builtin(converter, base)
        if base_rule is None:
            continue
        if base_rule == LEAVE:  # already one of syncbn's synchronized layers: nothing to change
            return LEAVE
        if getattr(cls, "forward") is not getattr(base, "forward"):
            return UNKNOWN
        assert isinstance(base_rule, Rule)
        return Rule(base_rule.build, base_rule.check, keep_source=converter not in INVERSE, like=base)
    return UNKNOWN


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
    if any(builtin(c, cls) is not None for c in BUILTIN):
        raise ValueError(
            f"{name}: expected a class without built-in rules, got {qualname(cls)}, which syncbn's "
            f"converters already handle"
        )
    builders = {SYNC: sync, FREEZE: freeze, GROUP_NORM: group_norm}
    given = {k: b for k, b in builders.items() if b is not None}
    if (like is None) == (not given):
        raise ValueError(
            f"{name}: expected either like=<a batch-norm class> or builders (sync=, freeze=, "
            f"group_norm=), got {'both' if given else 'neither'}"
        )
    rules: dict[str, Rule] = {}
    if like is not None:
        if not isinstance(like, type) or builtin(SYNC, like) is None or builtin(SYNC, like) == LEAVE:
            raise ValueError(
                f"{name}: expected like= to be a batch-norm class syncbn converts (e.g. "
                f"torch.nn.BatchNorm2d), got {like!r}"
            )
        for converter in (SYNC, FREEZE, GROUP_NORM):
            base = builtin(converter, like)
            if isinstance(base, Rule):
                rules[converter] = Rule(base.build, base.check, keep_source=True, like=like)
    else:
        for converter, build in given.items():
            if not callable(build):
                raise ValueError(f"{name}: expected {converter}= to be callable(layer, ctx), got {build!r}")
            rules[converter] = Rule(build, keep_source=True)
    USER_RULES[cls] = rules
