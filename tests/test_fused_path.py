"""The CUDA path's kernel calls, checked on CPU: syncbn routed through emulated fused kernels.

On CUDA, syncbn calls the four kernels torch's own SyncBatchNorm uses; torch has no CPU version of
them. Here CPU tensors take that path with :mod:`tests.emulated_kernels` standing in for them, and
the same parity checks as the CPU path run against float64 torch BatchNorm on the concatenated
batch: every world size, uneven and empty ranks, 2-D to 5-D, channels_last, half dtypes, no affine,
Batch Renorm. This proves the calls (folding of weight/r/d, dtypes, counts, layouts, the number of
passes over activation memory); ``benchmarks/gpu_check.py`` proves the kernels on a GPU.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn
from syncbn import _config
from syncbn import functional as BF

from . import emulated_kernels
from .harness import run_on_ranks
from .parity import check_parity
from .test_renorm import _equals_sync_bn, _renorm_parity


class _Fused:
    """Route CPU tensors through the fused-kernel path (and, with ``always_sync``, sync with 1 rank)."""

    def __init__(self, always_sync: bool = False) -> None:
        self.always_sync = always_sync

    def __enter__(self) -> "_Fused":
        self.ctx = _config.testing(
            always_sync=self.always_sync, fused_device_types=("cpu",), kernels=emulated_kernels
        )
        self.ctx.__enter__()
        emulated_kernels.calls.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def _fused(rank: int, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
    with _Fused(always_sync=world_size == 1):
        result = fn(rank, world_size, *args, **kwargs)
        return {"result": result, "calls": dict(emulated_kernels.calls)}


@pytest.mark.parametrize(
    "world_size,options",
    [
        (1, {}),
        (2, {}),
        (3, {"sizes": [1, 4, 2]}),
        (2, {"sizes": [0, 4]}),
        (3, {"sizes": [2, 0, 3]}),
        (2, {"features": (4,), "sizes": [2, 3]}),
        (2, {"features": (4, 7), "sizes": [2, 3]}),
        (2, {"features": (2, 3, 4, 5), "sizes": [2, 3]}),
        (2, {"channels_last": True, "dtype": "float32"}),
        (2, {"features": (2, 3, 4, 5), "channels_last": True, "dtype": "float32"}),
        (2, {"dtype": "float32", "sizes": [3, 5]}),
        (2, {"dtype": "bfloat16", "sizes": [3, 5]}),
        (2, {"dtype": "float16", "sizes": [3, 5]}),
        (2, {"affine": False}),
        (2, {"momentum": None, "steps": 4}),
    ],
    ids=[
        "W1-forced-sync",
        "W2",
        "W3-uneven",
        "W2-empty-first",
        "W3-empty-middle",
        "NC",
        "NCL",
        "NCDHW",
        "channels-last-2d",
        "channels-last-3d",
        "float32",
        "bfloat16",
        "float16",
        "affine-off",
        "momentum-none",
    ],
)
def test_fused_parity(world_size, options):
    results = run_on_ranks(world_size, _fused, check_parity, **options)
    steps = options.get("steps", 3)
    sizes = options.get("sizes", [3] * world_size)
    for rank, res in enumerate(results):
        calls = res["calls"]
        if sizes[rank] == 0:
            assert calls == {}, f"rank {rank} (empty batch) launched kernels: {calls}"
        else:
            # One statistics pass and one elementwise pass forward, one reduction and one
            # elementwise pass backward, per training step; nothing else touches the activations.
            expected = {"update_stats": steps, "elemt": steps, "backward_reduce": steps, "backward_elemt": steps}
            assert calls == expected, f"rank {rank}: kernel calls {calls}, expected {expected}"
    if options.get("track_running_stats", True):
        first = results[0]["result"]
        for res in results[1:]:
            assert torch.equal(res["result"]["running_var"], first["running_var"]), "running_var differs"


@pytest.mark.parametrize(
    "world_size,sizes", [(2, [3, 3]), (3, [2, 0, 3])], ids=["even2", "empty-middle"]
)
def test_fused_renorm_parity(world_size, sizes):
    results = run_on_ranks(world_size, _fused, _renorm_parity, sizes, 1.5, 0.7)
    seen = {k: any(r["result"][k] for r in results) for k in results[0]["result"]}
    assert all(seen.values()), f"clip regimes not all exercised: {seen}"


def test_fused_renorm_plain_limits_equal_sync_batch_norm():
    run_on_ranks(2, _fused, _equals_sync_bn, [2, 3])


class _ActivationOps(TorchDispatchMode):
    """Records every aten op that reads or writes a tensor of the activations' ``shape``."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = shape
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = list(args) + list(kwargs.values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
        if any(isinstance(t, torch.Tensor) and t.shape == self.shape for t in flat):
            self.ops.append(str(func.overloadpacket.__name__))
        return out


def _activation_ops(rank: int, world_size: int) -> list[str]:
    torch.manual_seed(rank)
    bn = syncbn.SyncBatchNorm(8)
    renorm = syncbn.SyncBatchRenorm(8, r_max=2.0, d_max=1.0)
    plain = syncbn.SyncBatchNorm(8, affine=False)
    x = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(4, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    seen = {}
    for name, layer in (("bn", bn), ("renorm", renorm), ("no-affine", plain)):
        x.grad = None  # a second backward into x would add to its grad: an op of the test, not the layer
        with _Fused():
            real = {k: getattr(emulated_kernels, k) for k in emulated_kernels.__all__[1:]}
            mode = _ActivationOps(x.shape)

            def quiet(fn):
                def call(*a, **k):
                    # The emulations' own tensor ops stand for one CUDA kernel: do not record them.
                    with torch.utils._python_dispatch._disable_current_modes():
                        mode.ops.append(fn.__name__)
                        return fn(*a, **k)
                return call

            try:
                for k, fn in real.items():
                    setattr(emulated_kernels, k, quiet(fn))
                with mode:
                    y = layer(x)
                    y.backward(dy)
            finally:
                for k, fn in real.items():
                    setattr(emulated_kernels, k, fn)
        seen[name] = [op for op in mode.ops if op not in ("detach", "alias")]
    return seen


def test_fused_path_touches_activations_only_in_the_four_kernels():
    for seen in run_on_ranks(2, _activation_ops):
        for name, ops in seen.items():
            assert ops == [
                "batch_norm_update_stats",
                "batch_norm_elemt",
                "batch_norm_backward_reduce",
                "batch_norm_backward_elemt",
            ], f"{name}: ops on activation-sized tensors: {ops}"
