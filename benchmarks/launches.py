"""Count the device launches of one synchronized batch-norm layer, syncbn's against torch's.

A dispatch mode records every aten operator that runs during one forward and one backward of a
layer on the synchronized path, with the collectives replaced by stand-ins for one rank (their
internals are not counted; they are counted as collectives). Each operator is classified:

- ``launch``: work on the device (a kernel, a memset, a copy); each fused SyncBatchNorm kernel is
  one launch here even where CUDA runs it as two (a channels-last reduction over many blocks
  adds a memset for its semaphores; syncbn and torch alike). A ``cat`` whose inputs do not all
  have the output's dtype counts one launch per non-empty input: CUDA's ``cat_out_cuda``
  (aten/src/ATen/native/cuda/Shape.cu) batches the copies only when ``all_same_dtype``, else it
  runs ``copy_(nt, t)`` per input;
- ``host read``: ``item()``/``tolist()`` (a device-to-host copy and a synchronization);
- ``view`` and ``alloc``: metadata only, no launch.

Not seen by a dispatch mode, on either side: ``tolist()`` (syncbn's one host read per forward;
on CUDA a device-to-host copy) and the ``nonzero`` inside boolean indexing (torch's
``count_all[mask]``, three host synchronizations per forward on CUDA).

torch's side replays ``torch.nn.modules._functions.SyncBatchNorm`` itself (the Function torch's
``nn.SyncBatchNorm`` calls in training) with its NCCL branch (``all_gather_single``). On CPU both
sides run through the CPU emulations of the CUDA kernels (``tests/emulated_kernels.py``), which
count as one operator each, exactly like the CUDA kernels; on CUDA, through the kernels.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = ["LaunchCounter", "count_syncbn", "count_torch", "compare"]

_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_HOST = {"_local_scalar_dense"}


def classify(func: Any) -> str:
    """``launch``, ``host read``, ``view`` or ``alloc`` for an aten operator overload."""
    name = func.overloadpacket.__name__
    if name in _ALLOC:
        return "alloc"
    if name in _HOST:
        return "host read"
    if getattr(func, "is_view", False) or name in ("detach", "alias", "lift_fresh"):
        return "view"
    return "launch"


class LaunchCounter(TorchDispatchMode):
    """Records ``(operator name, kind)`` of every operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name, kind = func.overloadpacket.__name__, classify(func)
        if name == "cat" and isinstance(out, torch.Tensor):
            inputs = [t for t in (args[0] if args else kwargs["tensors"]) if t.numel()]
            if any(t.dtype != out.dtype for t in inputs):
                self.ops.extend((f"cat:copy_{t.dtype}".replace("torch.", ""), kind) for t in inputs)
                return out
        self.ops.append((name, kind))
        return out

    def summary(self) -> dict[str, Any]:
        kinds = Counter(kind for _, kind in self.ops)
        return {
            "launches": kinds["launch"],
            "host_reads": kinds["host read"],
            "ops": [name for name, kind in self.ops if kind in ("launch", "host read")],
        }


class _Collectives:
    """Stand-ins for one rank's collectives; they count calls and do their work unseen."""

    def __init__(self) -> None:
        self.calls = 0

    def hidden(self, fn: Callable[[], Any]) -> Any:
        self.calls += 1
        with _disable_current_modes():
            return fn()


def _phases(run_forward: Callable[[], torch.Tensor], dy: torch.Tensor, coll: _Collectives) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with LaunchCounter() as fwd:
        before = coll.calls
        y = run_forward()
    out["forward"] = {**fwd.summary(), "collectives": coll.calls - before}
    with LaunchCounter() as bwd:
        before = coll.calls
        y.backward(dy)
    out["backward"] = {**bwd.summary(), "collectives": coll.calls - before}
    return out


def _inputs(shape: tuple[int, ...], device: str, dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x.requires_grad_(), dy


def count_syncbn(
    shape: tuple[int, ...] = (4, 8, 5, 5), world: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32,
    channels_last: bool = False, kernels: Any = None, affine: bool = True, param_dtype: Optional[torch.dtype] = None,
    renorm: bool = False,
) -> dict[str, Any]:
    """One training forward and backward of a synchronized syncbn layer (warmed up by one step).

    The group has ``world`` ranks that all hold this rank's batch (the stand-in all_gather repeats
    its row), so the forward merges ``world`` rows as it would in such a group.
    """
    import syncbn
    from syncbn import _config, comm

    c = shape[1]
    if renorm:
        layer = syncbn.SyncBatchRenorm(c, affine=affine, r_max=2.0, d_max=1.0)
    else:
        layer = syncbn.SyncBatchNorm(c, affine=affine)
    layer = layer.to(device=device, dtype=param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype))
    x, dy = _inputs(shape, device, dtype, channels_last)
    coll = _Collectives()
    saved = comm.all_gather, comm.all_reduce_sum
    comm.all_gather = lambda t, group=None: coll.hidden(lambda: t.reshape(1, -1).repeat(world, 1))
    comm.all_reduce_sum = lambda t, group=None: coll.hidden(lambda: t.mul_(world))
    seam: dict[str, Any] = {"always_sync": True, "fused_device_types": (device,)}
    if kernels is not None:
        seam["kernels"] = kernels
    try:
        with _config.testing(**seam):
            layer(x).backward(dy)  # first step: anything done once per layer is not counted
            x.grad = None
            layer.zero_grad(set_to_none=True)
            return _phases(lambda: layer(x), dy, coll)
    finally:
        comm.all_gather, comm.all_reduce_sum = saved


class _FakeGroup:
    """A process group as torch's Function sees it: the NCCL branch, one rank."""

    def _get_backend_name(self) -> str:
        return "nccl"


@contextlib.contextmanager
def _torch_kernels(kernels: Any, coll: _Collectives) -> Iterator[None]:
    import torch.distributed as dist

    names = ["batch_norm_stats", "batch_norm_gather_stats_with_counts", "batch_norm_elemt",
             "batch_norm_backward_reduce", "batch_norm_backward_elemt"]
    saved = {n: getattr(torch, n) for n in names}
    saved_dist = {n: getattr(dist, n) for n in ("all_gather_single", "all_reduce")}

    def all_gather_single(out: torch.Tensor, t: torch.Tensor, *a: Any, **k: Any) -> None:
        coll.hidden(lambda: out.view(-1, t.numel()).copy_(t.reshape(1, -1)))

    def all_reduce(t: torch.Tensor, *a: Any, **k: Any) -> None:
        coll.hidden(lambda: None)

    try:
        if kernels is not None:
            for n in names:
                setattr(torch, n, getattr(kernels, n))
        dist.all_gather_single, dist.all_reduce = all_gather_single, all_reduce
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)
        dist.all_gather_single, dist.all_reduce = saved_dist["all_gather_single"], saved_dist["all_reduce"]


def count_torch(
    shape: tuple[int, ...] = (4, 8, 5, 5), world: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32,
    channels_last: bool = False, kernels: Any = None, affine: bool = True, param_dtype: Optional[torch.dtype] = None,
) -> dict[str, Any]:
    """torch's ``nn.SyncBatchNorm`` training Function, replayed for one rank of an NCCL group of ``world``."""
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBN

    c = shape[1]
    bn = nn.BatchNorm2d(c, affine=affine).to(device=device, dtype=param_dtype or torch.float32)
    x, dy = _inputs(shape, device, dtype, channels_last)
    coll = _Collectives()
    group = _FakeGroup()

    def forward() -> torch.Tensor:
        bn.num_batches_tracked.add_(1)  # nn.SyncBatchNorm.forward, before the Function
        return TorchSyncBN.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.momentum, group, world)

    with _torch_kernels(kernels, coll):
        forward().backward(dy)
        x.grad = None
        bn.zero_grad(set_to_none=True)
        return _phases(forward, dy, coll)


def compare(device: str = "cpu", kernels: Any = None, **case: Any) -> dict[str, Any]:
    """``{"syncbn": ..., "torch": ...}`` for one case (see :func:`count_syncbn`)."""
    torch_case = {k: v for k, v in case.items() if k in ("shape", "world", "dtype", "channels_last", "affine", "param_dtype")}
    return {
        "syncbn": count_syncbn(device=device, kernels=kernels, **case),
        "torch": count_torch(device=device, kernels=kernels, **torch_case),
    }


def _main() -> None:  # pragma: no cover - a manual tool: python -m benchmarks.launches
    import argparse
    import json
    import os
    import sys

    argparse.ArgumentParser(
        description="Launches of one synchronized layer's forward and backward, syncbn's against torch's "
        "SyncBatchNorm Function, counted through the CPU emulations of the CUDA kernels "
        "(float32, channels_last, no affine, pure half, renorm); prints one line per side and phase.",
    ).parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import emulated_kernels

    for case in ({}, {"channels_last": True}, {"affine": False}, {"dtype": torch.float16, "param_dtype": torch.float16},
                 {"renorm": True}):
        res = compare(kernels=emulated_kernels, **case)
        print(json.dumps({k: str(v) for k, v in case.items()}))
        for who, r in res.items():
            for phase in ("forward", "backward"):
                p = r[phase]
                print(f"  {who:7s} {phase:8s} launches {p['launches']:3d} host reads {p['host_reads']} "
                      f"collectives {p['collectives']}: {' '.join(p['ops'])}")


if __name__ == "__main__":  # pragma: no cover
    _main()
