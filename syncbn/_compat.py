"""What differs between the torch versions syncbn supports (``torch>=2.1``), and every private torch API it uses.

Each private API sits behind a function here with a fallback that keeps behaviour, or that warns
once, loudly, where it cannot.
"""

from __future__ import annotations

import datetime
import inspect
import warnings
from typing import Any, Callable, Optional

import torch
from torch.nn.modules.batchnorm import _NormBase

__all__ = [
    "is_compiling",
    "is_fx_tracing",
    "in_backward",
    "HAS_CUSTOM_OP",
    "custom_op",
    "order_effects",
    "is_capturing",
    "NORM_TAKES_BIAS",
    "group_timeout",
    "group_by_name",
    "group_is_live",
    "has_cpu_backend",
    "assert_async",
]

# torch.compiler.is_compiling arrived in torch 2.3; torch._dynamo.is_compiling answers the same
# question on 2.1 and 2.2.
if hasattr(torch.compiler, "is_compiling"):
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - torch 2.1, 2.2
    from torch._dynamo import is_compiling  # type: ignore[no-redef]

# Recent torch batch norms (2.13 among them) take a keyword-only ``bias``: affine=True, bias=False
# is a learnt scale without a shift. syncbn's layers accept it on every torch, building the same
# thing themselves where torch's constructor does not take it.
NORM_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_symbolic = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)


def is_fx_tracing() -> bool:
    """Whether ``torch.fx.symbolic_trace`` (or a tracer built on it) is tracing right now (not torch.compile)."""
    if _symbolic is not None:
        return _symbolic()
    return torch.fx._symbolic_trace.is_fx_tracing()  # pragma: no cover - older torch


_graph_task_id: Optional[Callable[[], int]] = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """True while autograd runs a backward pass (where a forward is a checkpoint's recomputation).

    Uses ``torch._C._current_graph_task_id`` (-1 outside a backward). Without it (a future torch),
    warns once that checkpointed layers count their step twice, and answers False.
    """
    if _graph_task_id is None:  # pragma: no cover - torch without the query
        _warn_once(
            "graph_task_id",
            "syncbn: this torch has no torch._C._current_graph_task_id; under activation "
            "checkpointing a synchronized layer will update its running statistics again when "
            "the backward recomputes it",
        )
        return False
    return _graph_task_id() != -1


def is_capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4


def custom_op(name: str, *, mutates_args: Any = (), ordered: bool = False, side_effect: bool = False) -> Callable:
    """``torch.library.custom_op(name, mutates_args=...)`` for an operator with side effects.

    ``side_effect``: no graph pass may remove a call whose result goes unused. ``ordered`` (also a
    side effect): AOTAutograd threads an effect token through its calls, so no graph pass
    reorders two of them either. Without effect support in this torch an ordered op is only kept
    from elimination (warned once).
    """

    def wrap(fn: Callable) -> Any:
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        if ordered:
            order_effects(op)
        elif side_effect:
            torch.fx.node.has_side_effect(op._opoverload)
        return op

    return wrap


def order_effects(op: Any) -> None:
    """Register ``op`` (a custom op) as having ordered side effects; see :func:`custom_op`."""
    try:
        from torch._library.effects import EffectType

        op.register_effect(EffectType.ORDERED)
        return
    except (ImportError, AttributeError):
        pass
    try:  # torch 2.4 - 2.x: the registration function of the effects module
        from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

        _register_effectful_op(op._opoverload, _EffectType.ORDERED)
        return
    except (ImportError, AttributeError):  # pragma: no cover - torch without effect tokens
        pass
    torch.fx.node.has_side_effect(op._opoverload)
    _warn_once(
        "effects",
        f"syncbn: this torch cannot order custom operators inside compiled graphs; {op._qualname} "
        "is only kept from elimination, and ranks whose compiled graphs differ may pair "
        "collectives of parallel layers wrongly",
    )


def group_timeout(group: Any) -> Optional["datetime.timedelta"]:
    """The timeout ``group`` (None: the default group) was created with; None where torch hides it.

    Reads the private ``options._timeout`` of the group's CPU backend; on a torch where that
    attribute moved, warns once and returns None (callers then use their default, and
    ``$SYNCBN_TIMEOUT`` still applies).
    """
    import torch.distributed as dist

    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:
        backend = pg._get_backend(torch.device("cpu"))
    except RuntimeError:  # no CPU backend in this group (NCCL only)
        return None
    value = getattr(getattr(backend, "options", None), "_timeout", None)
    if value is None:  # pragma: no cover - other torch versions
        _warn_once(
            "group_timeout",
            "syncbn: cannot read this process group's timeout on this torch; the shared-memory "
            "transport waits 30 minutes for a missing peer unless SYNCBN_TIMEOUT is set",
        )
    return value


def group_by_name(name: str) -> Any:
    """The live process group whose ``group_name`` is ``name`` (what functional collectives use)."""
    import torch.distributed as dist

    resolve = getattr(dist.distributed_c10d, "_resolve_process_group", None)
    if resolve is not None:
        return resolve(name)
    for pg, pg_name in dist.distributed_c10d._world.pg_names.items():  # pragma: no cover - older torch
        if pg_name == name:
            return pg
    raise ValueError(f"syncbn: no process group named {name!r}")  # pragma: no cover


def group_is_live(pg: Any) -> bool:
    """Whether ``pg`` is still registered with torch.distributed (destroy_process_group unregisters it)."""
    import torch.distributed as dist

    registry = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)
    if registry is None:  # pragma: no cover - other torch versions: trust the caller's weak reference
        return True
    return pg in registry


def has_cpu_backend(pg: Any) -> bool:
    """Whether process group ``pg`` can run collectives on CPU tensors (Gloo; not an NCCL-only group)."""
    try:
        pg._get_backend(torch.device("cpu"))
    except (RuntimeError, AttributeError):
        return False
    return True


def assert_async(condition: torch.Tensor, message: str) -> None:
    """Fail the step where ``condition`` (a 0-dim bool tensor) is False, without reading it on the host.

    ``torch._assert_async`` (a device-side assert on CUDA, a RuntimeError on CPU; traceable). On a
    torch without it, warns once and checks nothing.
    """
    check = getattr(torch, "_assert_async", None)
    if check is None:  # pragma: no cover - torch without it
        _warn_once("assert_async", "syncbn: this torch has no torch._assert_async; compiled steps skip the min_count check")
        return
    check(condition, message)
