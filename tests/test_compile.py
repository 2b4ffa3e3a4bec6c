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
    explained = torch._dynamo.explain(model)(x)
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


def _host_reads(rank: int, world_size: int) -> dict[str, int]:
    """Host reads during a synchronized eager training step (forward and backward), per layer kind."""
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
    try:
        for name, layer in layers.items():
            mode = _HostReads()
            calls = []
            torch.Tensor.tolist = lambda self: calls.append(1) or real_tolist(self)
            x = torch.randn(2 + rank, 3, 4, requires_grad=True)
            with mode:
                for _ in range(2):
                    layer(x).sum().backward()
            torch.Tensor.tolist = real_tolist
            out[name] = mode.reads + len(calls)
    finally:
        torch.Tensor.tolist = real_tolist
        syncbn.set_shared_memory(saved_shm)
    return out


def test_synchronized_step_reads_nothing_on_the_host():
    for reads in run_on_ranks(2, _host_reads):
        # Two steps each. fallback="raise" keeps its one eager read per forward: the ValueError names
        # the count (compiled, it asserts on the device instead).
        assert reads == {
            "running-fallback": 0,
            "momentum-none": 0,
            "debias": 0,
            "renorm-schedule": 0,
            "raise (default)": 2,
        }, reads
