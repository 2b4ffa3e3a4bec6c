"""The only door to other processes: every collective of the library goes through here.

So the rule "every rank of the group joins every collective the same number of times, in the same
order" can be read off one file. Two collectives exist: :func:`all_gather` (each rank's statistics,
forward) and :func:`all_reduce_sum` (gradient sums, backward). Ranks of one machine exchange them
through shared memory (:mod:`syncbn._shm`), everything else through ``torch.distributed``. Under
``torch.compile`` both are custom operators with ordered side effects (see :func:`_ordered_op`),
so every compiled graph runs them in program order, whatever graph each rank compiled.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _compat, _config
from ._compat import is_compiling
from ._shm import ShmChannel

__all__ = [
    "ProcessGroup",
    "GroupRef",
    "group_size",
    "all_reduce_sum",
    "all_gather",
    "set_shared_memory",
    "shared_memory_enabled",
    "new_sync_groups",
]

if dist.is_available():
    from torch.distributed import ProcessGroup
else:  # pragma: no cover - builds of torch without distributed support
    ProcessGroup = object  # type: ignore[misc,assignment]


class GroupRef:
    """Holds a process group on a module so that ``copy.deepcopy`` and pickling still work.

    torch's ProcessGroup objects can be neither deep-copied nor pickled, which breaks EMA copies
    (``copy.deepcopy(model)``) of a model converted with an explicit group. A deep copy shares the
    group (the copy syncs over the same ranks); a pickled layer comes back with ``None`` (the
    default group), since a group is only meaningful inside the processes that created it.
    """

    __slots__ = ("value",)

    def __init__(self, value: Optional[ProcessGroup] = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "GroupRef":
        return self

    def __reduce__(self) -> tuple:
        return (GroupRef, (None,))


def group_size(group: Optional[ProcessGroup] = None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 when no group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _failed(what: str, how: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"{what} failed {how}: {err}. If a peer rank crashed, exited or skipped this layer (a "
        "timeout or closed connection), look at that rank's log; SYNCBN_DEBUG=1 checks that all "
        "ranks call the same layers. If the backend refused the tensor, use a backend that "
        "supports this device (NCCL for CUDA tensors, Gloo for CPU tensors)."
    )


def _run(kind: str, tensor: Tensor, group: Optional[ProcessGroup], shm: Callable, fallback: Callable) -> Tensor:
    """Run one collective through shared memory when this group has a channel, else ``fallback()``.

    ``shm(channel)`` returns the result, or None when the channel is too small for this size (every
    rank published the same size, so every rank grows the channel and tries again).
    """
    channel = None
    try:
        channel = _shm_channel(tensor, group)
        if channel is not None:
            try:
                out = shm(channel)
                if out is None:
                    channel = _shm_channel(tensor, group, grow=channel)
                    out = shm(channel) if channel is not None else None
                if out is not None:
                    return out
            except RuntimeError:
                # A failed exchange leaves the ranks' round counters apart: never reuse this channel.
                # (A size mismatch, ValueError, is seen alike by every rank and leaves it usable.)
                _drop_channel(group)
                raise
        return fallback()
    except RuntimeError as err:
        how = "in shared memory" if channel is not None else f"on the {dist.get_backend(group)!r} backend"
        raise _failed(_what(kind, tensor), how, err) from err
    except ValueError as err:
        raise ValueError(f"{_what(kind, tensor)}: {err}") from err


def _what(kind: str, tensor: Tensor) -> str:
    return f"syncbn: {kind} of a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}"


def all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum ``tensor`` over ``group`` (blocking) and return the sum (``tensor`` itself, summed in place, when eager).

    Raises a ``RuntimeError`` that names the tensor's dtype, device and the backend when the
    backend refuses it, or when a peer never joins (it crashed, exited, or took another path) and
    the group's timeout expires; ``ValueError`` when the ranks passed different sizes (shared memory).
    """
    if is_compiling():
        return _all_reduce_sum_op(tensor, _group_name(group))

    def shm(channel: ShmChannel) -> Optional[Tensor]:
        return tensor if channel.all_reduce_(tensor) else None

    def fallback() -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    return _run("all_reduce", tensor, group, shm, fallback)


def all_gather(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Every rank's ``tensor`` (1-D, ``L`` values), stacked in group-rank order: ``(W, L)``.

    Every rank of ``group`` gets the same rows, so anything computed from them in a fixed order
    is identical on every rank. Errors as :func:`all_reduce_sum`.
    """
    world = group_size(group)
    if is_compiling():
        return _all_gather_op(tensor, _group_name(group), world)
    prepare_token(tensor.device)

    def fallback() -> Tensor:
        out = tensor.new_empty((world, tensor.numel()))
        if tensor.is_cuda or dist.get_backend(group) != "gloo":
            # Into the flat view: Gloo (CUDA tensors too) splits the output into W chunks that
            # must each have the input's shape; NCCL only counts elements. all_gather_single is
            # the name torch >= 2.13 keeps (all_gather_into_tensor warns there).
            _all_gather_single(out.view(-1), tensor.contiguous(), group=group)
        else:  # Gloo has no all_gather_into_tensor on every torch
            dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
        return out

    return _run("all_gather", tensor, group, lambda channel: channel.all_gather(tensor), fallback)


_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def _group_name(group: Optional[ProcessGroup]) -> str:
    pg = group if group is not None else dist.group.WORLD
    return pg.group_name


# ---------------------------------------------------------------------------------------------
# Inside torch.compile: the same collectives as opaque, ordered operators.
#
# Dynamo can trace neither a ProcessGroup call nor the shared-memory channel. Under compilation the
# functions above therefore call custom operators that name the group by its ``group_name`` string
# (as torch's functional collectives do) and, when the graph runs, perform the eager collective.
# They return new tensors, so the graph sees no mutation, and no graph pass may drop one.
#
# Order. Ranks whose graphs differ (a rank with a batch of 0 or 1 compiles other specializations,
# a rank recompiles with dynamic shapes) must still pair every collective with the same one on
# their peers, so no graph may reorder two of them (say those of two parallel branches):
# - forward collectives are chained through a token: each takes the token the previous one
#   returned (an empty tensor, held in ``_tokens`` between calls, across graphs and steps), which
#   makes program order a data dependency in every graph (one chain per device);
# - the backward's all_reduce is registered with ordered effects, so AOTAutograd threads an
#   effect token through the backward graph. (Forward ops are not: torch's DDPOptimizer, which
#   splits compiled DDP models into buckets, cannot pass effect tokens between its pieces.)

# The chain's current token per device: an empty float64 tensor on that device. Filled eagerly
# (prepare_token) before a graph reads it, so that its first and later compiled calls see the
# same dictionary keys (dynamo guards on them).
_tokens: dict[torch.device, Tensor] = {torch.device("cpu"): torch.empty(0, dtype=torch.float64)}


def prepare_token(device: Optional[torch.device]) -> None:
    """Give ``device`` its chain token now, outside any compiled graph (layers call it when placed)."""
    if device is not None and device.type != "meta" and device not in _tokens:
        _tokens[device] = torch.empty(0, dtype=torch.float64, device=device)


def current_token(device: torch.device) -> Tensor:
    """The forward chain's current token on ``device`` (operators that must keep their place in it take it)."""
    token = _tokens.get(device)
    return torch.empty(0, dtype=torch.float64, device=device) if token is None else token


def set_token(device: torch.device, token: Tensor) -> None:
    """Make ``token`` (an operator's output) the chain's current token on ``device``."""
    _tokens[device] = token


if _compat.HAS_CUSTOM_OP:

    @_compat.custom_op("syncbn::all_reduce_sum", ordered=True)
    def _all_reduce_sum_op(tensor: Tensor, group_name: str) -> Tensor:
        return all_reduce_sum(tensor.clone(), _compat.group_by_name(group_name))

    @_all_reduce_sum_op.register_fake
    def _(tensor: Tensor, group_name: str) -> Tensor:
        return torch.empty_like(tensor)

    @_compat.custom_op("syncbn::all_gather", side_effect=True)
    def _all_gather_raw(tensor: Tensor, group_name: str, world: int, token: Tensor) -> tuple[Tensor, Tensor]:
        return all_gather(tensor, _compat.group_by_name(group_name)), token.new_empty(0)

    @_all_gather_raw.register_fake
    def _(tensor: Tensor, group_name: str, world: int, token: Tensor) -> tuple[Tensor, Tensor]:
        return tensor.new_empty((world, tensor.numel())), token.new_empty(0)

    def _all_gather_op(tensor: Tensor, group_name: str, world: int) -> Tensor:
        rows, token = _all_gather_raw(tensor, group_name, world, current_token(tensor.device))
        set_token(tensor.device, token)
        return rows

else:  # pragma: no cover - older torch: the collectives break the graph, as they always did

    @torch.compiler.disable
    def _all_reduce_sum_op(tensor: Tensor, group_name: str) -> Tensor:
        return all_reduce_sum(tensor.clone(), _compat.group_by_name(group_name))

    @torch.compiler.disable
    def _all_gather_op(tensor: Tensor, group_name: str, world: int) -> Tensor:
        return all_gather(tensor, _compat.group_by_name(group_name))


# ---------------------------------------------------------------------------------------------
# Shared-memory channels between ranks of one machine.

# Per process group, keyed by id(group): (weak reference to the group, its channel or None when its
# ranks cannot share memory). A channel belongs to one group object: a lookup checks the reference
# is that very object (an id can be reused after a group dies) and that the group is still
# registered with torch.distributed (destroy_process_group unregisters it); the entry goes away
# when the group object dies, in cleanup(), and when a group is found destroyed.
_channels: dict[int, tuple["weakref.ref[ProcessGroup]", Optional[ShmChannel]]] = {}
_MIN_CAPACITY = 16384


def set_shared_memory(flag: Optional[bool]) -> None:
    """Use (True, the default) or not (False) the shared-memory transport between ranks of one machine.

    Every rank of a group must use the same setting. ``None`` goes back to ``$SYNCBN_SHM``
    (``SYNCBN_SHM=0`` turns it off from the start). Channels already built stay cached and are
    used again if it is turned back on.
    """
    _config.set_switch(_config.SHM, flag)


def shared_memory_enabled() -> bool:
    """Whether the shared-memory transport is on (:func:`set_shared_memory`, ``$SYNCBN_SHM``)."""
    return _config.shared_memory()


def _resolve(group: Optional[ProcessGroup]) -> Optional[ProcessGroup]:
    """The group object itself: the current default group for None (None when there is none)."""
    return group if group is not None else dist.GroupMember.WORLD


def _drop_channel(group: Optional[ProcessGroup]) -> None:
    _channels.pop(id(_resolve(group)), None)


def _drop_channels() -> None:
    """Forget every channel (syncbn.cleanup() calls this before destroying the process group)."""
    _channels.clear()


def _forget(key: int, ref: "weakref.ref[ProcessGroup]") -> None:
    entry = _channels.get(key)
    if entry is not None and entry[0] is ref:
        del _channels[key]


def _shm_channel(
    tensor: Tensor, group: Optional[ProcessGroup], grow: Optional[ShmChannel] = None
) -> Optional[ShmChannel]:
    """This group's channel when ``tensor`` can use it, building it collectively on first use.

    Every input to the decision (the setting, the tensor's dtype and device, the group, what
    earlier calls built) is the same on every rank of the group, so all ranks build together.
    Sizes are not an input: the channel checks them from what every rank published, and
    ``grow`` (the channel every rank found too small for this same size) asks for a larger one.
    """
    if tensor.dtype != torch.float64 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    if not _config.shared_memory():
        return None
    pg = _resolve(group)
    if pg is None:
        return None
    key = id(pg)
    entry = _channels.get(key)
    if entry is not None and entry[0]() is pg and grow is None:
        if entry[1] is None or _compat.group_is_live(pg):
            return entry[1]
    # A new group (or a destroyed one: then torch.distributed raises below, as without syncbn).
    for k, (ref, _) in list(_channels.items()):
        alive = ref()
        if alive is None or not _compat.group_is_live(alive):
            del _channels[k]
    if not _compat.group_is_live(pg):
        return None
    ref = weakref.ref(pg, lambda r, key=key: _forget(key, r))
    if not _compat.has_cpu_backend(pg):
        # NCCL-only (or CUDA-only Gloo) groups: their collectives cannot even set the channel up.
        _channels[key] = (ref, None)
        return None
    capacity = _MIN_CAPACITY if grow is None else max(2 * grow.capacity, tensor.numel())
    # The channel's views of the shared file live as long as the group and are written in place
    # at every call: never inference tensors, also when the first call runs in inference_mode.
    with torch.inference_mode(False):
        channel = ShmChannel.create(pg, capacity, tensor.numel())
    _channels[key] = (ref, channel)
    return channel


def new_sync_groups(group_size: int) -> ProcessGroup:
    """Split the default group into groups of ``group_size`` consecutive ranks; return this rank's.

    Every rank must call it (``new_group`` is itself a collective over the default group), with
    the same ``group_size``. Ranks ``[0, group_size)`` form the first group, and so on: with
    ``group_size`` equal to the number of processes per node, statistics sync within each node.

    Raises:
        RuntimeError: no default process group is initialized.
        ValueError: ``group_size`` is not a positive divisor of the world size.

    Example::

        >>> # xdoctest: +SKIP("distributed")
        >>> group = syncbn.new_sync_groups(2)  # world of 4: ranks {0, 1} and {2, 3}
        >>> model = syncbn.convert_sync_bn(model, process_group=group)
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "syncbn.new_sync_groups: expected an initialized default process group, found none; "
            "call torch.distributed.init_process_group (or syncbn.distributed.init_distributed) first"
        )
    world = dist.get_world_size()
    if group_size < 1 or world % group_size != 0:
        raise ValueError(
            f"syncbn.new_sync_groups: expected a group_size >= 1 that divides the world size "
            f"{world}, got {group_size}"
        )
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    assert mine is not None
    return mine
