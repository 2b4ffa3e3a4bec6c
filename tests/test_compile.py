"""One graph: synchronized layers under torch.compile(fullgraph=True), and no host reads.

Every test runs on real Gloo groups and compares a compiled copy of a layer (or model) against an
eager copy with the same state and data: outputs, every gradient, running statistics and
``num_batches_tracked`` after every step (float64, 1e-12). ``fullgraph=True`` makes any graph
break an error, and AOTAutograd traces the backward at the same time, so a passing test means the
forward and the backward each compiled into one graph.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-12


def _reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def _batches(rank: int, sizes: list[int], features: tuple[int, ...], steps: int, seed: int = 0, channels_last: bool = False):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for _ in range(steps):
        full = torch.randn(sum(sizes), *features, generator=gen, dtype=torch.float64) * 2 + 1
        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
        x, g = full[lo:hi], grad[lo:hi]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, g


def _compare(eager: nn.Module, compiled: nn.Module, what: str, tol: float = TOL) -> None:
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), f"{what}: grad of {name}"
            continue
        assert_close(q.grad, p.grad, tol, f"{what}: grad of {name}")
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), f"{what}: {name} {c} != {b}"
        else:
            assert_close(c, b, tol, f"{what}: {name}")


def _layer_parity(
    rank: int,
    world_size: int,
    make: Callable[[], nn.Module],
    sizes: list[int],
    features: tuple[int, ...] = (3, 4),
    steps: int = 3,
    backend: str = "aot_eager",
    channels_last: bool = False,
) -> None:
    """A compiled (fullgraph) layer equals its eager twin at every step on this rank's slice."""
    _reset()
    torch.manual_seed(0)
    eager = make().double()
    with torch.no_grad():
        for p in eager.parameters():
            p.uniform_(0.5, 1.5)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=backend)
    for step, (x, g) in enumerate(_batches(rank, sizes, features, steps, channels_last=channels_last)):
        xe = x.clone().requires_grad_()
        xc = x.clone().requires_grad_()
        ye = eager(xe)
        yc = compiled(xc)
        assert_close(yc, ye, TOL, f"step {step} output")
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, TOL, f"step {step} grad_input")
        _compare(eager, compiled_mod, f"step {step}")
        eager.zero_grad()
        compiled_mod.zero_grad()
    eager.eval()
    compiled_mod.eval()
    x = next(_batches(rank, sizes, features, 1, seed=9))[0]
    with torch.no_grad():
        assert_close(compiled(x), eager(x), TOL, "eval output")


_OPTIONS: dict[str, tuple[Callable[[], nn.Module], list[int], dict[str, Any]]] = {
    "plain": (lambda: syncbn.SyncBatchNorm(3), [2, 3], {}),
    "momentum-none": (lambda: syncbn.SyncBatchNorm(3, momentum=None), [2, 3], {}),
    "debias": (lambda: syncbn.SyncBatchNorm(3, momentum=0.3, debias=True), [2, 3], {}),
    "fallback-running-hit": (
        lambda: syncbn.SyncBatchNorm(3, min_count=16, fallback="running"), [1, 2], {"features": (3, 2)}
    ),
    "fallback-running-not-hit": (lambda: syncbn.SyncBatchNorm(3, min_count=16, fallback="running"), [3, 2], {}),
    "empty-rank": (lambda: syncbn.SyncBatchNorm(3), [0, 3], {}),
    "uneven": (lambda: syncbn.SyncBatchNorm(3), [1, 4], {}),
    "no-affine-no-running": (
        lambda: syncbn.SyncBatchNorm(3, affine=False, track_running_stats=False), [2, 3], {}
    ),
    "channels-last": (lambda: syncbn.SyncBatchNorm(3), [2, 3], {"features": (3, 4, 5), "channels_last": True}),
    "renorm-schedule": (
        lambda: syncbn.SyncBatchRenorm(
            3, momentum=0.3, r_max=1.5, d_max=0.5, schedule=syncbn.RenormSchedule(warmup=1, r_max_at=3, d_max_at=2)
        ),
        [2, 3],
        {"steps": 4},
    ),
    "functional": (lambda: _Functional(3), [2, 3], {}),
    "three-ranks-empty-middle": (lambda: syncbn.SyncBatchNorm(3, momentum=None), [2, 0, 3], {}),
}


class _Functional(nn.Module):
    """:func:`syncbn.sync_batch_norm` with module-held buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return syncbn.sync_batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training, momentum=0.2
        )


def _all_options(rank: int, world_size: int, names: list[str], backend: str) -> None:
    for name in names:
        make, sizes, kwargs = _OPTIONS[name]
        try:
            _layer_parity(rank, world_size, make, sizes, backend=backend, **kwargs)
        except Exception as err:
            raise AssertionError(f"{name} ({backend}): {err}") from err


_TWO_RANKS = [name for name, (_, sizes, _) in _OPTIONS.items() if len(sizes) == 2]


def test_compiled_layers_equal_eager_aot_eager():
    run_on_ranks(2, _all_options, _TWO_RANKS, "aot_eager", timeout=300)


@pytest.mark.slow
def test_compiled_layers_equal_eager_inductor():
    """The same through inductor's generated C++ (float64 keeps reassociation below 1e-12)."""
    run_on_ranks(2, _all_options, _TWO_RANKS, "inductor", timeout=600)


class _AutocastNet(nn.Module):
    """conv -> SyncBatchNorm -> ReLU under bf16 autocast: the layer gets bf16 input, float32 state."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = syncbn.SyncBatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.relu(self.bn(self.conv(x)))


def _autocast_parity(rank: int, world_size: int, backend: str) -> None:
    _reset()
    torch.manual_seed(0)
    eager = _AutocastNet()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for step, (x, g) in enumerate(_batches(rank, [2, 3], (3, 5, 5), 2)):
        x = x.float()
        ye, yc = eager(x), compiled(x)
        assert ye.dtype == yc.dtype == torch.bfloat16
        # bf16 outputs: a compiled kernel may round differently in the last bf16 bit.
        assert_close(yc, ye, 2e-2, f"step {step} output")
        weights = torch.linspace(-1, 1, ye.numel()).reshape(ye.shape)
        ye.float().mul(weights).sum().backward()
        yc.float().mul(weights).sum().backward()
        _compare(eager, model, f"step {step}", tol=2e-2)
        eager.zero_grad()
        model.zero_grad()


@pytest.mark.slow
def test_bf16_autocast_compiled():
    for backend in ("aot_eager", "inductor"):
        run_on_ranks(2, _autocast_parity, backend, timeout=300)


def test_three_ranks_compiled():
    run_on_ranks(3, _all_options, ["three-ranks-empty-middle"], "aot_eager", timeout=300)


def _resnet_no_breaks(rank: int, world_size: int) -> None:
    from examples.models import resnet18

    _reset()
    torch.manual_seed(0)
    model = syncbn.convert_sync_bn(resnet18(width=4, num_classes=10)).double().train()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64) + rank
    _one_graph_equal_to_eager(model, x)


def _one_graph_equal_to_eager(model: nn.Module, x: torch.Tensor) -> None:
    """``model`` is one graph without breaks, and two compiled (aot_eager) steps equal eager ones."""
    explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    _reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        xe = (x + step).requires_grad_()
        xc = (x + step).requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye, TOL, f"step {step} logits")
        ye.square().sum().backward()
        yc.square().sum().backward()
        assert_close(xc.grad, xe.grad, TOL, f"step {step} grad_input")
        _compare(eager, model, f"step {step}")


@pytest.mark.slow
def test_converted_resnet_is_one_graph():
    run_on_ranks(2, _resnet_no_breaks, timeout=300)


def _ddp_compiled(rank: int, world_size: int) -> None:
    """DDP + compile: DDP's optimizer may split the graph at its buckets; syncbn adds no break."""
    _reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    model = syncbn.convert_sync_bn(net).double()
    eager = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp = nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(ddp, backend="aot_eager")
    probe = nn.parallel.DistributedDataParallel(copy.deepcopy(model))  # explain runs a forward
    explained = torch._dynamo.explain(probe)(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    syncbn_breaks = [str(r) for r in explained.break_reasons if "syncbn" in str(r)]
    assert not syncbn_breaks, syncbn_breaks
    for step, (x, g) in enumerate(_batches(rank, [2, 3], (3, 6, 6), 2)):
        ye, yc = eager(x), compiled(x)
        assert_close(yc, ye, TOL, f"step {step} output")
        (ye * g[:, :2, 0, 0]).sum().backward()
        (yc * g[:, :2, 0, 0]).sum().backward()
        _compare(eager.module, ddp.module, f"step {step}")


def test_ddp_with_compile():
    run_on_ranks(2, _ddp_compiled, timeout=300)


def _raise_compiled(rank: int, world_size: int) -> str:
    _reset()
    layer = torch.compile(syncbn.SyncBatchNorm(3), fullgraph=True, backend="aot_eager")
    x = torch.randn(1 if rank == 0 else 0, 3)  # one value per channel in the whole group
    try:
        layer(x)
    except Exception as err:  # torch wraps the assert in its own exception types
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_fallback_raise_fails_loudly_when_compiled():
    for message in run_on_ranks(2, _raise_compiled):
        assert "expected at least 2 values per channel" in message, message
        assert "fallback='running'" in message, message


class _HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``bool()``, ``int()``, ``float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _host_reads(rank: int, world_size: int) -> dict[str, tuple[int, int]]:
    """Host reads during synchronized eager training steps, (forward, backward), per layer kind."""
    saved_shm = syncbn.comm.shared_memory_enabled()
    # The shared-memory transport polls its flags on the host by design (inside the collective,
    # like Gloo's own waiting); leave it out to look at the layer's arithmetic alone.
    syncbn.set_shared_memory(False)
    real_tolist = torch.Tensor.tolist
    layers = {
        "running-fallback": syncbn.SyncBatchNorm(3, fallback="running"),
        "momentum-none": syncbn.SyncBatchNorm(3, momentum=None, fallback="running"),
        "debias": syncbn.SyncBatchNorm(3, debias=True, fallback="running"),
        "renorm-schedule": syncbn.SyncBatchRenorm(3, fallback="running", schedule=syncbn.RenormSchedule(1, 3, 2)),
        "raise (default)": syncbn.SyncBatchNorm(3),
    }
    out = {}
    calls: list[int] = []
    torch.Tensor.tolist = lambda self: calls.append(1) or real_tolist(self)
    try:
        for name, layer in layers.items():
            forward, backward = _HostReads(), _HostReads()
            x = torch.randn(2 + rank, 3, 4, requires_grad=True)
            reads = [0, 0]
            for _ in range(2):
                calls.clear()
                with forward:
                    y = layer(x).sum()
                reads[0] += len(calls)
                calls.clear()
                with backward:
                    y.backward()
                reads[1] += len(calls)
            out[name] = (reads[0] + forward.reads, reads[1] + backward.reads)
    finally:
        torch.Tensor.tolist = real_tolist
        syncbn.set_shared_memory(saved_shm)
    return out


def test_eager_step_reads_the_host_once_per_pass():
    for reads in run_on_ranks(2, _host_reads):
        # Two steps each. Forward: one read of every rank's count and gradient flag (torch's own
        # layer reads the counts too), and on CPU one of whether a channel's mean needs refining;
        # backward: on CPU, one read of how many ranks build a second-order graph (on CUDA only
        # ranks with create_graph=True read it). CPU reads cost no device synchronization.
        # Compiled steps read nothing (tested below); nor does CUDA-graph capture (gpu_check).
        assert all(r == (4, 2) for r in reads.values()), reads


def _compiled_host_reads(rank: int, world_size: int) -> list[str]:
    """Host reads in the compiled forward and backward graphs of a synchronized layer (none allowed)."""
    from torch._dynamo.backends.common import aot_autograd

    _reset()
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    reads = []
    for layer in (syncbn.SyncBatchNorm(3, fallback="running"), syncbn.SyncBatchNorm(3), syncbn.SyncBatchRenorm(3)):
        graphs.clear()
        compiled = torch.compile(layer.double(), fullgraph=True, backend=backend)
        x = torch.randn(2 + rank, 3, 4, dtype=torch.float64, requires_grad=True)
        compiled(x).sum().backward()
        assert len(graphs) == 2, f"expected a forward and a backward graph, got {len(graphs)}"
        for gm in graphs:
            for node in gm.graph.nodes:
                target = str(node.target)
                if "_local_scalar_dense" in target or target.endswith((".item", "tolist")):
                    reads.append(f"{type(layer).__name__}: {node.format_node()}")
    return reads


def test_compiled_step_reads_nothing_on_the_host():
    assert run_on_ranks(2, _compiled_host_reads, timeout=300) == [[], []]


# --------------------------------------------------------------------------------------------
# Ranks that compile different graphs: dynamo specializes batch sizes 0 and 1, so a rank with
# such a batch compiles its own graph. Collectives must still pair in program order.


class _TwoBranches(nn.Module):
    """A ResNet downsample block's shape: two parallel branches of equal width, each with a batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + 2 * self.b(x))


def _branches_vs_one_process(rank: int, world_size: int, steps: list[list[int]], backend: str) -> None:
    """Compiled on every rank, rank batch sizes per step from ``steps``; reference: torch on the concatenation."""
    _reset()
    torch.manual_seed(0)
    ref = _TwoBranches().double()
    model = syncbn.convert_sync_bn(copy.deepcopy(ref))
    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for step, sizes in enumerate(steps):
        full = torch.randn(sum(sizes), 3, 5, 5, generator=gen, dtype=torch.float64)
        grad = torch.randn(sum(sizes), 4, 5, 5, generator=gen, dtype=torch.float64)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        x = full[lo:hi].clone().requires_grad_()
        xr = full.clone().requires_grad_()
        y, yr = compiled(x), ref(xr)
        assert_close(y, yr[lo:hi], 1e-10, f"step {step} {sizes} output")
        y.backward(grad[lo:hi])
        yr.backward(grad)
        assert_close(x.grad, xr.grad[lo:hi], 1e-10, f"step {step} grad_input")
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            summed = q.grad.detach().clone()
            torch.distributed.all_reduce(summed)
            assert_close(summed, p.grad, 1e-10, f"step {step} grad of {name}")
        for (name, b), c in zip(ref.named_buffers(), model.buffers()):
            assert_close(c.double(), b.double(), 1e-10, f"step {step} {name}")
        ref.zero_grad()
        model.zero_grad()


def test_parallel_branches_with_a_one_sample_rank_aot_eager():
    run_on_ranks(2, _branches_vs_one_process, [[3, 1], [3, 1], [2, 3], [4, 0]], "aot_eager", timeout=300)


@pytest.mark.slow
def test_parallel_branches_with_one_sample_ranks_inductor():
    # No empty rank: torch's inductor cannot run a convolution's backward on an empty batch (see
    # the next test); aot_eager covers the empty rank above.
    run_on_ranks(2, _branches_vs_one_process, [[3, 1], [3, 1], [2, 3], [1, 4]], "inductor", timeout=600)


@pytest.mark.slow
def test_torch_inductor_fails_on_an_empty_batch():
    """torch 2.13's own limit, pinned: its inductor fails in the backward of a convolution whose
    batch is empty (the same with torch's BatchNorm2d, so with any batch norm). When this test
    fails, torch has fixed it: add the empty rank back to the inductor test above and drop
    ``inductor_empty_rank`` from tests/differential/configs.py's TORCH_FAILURES."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(_TwoBranches().double(), backend="inductor")
    compiled(torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)).sum().backward()
    x = torch.randn(0, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(AssertionError, match="stride"):
        compiled(x).sum().backward()
    torch._dynamo.reset()


def _consistency_compiled(rank: int, world_size: int, mismatch: bool) -> str:
    _reset()
    syncbn.set_debug(True)
    try:
        torch.manual_seed(0)
        width = 4 if not (mismatch and rank == 1) else 5
        model = nn.Sequential(nn.Conv2d(3, width, 1), syncbn.SyncBatchNorm(width)).double()
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x = torch.randn(2 + rank, 3, 4, 4, dtype=torch.float64)
        try:
            y = compiled(x)
        except Exception as err:  # torch may wrap what the operator raised
            return f"{type(err).__name__}: {err}"
        assert_close(y, eager(x), TOL, "consistency mode compiled == eager")
        return "ok"
    finally:
        syncbn.set_debug(None)


def test_consistency_mode_compiled():
    assert run_on_ranks(2, _consistency_compiled, False) == ["ok", "ok"]
    for message in run_on_ranks(2, _consistency_compiled, True):
        assert "consistency check failed" in message and "channel count" in message, message
