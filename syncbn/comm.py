"""The one place that talks to other processes.

Every collective of the library goes through here, so the rule "every rank of the group joins every
collective the same number of times" can be read off one file.
"""

from __future__ import annotations

import os
import weakref
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._compat import is_compiling
from ._shm import ShmChannel

__all__ = [
    "ProcessGroup",
    "GroupRef",
    "group_size",
    "all_reduce_sum",
    "set_shared_memory",
    "shared_memory_enabled",
    "new_sync_groups",
    "set_debug",
    "debug_enabled",
    "check_consistency",
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


def all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum ``tensor`` in place over ``group`` (blocking) and return it.

    Ranks of the group that share a machine exchange float64 CPU vectors through shared memory
    (tens of microseconds instead of Gloo's fraction of a millisecond; see :mod:`syncbn._shm`);
    everything else goes through ``torch.distributed.all_reduce``. Raises a ``RuntimeError`` that
    names the tensor's dtype, device and the backend when the backend refuses it (say float64 on a
    backend without it, or a CUDA tensor on a CPU-only Gloo), or when a peer never joins (it
    crashed, exited, or took another path) and the group's timeout expires.
    """
    if is_compiling():
        return _traced_all_reduce_sum(tensor, group)
    what = f"syncbn: all_reduce of a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}"
    channel = None
    try:
        channel = _shm_channel(tensor, group)
        if channel is not None:
            try:
                if not channel.all_reduce_(tensor):
                    # Every rank published this same size, larger than the channel: grow it together.
                    channel = _shm_channel(tensor, group, grow=channel)
                    if channel is not None:
                        channel.all_reduce_(tensor)
                        return tensor
                else:
                    return tensor
            except RuntimeError:
                # A failed exchange leaves the ranks' round counters apart: never reuse this channel.
                # (A size mismatch, ValueError, is seen alike by every rank and leaves it usable.)
                _drop_channel(group)
                raise
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        how = "in shared memory" if channel is not None else f"on the {dist.get_backend(group)!r} backend"
        raise RuntimeError(
            f"{what} failed {how}: {err}. If the backend refused the tensor, use a backend that "
            "supports this device (NCCL for CUDA tensors, Gloo for CPU tensors). If a peer rank "
            "crashed, exited or skipped this layer (a timeout or closed connection), look at that "
            "rank's log; SYNCBN_DEBUG=1 checks that all ranks call the same layers."
        ) from err
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err
    return tensor


# ---------------------------------------------------------------------------------------------
# Inside torch.compile: the same all_reduce as one opaque operator.
#
# Dynamo can trace neither a ProcessGroup call nor the shared-memory channel. Under compilation
# all_reduce_sum therefore calls a custom operator that names the group by its ``group_name``
# string (as torch's functional collectives do) and, when the graph runs, performs the eager
# all_reduce above (shared memory or torch.distributed). It returns a new tensor, so the graph sees
# no mutation; every rank's graph calls it in the same order, as eager code does.

_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4


def _group_from_name(name: str) -> ProcessGroup:
    try:  # torch's own lookup from a group name (what functional collectives use)
        return dist.distributed_c10d._resolve_process_group(name)
    except AttributeError:  # pragma: no cover - torch without it: search the registry
        for pg, pg_name in dist.distributed_c10d._world.pg_names.items():
            if pg_name == name:
                return pg
        raise ValueError(f"syncbn: no process group named {name!r}") from None


if _HAS_CUSTOM_OP:

    @torch.library.custom_op("syncbn::all_reduce_sum", mutates_args=())
    def _all_reduce_sum_op(tensor: Tensor, group_name: str) -> Tensor:
        return all_reduce_sum(tensor.clone(), _group_from_name(group_name))

    @_all_reduce_sum_op.register_fake
    def _(tensor: Tensor, group_name: str) -> Tensor:
        return torch.empty_like(tensor)

    # A collective whose result goes unused (a backward where no input needs a gradient) must
    # still run on this rank, or its peers wait: keep graph passes from eliminating it.
    torch.fx.node.has_side_effect(torch.ops.syncbn.all_reduce_sum.default)

    def _traced_all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        pg = group if group is not None else dist.group.WORLD
        return _all_reduce_sum_op(tensor, pg.group_name)

else:  # pragma: no cover - older torch: the collective breaks the graph, as it always did

    @torch.compiler.disable
    def _traced_all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        return all_reduce_sum(tensor, group)


# ---------------------------------------------------------------------------------------------
# Shared-memory all_reduce between ranks of one machine.

_ENV_SHM = "SYNCBN_SHM"
_shm = os.environ.get(_ENV_SHM, "1").strip().lower() not in ("0", "false", "no", "off")
# Per process group, keyed by id(group): (weak reference to the group, its channel or None when its
# ranks cannot share memory). A channel belongs to one group object: a lookup checks the reference
# is that very object (an id can be reused after a group dies) and that the group is still
# registered with torch.distributed (destroy_process_group unregisters it); the entry goes away
# when the group object dies, in cleanup(), and when a group is found destroyed.
_channels: dict[int, tuple["weakref.ref[ProcessGroup]", Optional[ShmChannel]]] = {}
_MIN_CAPACITY = 16384


def set_shared_memory(flag: bool) -> None:
    """Use (True, the default) or not the shared-memory all_reduce between ranks of one machine.

    Every rank of a group must use the same setting; ``SYNCBN_SHM=0`` in the environment turns it
    off from the start. Channels already built stay cached and are used again if it is turned
    back on.
    """
    global _shm
    _shm = bool(flag)


def shared_memory_enabled() -> bool:
    """Whether the shared-memory all_reduce is on (:func:`set_shared_memory`, ``$SYNCBN_SHM``)."""
    return _shm


def _resolve(group: Optional[ProcessGroup]) -> Optional[ProcessGroup]:
    """The group object itself: the current default group for None (None when there is none)."""
    return group if group is not None else dist.GroupMember.WORLD


def _group_key(group: Optional[ProcessGroup]) -> int:
    return id(_resolve(group))


def _is_live(pg: ProcessGroup) -> bool:
    try:  # private registry; if it moves, trust the weak reference alone
        return pg in dist.distributed_c10d._world.pg_map
    except Exception:  # pragma: no cover - other torch versions
        return True


def _drop_channel(group: Optional[ProcessGroup]) -> None:
    _channels.pop(_group_key(group), None)


def _drop_channels() -> None:
    """Forget every channel (syncbn.cleanup() calls this before destroying the process group)."""
    _channels.clear()


def _forget(key: int, ref: "weakref.ref[ProcessGroup]") -> None:
    entry = _channels.get(key)
    if entry is not None and entry[0] is ref:
        del _channels[key]


def _has_cpu_backend(group: Optional[ProcessGroup]) -> bool:
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    try:
        pg._get_backend(torch.device("cpu"))
    except Exception:
        return False
    return True


@torch.compiler.disable
def _shm_channel(
    tensor: Tensor, group: Optional[ProcessGroup], grow: Optional[ShmChannel] = None
) -> Optional[ShmChannel]:
    """This group's channel when ``tensor`` can use it, building it collectively on first use.

    Every input to the decision (the setting, the tensor's dtype and device, the group, what
    earlier calls built) is the same on every rank of the group, so all ranks build together.
    Sizes are not an input: the channel checks them from what every rank published, and
    ``grow`` (the channel every rank found too small for this same size) asks for a larger one.
    """
    if not _shm or tensor.dtype != torch.float64 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    pg = _resolve(group)
    if pg is None:
        return None
    key = id(pg)
    entry = _channels.get(key)
    if entry is not None and entry[0]() is pg and grow is None:
        if entry[1] is None or _is_live(pg):
            return entry[1]
    # A new group (or a destroyed one: then torch.distributed raises below, as without syncbn).
    for k, (ref, _) in list(_channels.items()):
        if ref() is None or not _is_live(ref()):
            del _channels[k]
    if not _is_live(pg):
        return None
    ref = weakref.ref(pg, lambda r, key=key: _forget(key, r))
    if not _has_cpu_backend(pg):
        # NCCL-only (or CUDA-only Gloo) groups: their collectives cannot even set the channel up.
        _channels[key] = (ref, None)
        return None
    capacity = _MIN_CAPACITY if grow is None else 2 * grow.capacity
    channel = ShmChannel.create(pg, capacity, tensor.numel())
    _channels[key] = (ref, channel)
    return channel


def new_sync_groups(group_size: int) -> ProcessGroup:
    """Split the default group into groups of ``group_size`` consecutive ranks; return this rank's.

    Every rank must call it (``new_group`` is itself a collective over the default group), with
    the same ``group_size``. Ranks ``[0, group_size)`` form the first group, and so on: with
    ``group_size`` equal to the number of processes per node, statistics sync within each node.

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


# ---------------------------------------------------------------------------------------------
# Consistency mode: before each synchronized call, check that every rank is at the same layer.

_ENV_DEBUG = "SYNCBN_DEBUG"


def _env_debug() -> bool:
    return os.environ.get(_ENV_DEBUG, "0").strip().lower() not in ("", "0", "false", "no", "off")


# Read once (here, and on set_debug(None)) so that the check costs one global lookup when off.
_debug = _env_debug()


def set_debug(flag: Optional[bool]) -> None:
    """Turn consistency mode on or off for this process; None goes back to ``$SYNCBN_DEBUG``.

    In consistency mode every synchronized call first runs :func:`check_consistency`: one small
    all_gather that verifies every rank of the group is in the same layer, at the same call, with
    the same channel count and dtype, and raises ``ValueError`` on every rank otherwise, where
    the mismatched stats all_reduce would abort Gloo ("Received data size doesn't match expected
    size") or hang. Every rank of a group must use the same setting (it adds a collective). Off
    by default; ``SYNCBN_DEBUG=1`` in the environment turns it on.
    """
    global _debug
    _debug = _env_debug() if flag is None else bool(flag)


def debug_enabled() -> bool:
    """Whether consistency mode is on (:func:`set_debug`, or ``SYNCBN_DEBUG=1``)."""
    return _debug


# Per-layer call counters, keyed by the id of a tensor the layer owns (its running_mean or
# weight) and dropped when that tensor dies, so a reused id never inherits a stale count.
_calls: dict[int, int] = {}
_name_calls: dict[str, int] = {}
# float dtypes first; anything else is reported by its position in this tuple or as -1.
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_NAME_BYTES = 64
_HEAD = 5  # call, name hash, channels, dtype code, name length


def _next_call(name: str, key: Optional[Tensor]) -> int:
    if key is None:
        n = _name_calls[name] = _name_calls.get(name, 0) + 1
        return n
    k = id(key)
    n = _calls.get(k)
    if n is None:
        weakref.finalize(key, _calls.pop, k, None)
        n = 0
    _calls[k] = n + 1
    return n + 1


def _encode(name: str, call: int, channels: int, dtype: torch.dtype, device: Any) -> Tensor:
    raw = name.encode("utf-8")
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    head = [call, zlib.crc32(raw), channels, code, min(len(raw), _NAME_BYTES)]
    body = list(raw[:_NAME_BYTES]) + [0] * (_NAME_BYTES - min(len(raw), _NAME_BYTES))
    return torch.tensor(head + body, dtype=torch.int64, device=device)


def _decode(t: Tensor) -> tuple[str, int, int, int, str]:
    v = t.tolist()
    call, name_hash, channels, code, n = v[:_HEAD]
    name = bytes(v[_HEAD : _HEAD + n]).decode("utf-8", errors="replace")
    dtype = str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "an unlisted dtype"
    return name, name_hash, call, channels, dtype


def _group_ranks(group: Optional[ProcessGroup], n: int) -> list[int]:
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except Exception:  # pragma: no cover - very old torch: fall back to group-local ranks
        return list(range(n))


def check_consistency(
    name: str, x: Tensor, group: Optional[ProcessGroup] = None, key: Optional[Tensor] = None
) -> None:
    """Verify, in one all_gather of ``5 + 64`` int64 values, that all ranks agree on this call.

    Every rank sends its layer name (hash and first 64 bytes), how many times this layer has been
    called on this rank (counted per ``key``, a tensor the layer owns, or per ``name`` when None),
    the channel count ``x.shape[1]`` and ``x.dtype``. The message is the same fixed size on every
    rank, so even mismatched ranks complete it; if any value differs, every rank raises the same
    ``ValueError`` listing each rank's values. Must be called by every rank of ``group`` before
    the collective it protects.
    """
    call = _next_call(name, key)
    mine = _encode(name, call, x.shape[1] if x.dim() > 1 else -1, x.dtype, x.device)
    world = group_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as err:
        raise RuntimeError(
            f"syncbn: the consistency check of {name} (call {call}) could not all_gather over the "
            f"{dist.get_backend(group)!r} group: {err}. If a peer rank crashed, stopped or called a "
            "different number of synchronized layers, look at its log; if the backend refused the "
            f"{mine.device} tensor, use a backend that supports the input's device."
        ) from err
    # (call, name hash, channels, dtype code) per rank.
    keys = [t[:4].tolist() for t in gathered]
    if all(k == keys[0] for k in keys):
        return
    ranks = _group_ranks(group, world)
    rows = []
    for rank, t in zip(ranks, gathered):
        r_name, _, r_call, r_channels, r_dtype = _decode(t)
        rows.append(f"  rank {rank}: {r_name} call {r_call}, {r_channels} channels, {r_dtype}")
    what = [
        label
        for label, i in (("layer", 1), ("call count", 0), ("channel count", 2), ("dtype", 3))
        if any(k[i] != keys[0][i] for k in keys)
    ]
    me = dist.get_rank()
    raise ValueError(
        f"syncbn consistency check failed on rank {me} in {name} (call {call}): expected every rank "
        f"of the group to be in the same synchronized layer, at the same call, with the same "
        f"channel count and dtype; got different {', '.join(what)}:\n"
        + "\n".join(rows)
        + "\nMake every rank run the same "
        "synchronized layers in the same order (no rank-dependent branches or early exits around "
        "them) with inputs of the same channel count and dtype."
    )
