"""The one place that talks to other processes.

Every collective of the library goes through here, so the rule "every rank of the group joins every
collective the same number of times" can be read off one file.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ProcessGroup", "group_size", "all_reduce_sum", "new_sync_groups"]

if dist.is_available():
    from torch.distributed import ProcessGroup
else:  # pragma: no cover - builds of torch without distributed support
    ProcessGroup = object  # type: ignore[misc,assignment]


def group_size(group: Optional[ProcessGroup] = None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 when no group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(tensor: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Sum ``tensor`` in place over ``group`` (blocking) and return it.

    Raises a ``RuntimeError`` that names the tensor's dtype, device and the backend when the
    backend refuses it (say float64 on a backend without it, or a CUDA tensor on a CPU-only Gloo).
    """
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        backend = dist.get_backend(group)
        raise RuntimeError(
            f"syncbn: all_reduce of a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device} "
            f"failed on the {backend!r} backend: {err}. Use a backend that supports this device "
            "(NCCL for CUDA tensors, Gloo for CPU tensors)."
        ) from err
    return tensor


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
