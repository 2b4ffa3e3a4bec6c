"""The CUDA path's kernel calls, checked on CPU: syncbn routed through emulated fused kernels.

On CUDA, syncbn calls the four kernels torch's own SyncBatchNorm uses; torch has no CPU version of
them. Here CPU tensors take that path with :mod:`tests.emulated_kernels` standing in for them (as
strict as the kernels, and like them without fake implementations), and the same parity checks as
the CPU path run against float64 torch BatchNorm on the concatenated batch: every world size,
uneven and empty ranks, 2-D to 5-D, channels_last, half dtypes and pure half models, no affine,
Batch Renorm. This proves the calls (folding of weight/r/d, dtypes, counts, layouts, which kernel
implementation each call reaches, the number of passes over activation memory and of launches,
compiled steps with dynamic shapes); ``benchmarks/gpu_check.py`` proves the kernels on a GPU.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn
from syncbn import _config, _kernels
from syncbn import _stats as ST

from benchmarks import launches

from . import emulated_kernels
from .harness import run_on_ranks
from .parity import assert_close, check_parity
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
        emulated_kernels.paths.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def _fused(rank: int, world_size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict:
    with _Fused(always_sync=world_size == 1):
        result = fn(rank, world_size, *args, **kwargs)
        return {"result": result, "calls": dict(emulated_kernels.calls), "paths": dict(emulated_kernels.paths)}


class _HalfSyncBatchNorm(syncbn.SyncBatchNorm):
    """A layer of a pure ``.half()`` model: parameters and running buffers in float16 too."""

    def to(self, *args: Any, **kwargs: Any) -> "_HalfSyncBatchNorm":
        return super().to(torch.float16)


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
        (2, {"dtype": "float16", "sizes": [3, 5], "make_layer": _HalfSyncBatchNorm}),
        (2, {"dtype": "float16", "sizes": [2, 3], "channels_last": True, "make_layer": _HalfSyncBatchNorm}),
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
        "pure-half",
        "pure-half-channels-last",
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
    # Which implementation each kernel call reached (the emulations choose as the kernels do).
    features = options.get("features", (4, 5, 5))
    cl = options.get("channels_last") or len(features) == 1  # (N, C): strides()[1] == 1
    want = {
        "update_stats": "channels_last" if cl else "contiguous",
        # batch_norm_choose_impl knows 4-D channels_last only: channels_last_3d is General (torch's too).
        "elemt": ("general" if len(features) == 4 else "channels_last") if cl else "contiguous",
        "backward_reduce": "channels_last" if cl else "contiguous",
        "backward_elemt": "channels_last" if cl else "contiguous",
    }
    for rank, res in enumerate(results):
        if sizes[rank]:
            got = {kernel: impl for kernel, impl in res["paths"]}
            assert len(got) == len(res["paths"]) and got == want, f"rank {rank}: kernel implementations {res['paths']}, expected {want}"


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
    """Records every aten op that reads or writes a tensor of the activations' ``shape``.

    The emulated kernels are operators of their own: each shows up once, as a CUDA kernel would,
    and the tensor operations inside them are not seen.
    """

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


_FOUR = ["batch_norm_update_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt"]


def _activation_ops(rank: int, world_size: int, layout: str) -> dict[str, list[str]]:
    torch.manual_seed(rank)
    layers = {
        "bn": syncbn.SyncBatchNorm(8),
        "renorm": syncbn.SyncBatchRenorm(8, r_max=2.0, d_max=1.0),
        "no-affine": syncbn.SyncBatchNorm(8, affine=False),
        "half": syncbn.SyncBatchNorm(8).half(),
    }
    shape = (4, 8, 6, 6)
    seen = {}
    for name, layer in layers.items():
        dtype = torch.float16 if name == "half" else torch.float32
        x = torch.randn(shape, dtype=dtype)
        dy = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed":  # in none of the kernels' layouts
            x, dy = x.transpose(2, 3).contiguous().transpose(2, 3), dy.transpose(2, 3).contiguous().transpose(2, 3)
            assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with _Fused():
            mode = _ActivationOps(x.shape)
            with mode:
                layer(x).backward(dy)
        seen[name] = [op for op in mode.ops if op not in ("detach", "alias")]
        seen[name + " paths"] = sorted(impl for (kernel, impl) in emulated_kernels.paths if kernel == "update_stats")
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_fused_path_touches_activations_only_in_the_four_kernels(layout):
    """Forward: statistics, then normalize; backward: reduce, then the input gradient. Nothing else
    reads or writes activation memory, except one copy of an input in none of the kernels' layouts,
    made once before the statistics read it (as torch's layer does), and of its gradient."""
    for seen in run_on_ranks(2, _activation_ops, layout):
        for name in ("bn", "renorm", "no-affine", "half"):
            ops = seen[name]
            if layout == "transposed":
                # x laid out once (clone), dy laid out like it in the backward (clone); the
                # statistics read the laid-out copy, through the contiguous kernel. Autograd then
                # gives the leaf's .grad the leaf's own strides (its layout contract; with torch's
                # layer alike).
                assert ops == (
                    ["clone", "batch_norm_update_stats", "batch_norm_elemt", "clone"] + _FOUR[2:]
                    + ["new_empty_strided", "copy_"]
                ), (name, ops)
                assert seen[name + " paths"] == ["contiguous"], seen[name + " paths"]
            else:
                assert ops == _FOUR, f"{name}: ops on activation-sized tensors: {ops}"


def _channels_last_3d_statistics(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)
    layer = syncbn.SyncBatchNorm(4)
    x = torch.randn(3, 4, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    with _Fused():
        y = layer(x)
        y.sum().backward()
        paths = dict(emulated_kernels.paths)
    return {"paths": paths, "y_cl3d": y.is_contiguous(memory_format=torch.channels_last_3d)}


def test_channels_last_3d_statistics_take_the_channels_last_kernel():
    """batch_norm_update_stats has a channels-last Welford kernel for 4-D only; syncbn reads a
    channels_last_3d batch through a 4-D view of the same memory, so it gets that kernel (torch's
    layer gets it from batch_norm_stats)."""
    for res in run_on_ranks(2, _channels_last_3d_statistics):
        assert res["paths"][("update_stats", "channels_last")] == 1, res["paths"]
        assert res["paths"][("backward_reduce", "channels_last")] == 1, res["paths"]
        assert res["y_cl3d"]


# ---------------------------------------------------------------------------------------------
# Launches per layer


def test_launches_per_layer_against_torch():
    """One synchronized layer's forward and backward, counted like CUDA launches (see
    benchmarks/launches.py), against torch's own SyncBatchNorm Function replayed through the same
    emulations. Pinned: a change here must be deliberate (update the numbers when they drop)."""
    pinned = {
        # case: ((syncbn forward, backward), (torch forward, backward))
        "float32": ({}, (20, 4), (11, 3)),
        "channels_last": ({"channels_last": True}, (20, 4), (11, 3)),
        "no affine": ({"affine": False}, (20, 4), (11, 3)),
        "pure half": ({"dtype": torch.float16, "param_dtype": torch.float16}, (20, 5), (12, 4)),
    }
    for name, (case, ours, theirs) in pinned.items():
        res = launches.compare(kernels=emulated_kernels, **case)
        got = {who: (r["forward"]["launches"], r["backward"]["launches"]) for who, r in res.items()}
        detail = {who: {p: r[p]["ops"] for p in ("forward", "backward")} for who, r in res.items()}
        assert got == {"syncbn": ours, "torch": theirs}, f"{name}: {got}\n{detail}"
        for who, r in res.items():
            assert r["forward"]["collectives"] == r["backward"]["collectives"] == 1, (name, who)
            assert r["forward"]["host_reads"] == r["backward"]["host_reads"] == 0, (name, who)


# ---------------------------------------------------------------------------------------------
# torch.compile with dynamic shapes


def test_torch_has_no_fake_kernels_for_the_fused_kernels():
    """Why syncbn wraps them: on meta tensors all four raise, and a dynamic-shape trace of one with
    a real CPU kernel (batch_norm_update_stats) is refused; syncbn's operator compiles."""
    m, v = torch.empty(4, 3, 5, device="meta"), torch.empty(3, device="meta")
    counts = torch.empty(2, dtype=torch.int32, device="meta")
    for call in (
        lambda: torch.batch_norm_update_stats(m, None, None, 0.0),
        lambda: torch.batch_norm_elemt(m, v, v, v, v, 0.0),
        lambda: torch.batch_norm_backward_reduce(m, m, v, v, v, True, False, False),
        lambda: torch.batch_norm_backward_elemt(m, m, v, v, v, v, v, counts),
    ):
        with pytest.raises(NotImplementedError, match="no fake impl or Meta kernel"):
            call()
    torch._dynamo.reset()
    raw = torch.compile(lambda x: torch.batch_norm_update_stats(x, None, None, 0.0), fullgraph=True, dynamic=True, backend="eager")
    with pytest.raises(Exception, match="does not support running with fake tensors"):
        raw(torch.randn(4, 3, 5))
    wrapped = torch.compile(lambda x: _kernels._stats_op(x), fullgraph=True, dynamic=True, backend="eager")
    for n in (4, 6, 3):
        x = torch.randn(n, 3, 5)
        for a, b in zip(wrapped(x), torch.batch_norm_update_stats(x, None, None, 0.0)):
            assert torch.equal(a, b)
    torch._dynamo.reset()


def _compiled_dynamic(rank: int, world_size: int, bypass: bool) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = syncbn.SyncBatchNorm(4)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(rank)
    saved = _kernels._traced
    if bypass:
        _kernels._traced = lambda: False  # the raw kernels in the graph, as before the wrappers
    try:
        with _Fused(always_sync=world_size == 1):
            # First batches 6 and 7, unlike any other size of the input: dynamo's duck sizing
            # would tie a batch of 4 to the 4 channels (fixed by the weight) and specialize it.
            for step, n in enumerate([6, 9, 3, 8]):
                x = torch.randn(n + rank, 4, 5, 5, generator=gen) * 2 + 1
                g = torch.randn(x.shape, generator=gen)
                xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
                ye = eager(xe)
                try:
                    yc = compiled(xc)
                except Exception as err:  # noqa: BLE001 - reported to the parent
                    return {"error": f"{type(err).__name__}: {err}"}
                ye.backward(g)
                yc.backward(g)
                for what, a, b in (("output", yc, ye), ("grad_input", xc.grad, xe.grad),
                                   ("grad_weight", model.weight.grad, eager.weight.grad),
                                   ("grad_bias", model.bias.grad, eager.bias.grad),
                                   ("running_mean", model.running_mean, eager.running_mean),
                                   ("running_var", model.running_var, eager.running_var)):
                    assert_close(a, b, 1e-5, f"step {step} (batch {n + rank}) {what}")
                eager.zero_grad()
                model.zero_grad()
            calls = dict(emulated_kernels.calls)
    finally:
        _kernels._traced = saved
    return {"calls": calls, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def test_compiled_fused_step_with_dynamic_shapes():
    """fullgraph, dynamic=True, a batch size that changes every step and differs between ranks:
    the compiled step equals eager, through the emulated kernels (which have no fake
    implementation, like torch's): syncbn's operators give the trace their fake implementations."""
    for res in run_on_ranks(2, _compiled_dynamic, False, timeout=300):
        assert "error" not in res, res
        # Every eager and every compiled step ran the four kernels once each.
        assert res["calls"] == {k: 8 for k in ("update_stats", "elemt", "backward_reduce", "backward_elemt")}, res
        assert res["graphs"] == 1, f"recompiled: {res['graphs']} graphs"


def test_compiled_fused_step_fails_without_the_fake_implementations():
    for res in run_on_ranks(2, _compiled_dynamic, True, timeout=300):
        assert "error" in res, res
        assert "syncbn_emulated" in res["error"] and "fake" in res["error"], res["error"]


# ---------------------------------------------------------------------------------------------
# Counts


def _huge_counts(rank: int, world_size: int, per_rank: int) -> dict:
    """Each rank claims ``per_rank`` values per channel (its row's count) for a small batch."""
    seen: dict = {}
    real_row = ST.local_row

    def row_with_count(x, mask=None, needs_grad=False):
        row = real_row(x, mask, needs_grad)
        row[3 * x.shape[1]] = float(per_rank)
        return row

    def spy(*args):
        seen["count"] = args[-1].clone()
        seen["args"] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        out = emulated_kernels.batch_norm_backward_elemt(*args)
        seen["out"] = out.clone()
        return out

    class Kernels:
        def __getattr__(self, name):
            return spy if name == "batch_norm_backward_elemt" else getattr(emulated_kernels, name)

    torch.manual_seed(rank)
    layer = syncbn.SyncBatchNorm(3)
    x = torch.randn(4, 3, 5, requires_grad=True)
    ST.local_row = row_with_count
    try:
        with _Fused(), _config.testing(kernels=Kernels()):
            try:
                y = layer(x)
            except ValueError as err:
                return {"error": str(err)}
            y.backward(torch.randn_like(y))
    finally:
        ST.local_row = real_row
    return seen


def test_group_count_above_int32_reaches_the_kernel_per_rank():
    """Two ranks of 2**31 - 1 values per channel each: the group's 2**32 - 2 does not fit int32,
    and never has to. The kernel gets one int32 per rank on the device and adds them in int64
    (the emulation does what the .cuh does); the input gradient uses M = 2**32 - 2."""
    per_rank = 2**31 - 1
    for res in run_on_ranks(2, _huge_counts, per_rank):
        count = res["count"]
        assert count.dtype == torch.int32 and count.device.type == "cpu" and count.tolist() == [per_rank] * 2
        assert int(count.to(torch.int64).sum()) == 2**32 - 2
        assert int(count.sum(dtype=torch.int32)) == -2  # what a single int32 total would have been
        dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, _ = res["args"]
        m = 2.0**32 - 2
        view = (1, -1, 1)
        xmu = x.double() - mean.double().view(view)
        istd = invstd.double().view(view)
        expected = weight.double().view(view) * istd * (
            dy.double() - sum_dy.double().view(view) / m - xmu * istd**2 * sum_dy_xmu.double().view(view) / m
        )
        assert_close(res["out"], expected, 1e-5, "grad_input with the int64 total")


def test_one_rank_count_above_int32_raises():
    for res in run_on_ranks(2, _huge_counts, 2**31):
        assert "error" in res, res
        assert "SyncBatchNorm(3)" in res["error"] and str(2**31 - 1) in res["error"] and str(2**31) in res["error"]


# ---------------------------------------------------------------------------------------------
# The all_gather CUDA tensors take


def _all_gather_tensor_branch(rank: int, world_size: int) -> list:
    """comm.all_gather as CUDA tensors run it (all_gather_into_tensor, not Gloo's list form), here
    on a CPU Gloo group: Gloo checks each of the output's W chunks against the input's shape, for
    CUDA tensors too (the W=2 Gloo phase of gpu_check)."""
    from syncbn import comm

    real = comm.dist.get_backend
    comm.dist.get_backend = lambda group=None: "nccl"  # take the branch CUDA tensors take
    try:
        with _config.testing():  # no shared memory needed: a float32 row skips it
            return comm.all_gather(torch.full((3,), float(rank)), None).tolist()
    finally:
        comm.dist.get_backend = real


def test_all_gather_into_tensor_branch_with_gloo():
    for rows in run_on_ranks(2, _all_gather_tensor_branch):
        assert rows == [[0.0] * 3, [1.0] * 3]
