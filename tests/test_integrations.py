"""The PyTorch features people combine SyncBatchNorm with, each against single-process torch BN.

Activation checkpointing, DistributedDataParallel options, autocast, torch.compile, checkpoints
(state_dict round trips) and determinism. Distributed cases run on the harness's Gloo pool with
the layers (and DDP) on a sub-group with a short timeout, so a regression fails in seconds. The
reference is always an unconverted copy of the same model (torch BatchNorm2d) fed the
concatenation of every rank's batch, in float64.
"""

from __future__ import annotations

import ast
import copy
import datetime
import io
import os
import pathlib
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import syncbn

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-9  # float64
PER_RANK = 3
# torch.compile backend for the compile tests: "aot_eager" runs Dynamo and AOTAutograd (where an
# autograd.Function or a collective would fail to trace) in seconds; inductor adds ~40 s of C++
# compilation per process on CPU. SYNCBN_TEST_COMPILE_BACKEND=inductor runs the full stack.
COMPILE_BACKEND = os.environ.get("SYNCBN_TEST_COMPILE_BACKEND", "aot_eager")


def _group(world_size: int, seconds: float = 20.0):
    """A fresh group of all ranks with a short timeout; None (no communication) for one process."""
    if world_size == 1 or not dist.is_initialized():
        return None
    return dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=seconds))


class _Net(nn.Module):
    """conv - BN - ReLU - conv - BN - ReLU - pool - linear; ``block`` is the checkpointable middle."""

    def __init__(self, checkpointing: Optional[str] = None, unused: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(
            nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        self.unused = nn.Linear(2, 2) if unused else None
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.checkpointing is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.checkpointing == "reentrant")
        return self.head(h)


def _models(seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(reference with torch BN, float64) and a converted deep copy with the same weights."""
    torch.manual_seed(seed)
    ref = _Net(**kwargs).double()
    return ref, copy.deepcopy(ref)


def _batches(rank: int, world_size: int, steps: int, seed: int = 1):
    """(full batch, this rank's slice) per step, the same full batches on every rank."""
    gen = torch.Generator().manual_seed(seed)
    n = PER_RANK
    for _ in range(steps):
        full = torch.randn(n * world_size, 3, 6, 6, generator=gen, dtype=torch.float64)
        yield full, full[rank * n : (rank + 1) * n]


def _loss(y: torch.Tensor, total: int) -> torch.Tensor:
    # Summed over ranks, the local losses are the full batch's mean: grads add up to the reference's.
    return y.square().sum() / total


def _compare_state(dut: nn.Module, ref: nn.Module, what: str, tol: float = TOL) -> None:
    ref_state = ref.state_dict()
    for key, value in dut.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(ref_state[key]), f"{what}: {key} {int(value)} != {int(ref_state[key])}"
        else:
            assert_close(value, ref_state[key], tol, f"{what}: {key}")


def _sum_grads(model: nn.Module, group) -> None:
    if group is None:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


# ------------------------------------------------------------------------------------------------
# Activation checkpointing


def _checkpoint_rank(rank, world_size, mode, steps=3):
    group = _group(world_size)
    ref, dut = _models(checkpointing=mode)
    ref.checkpointing = None
    dut = syncbn.convert_sync_bn(dut, process_group=group)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(dut.parameters(), lr=0.1)
    for step, (full, local) in enumerate(_batches(rank, world_size, steps)):
        y = dut(local)
        y_ref = ref(full)
        assert_close(y, y_ref[rank * PER_RANK : (rank + 1) * PER_RANK], TOL, f"step {step} output")
        _loss(y, len(full)).backward()
        _loss(y_ref, len(full)).backward()
        _sum_grads(dut, group)
        for (name, p), q in zip(dut.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, TOL, f"step {step} grad of {name}")
        # Running statistics once per step: the recomputation in backward must not update them.
        _compare_state(dut, ref, f"step {step} after backward")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    _compare_state(dut, ref, "end")


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_single_process(mode):
    _checkpoint_rank(0, 1, mode)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_two_ranks(mode):
    run_on_ranks(2, _checkpoint_rank, mode)


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel


def _ddp_rank(rank, world_size, broadcast_buffers=True, forwards=1, find_unused=False, static_graph=False):
    group = _group(world_size)
    ref, dut = _models(unused=find_unused)
    dut = syncbn.convert_sync_bn(dut, process_group=group)
    ddp = DDP(
        dut,
        process_group=group,
        broadcast_buffers=broadcast_buffers,
        find_unused_parameters=find_unused,
        static_graph=static_graph,
    )
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(rank, world_size, 3 * forwards)
    for step in range(3):
        loss = loss_ref = 0.0
        # Several forwards before one backward (a GAN's real and fake batches): the in-place error
        # torch's SyncBatchNorm users hit with broadcast_buffers=True.
        for _ in range(forwards):
            full, local = next(batches)
            # DDP averages gradients over ranks: the mean over the local batch gives the full mean.
            loss = loss + ddp(local).square().mean()
            loss_ref = loss_ref + ref(full).square().mean()
        loss.backward()
        loss_ref.backward()
        for (name, p), q in zip(dut.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None, f"step {step}: {name} is unused but got a gradient"
            else:
                assert_close(p.grad, q.grad, TOL, f"step {step} grad of {name}")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        _compare_state(dut, ref, f"step {step}")
    return {k: v.clone() for k, v in dut.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        {"broadcast_buffers": True},
        {"broadcast_buffers": False},
        {"broadcast_buffers": True, "forwards": 2},
        {"broadcast_buffers": False, "forwards": 2},
        {"find_unused": True},
        {"static_graph": True},
    ],
    ids=["broadcast", "no-broadcast", "two-forwards-broadcast", "two-forwards", "find-unused", "static-graph"],
)
def test_ddp_matches_single_process(options):
    states = run_on_ranks(2, _ddp_rank, **options)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{key} differs across ranks"


# ------------------------------------------------------------------------------------------------
# Autocast


def _autocast_rank(rank, world_size):
    group = _group(world_size)
    ref, dut = _models()
    dut = syncbn.convert_sync_bn(dut.float(), process_group=group)
    ref = ref.block[0]  # the first BN, fed exactly what the synced one saw (float64)
    seen = []
    dut.block[0].register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    for step, (full, local) in enumerate(_batches(rank, world_size, 2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dut(local.float())
        _loss(y.float(), len(full)).backward()
        x_bn, out = seen[-1]
        assert x_bn.dtype == torch.bfloat16 and out.dtype == torch.bfloat16, (x_bn.dtype, out.dtype)
        for name, buf in dut.block[0].named_buffers():
            if buf.is_floating_point():
                assert buf.dtype == torch.float32, f"{name} is {buf.dtype}, expected float32"
        for name, p in dut.named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), f"step {step}: non-finite grad of {name}"
        # The statistics are those of the group's bf16 inputs, computed in float32 or better
        # (in bf16 they would be off by ~1e-2).
        parts = [torch.empty_like(x_bn, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(parts, x_bn.double(), group=group)
        ref(torch.cat(parts))
        for key in ("running_mean", "running_var"):
            assert_close(getattr(dut.block[0], key), getattr(ref, key), 1e-5, f"step {step} {key}")


def test_autocast_bfloat16_keeps_float32_statistics():
    run_on_ranks(2, _autocast_rank)


# ------------------------------------------------------------------------------------------------
# torch.compile


def _compile_rank(rank, world_size, backend=COMPILE_BACKEND):
    """Compiled and eager copies of the same converted model: same outputs, grads, running stats."""
    import torch._dynamo

    torch._dynamo.reset()
    group = _group(world_size)
    eager = syncbn.convert_sync_bn(_models()[1], process_group=group)
    compiled = torch.compile(syncbn.convert_sync_bn(_models()[1], process_group=group), backend=backend)
    for step, (full, local) in enumerate(_batches(rank, world_size, 2)):
        y_eager = eager(local)
        y_comp = compiled(local)
        assert_close(y_comp, y_eager, TOL, f"step {step} output")
        _loss(y_eager, len(full)).backward()
        _loss(y_comp, len(full)).backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert_close(q.grad, p.grad, TOL, f"step {step} grad of {name}")
        _compare_state(compiled._orig_mod, eager, f"step {step}")
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        assert_close(compiled(local), eager(local), TOL, "eval output")


def test_compile_single_process():
    _compile_rank(0, 1)


def test_compile_two_ranks():
    run_on_ranks(2, _compile_rank)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def test_state_dict_round_trip_with_torch_batchnorm():
    torch.manual_seed(0)
    bn_model = _Net()
    x = torch.randn(6, 3, 6, 6)
    bn_model(x)  # non-trivial running statistics and num_batches_tracked
    bn_model.eval()
    expected = bn_model(x)

    buf = io.BytesIO()
    torch.save(bn_model.state_dict(), buf)
    torch.manual_seed(1)
    converted = syncbn.convert_sync_bn(_Net()).eval()
    buf.seek(0)
    converted.load_state_dict(torch.load(buf, weights_only=True))
    assert type(converted.block[0]) is syncbn.SyncBatchNorm
    assert torch.equal(converted(x), expected), "converted model differs after loading a torch BN checkpoint"

    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    torch.manual_seed(2)
    back = _Net().eval()
    buf.seek(0)
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back(x), expected), "torch BN model differs after loading a converted checkpoint"
    assert torch.equal(syncbn.revert_sync_bn(converted)(x), expected)
    assert set(converted.state_dict()) == set(bn_model.state_dict())


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            yield node


def test_every_torch_load_uses_weights_only():
    root = pathlib.Path(__file__).resolve().parents[1]
    skip = {".venv", ".venv-eco", ".git", "build", "dist", "node_modules", "shared"}
    found, bad = 0, []
    for path in root.rglob("*.py"):
        if skip.intersection(path.relative_to(root).parts):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _torch_load_calls(tree):
            found += 1
            ok = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in call.keywords
            )
            if not ok:
                bad.append(f"{path.relative_to(root)}:{call.lineno}")
    assert found >= 1, "this test itself calls torch.load: the scan found nothing"
    assert not bad, f"torch.load without weights_only=True (unpickles arbitrary code): {bad}"


# ------------------------------------------------------------------------------------------------
# Determinism


def _train_once(rank, world_size, group, seed):
    torch.manual_seed(seed)
    model = syncbn.convert_sync_bn(_Net().double(), process_group=group)
    ddp = DDP(model, process_group=group, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + rank)
    for _ in range(3):
        ddp(torch.randn(PER_RANK, 3, 6, 6, generator=gen, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _determinism_rank(rank, world_size):
    group = _group(world_size)
    first = _train_once(rank, world_size, group, seed=5)
    second = _train_once(rank, world_size, group, seed=5)
    other = _train_once(rank, world_size, group, seed=6)
    for key, value in first.items():
        assert torch.equal(value, second[key]), f"{key}: two runs with the same seed differ"
    assert any(not torch.equal(v, other[k]) for k, v in first.items()), "the seed has no effect"
    return first


def test_same_seed_gives_bitwise_identical_parameters():
    a, b = run_on_ranks(2, _determinism_rank)
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs across ranks"
