"""How a converter moves a layer's state into the layer that replaces it, and back.

The one place where state moves between layers, for every converter: the same Parameter and
buffer objects, flags, child modules (a norm-act layer's ``drop`` and ``act``) and hooks.
"""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["factory_kwargs", "bias_kwargs", "carry", "restore"]




def factory_kwargs(module: nn.Module) -> dict:
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


def bias_kwargs(cls: type, src: nn.Module) -> dict:
    """``bias=False`` for a source whose affine layer has no bias, where ``cls`` accepts it.

    Where it does not, :func:`carry` sets ``bias = None`` on the built layer instead.
    """
    if getattr(src, "affine", False) and getattr(src, "bias", 0) is None and _accepts_bias(cls):
        return {"bias": False}
    return {}


def carry(src: nn.Module, dst: nn.Module, *, affine: str = "share") -> nn.Module:
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
    _move_hooks(src, dst)
    return dst


# Where nn.Module keeps the hooks registered on one module (those that exist in this torch).
_HOOK_DICTS = tuple(
    name
    for name in (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_state_dict_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    if hasattr(nn.Module(), name)
)


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` ``src``'s forward, backward and state-dict hooks: the very same dicts.

    Sharing the dicts (rather than copying the hooks) keeps the handles that registered them
    working: ``handle.remove()`` removes the hook from the converted layer too. A hook receives
    the converted layer as its ``module`` argument.
    """
    for name in _HOOK_DICTS:
        hooks = src.__dict__.get(name)
        if hooks:
            dst.__dict__[name] = hooks
    if src.__dict__.get("_is_full_backward_hook") is not None:
        dst._is_full_backward_hook = src._is_full_backward_hook


def restore(current: nn.Module, original: nn.Module) -> nn.Module:
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
    for name in ("eps", "momentum", "track_running_stats"):
        if hasattr(original, name) and hasattr(current, name):
            setattr(original, name, getattr(current, name))
    original.training = current.training
    _move_hooks(current, original)
    return original
