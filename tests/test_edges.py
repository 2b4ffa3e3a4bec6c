"""The promise at the edges torch users combine with batch norm: run-time flags, second-order
gradients, FX tracing, hooks through conversion, the backward's collective, and the API's shape.

Each test compares with torch's single-process layer on the concatenated batch (or with torch's own
behaviour where that is the contract) on real Gloo groups.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.fx
from torch import nn

import syncbn
from syncbn import comm

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-10


def _slice(rank: int, sizes: list[int]) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def _summed(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone().double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------
# track_running_stats switched at run time (torch's rule for which buffers a forward uses)


def _toggle_track(rank: int, world_size: int, sizes: list[int], norm_act: bool) -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    layer = syncbn.convert_sync_bn(nn.Sequential(copy.deepcopy(ref)))[0]
    if norm_act:
        layer = syncbn.SyncBatchNormAct(3, dtype=torch.float64, act=nn.Identity())
        layer.load_state_dict(ref.state_dict())
    sl = _slice(rank, sizes)
    gen = torch.Generator().manual_seed(1)
    schedule = [True, True, False, False, False, True]  # track_running_stats per step
    for step, track in enumerate(schedule):
        ref.track_running_stats = track
        layer.track_running_stats = track
        full = torch.randn(sum(sizes), 3, 4, generator=gen, dtype=torch.float64) * 3 + 1
        y_ref = ref(full)
        y = layer(full[sl])
        assert_close(y, y_ref[sl], TOL, f"step {step} output")
        assert_close(layer.running_mean, ref.running_mean, TOL, f"step {step} running_mean")
        assert_close(layer.running_var, ref.running_var, TOL, f"step {step} running_var")
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked), step
        if step == 3:  # eval while tracking is off: torch uses the buffers it has
            ref.eval(), layer.eval()
            assert_close(layer(full[sl]), ref(full)[sl], TOL, "eval with track_running_stats=False")
            ref.train(), layer.train()


@pytest.mark.parametrize("world_size,sizes", [(1, [5]), (2, [3, 2])])
def test_track_running_stats_switched_off_at_run_time(world_size, sizes):
    run_on_ranks(world_size, _toggle_track, sizes, False)


def test_track_running_stats_switched_off_on_a_norm_act_layer():
    run_on_ranks(2, _toggle_track, [2, 3], True)


# --------------------------------------------------------------------------------------------
# Second-order gradients (gradient penalties)


class _PenaltyNet(nn.Module):
    def __init__(self, norm: nn.Module, act: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=torch.float64)
        self.bn = norm
        self.act = nn.Tanh() if act else nn.Identity()
        self.head = nn.Linear(3, 1, dtype=torch.float64)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.lin(x))))


def _penalty_step(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    out = net(x).sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    penalty = gx.square().sum() + out
    penalty.backward()
    return gx.detach()


def _double_backward(rank: int, world_size: int, sizes: list[int], act: bool) -> None:
    torch.manual_seed(0)
    ref = _PenaltyNet(nn.BatchNorm1d(3, dtype=torch.float64), act)
    with torch.no_grad():
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-1, 1)
    net = syncbn.convert_sync_bn(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(sum(sizes), 4, generator=gen, dtype=torch.float64)
    sl = _slice(rank, sizes)
    gx_ref = _penalty_step(ref, full)
    gx = _penalty_step(net, full[sl])
    assert_close(gx, gx_ref[sl], TOL, "input gradient")
    for (name, p), q in zip(ref.named_parameters(), net.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert q.grad is not None, f"{name}: no gradient"
        assert_close(_summed(q.grad), p.grad, TOL, f"second-order gradient of {name}")


@pytest.mark.parametrize("act", [False, True], ids=["linear-head", "tanh"])
@pytest.mark.parametrize("world_size,sizes", [(1, [5]), (2, [3, 2]), (3, [2, 0, 3])])
def test_gradient_penalty_equals_one_process(world_size, sizes, act):
    run_on_ranks(world_size, _double_backward, sizes, act)


def _mixed_create_graph(rank: int, world_size: int) -> str:
    layer = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x).square().sum()
    try:
        torch.autograd.grad(y, x, create_graph=rank == 0)
    except ValueError as err:
        return str(err)
    return "no error"


def test_create_graph_on_some_ranks_only_fails_on_every_rank():
    for msg in run_on_ranks(2, _mixed_create_graph):
        assert "create_graph=True" in msg and "1 of 2 ranks" in msg, msg


# --------------------------------------------------------------------------------------------
# FX tracing


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 2),
        nn.BatchNorm1d(2),
    ).double()


@pytest.mark.parametrize("training", [True, False])
def test_fx_symbolic_trace_of_a_converted_model(training):
    torch.manual_seed(0)
    model = syncbn.convert_sync_bn(_small_net())
    twin = copy.deepcopy(model)
    model.train(training), twin.train(training)
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and "fx_call" in str(n.target)]
    assert len(calls) == 3, traced.graph
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(traced(x), twin(x))
    for a, b in zip(traced.buffers(), twin.buffers()):
        assert torch.equal(a, b), "the traced graph updated the same buffers"


def _fx_two_ranks(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    ref = _small_net()
    traced = torch.fx.symbolic_trace(syncbn.convert_sync_bn(copy.deepcopy(ref)))
    full = torch.randn(5, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sl = _slice(rank, [3, 2])
    assert_close(traced(full[sl]), ref(full)[sl], TOL, "traced output")


def test_fx_traced_model_synchronizes():
    run_on_ranks(2, _fx_two_ranks)


# --------------------------------------------------------------------------------------------
# Hooks through conversion


def test_hooks_survive_every_converter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).double()
    seen: list[str] = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(f"fwd {type(m).__name__}"))
    model[1].register_forward_pre_hook(lambda m, i: seen.append("pre"))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for convert in (syncbn.convert_sync_bn, syncbn.revert_sync_bn, syncbn.freeze_bn, syncbn.unfreeze_bn):
        model = convert(model)
        seen.clear()
        model(x)
        assert seen == ["pre", f"fwd {type(model[1]).__name__}"], (convert.__name__, seen)
    gn = syncbn.convert_bn_to_gn(copy.deepcopy(model), num_groups=2)
    seen.clear()
    gn(x)
    assert seen == ["pre", "fwd GroupNorm"]
    handle.remove()  # the handle registered on the original layer still works on the converted one
    seen.clear()
    syncbn.convert_sync_bn(model)(x)
    assert seen == ["pre"]


def test_backward_hooks_survive_conversion():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    grads: list[torch.Size] = []
    model[1].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    model = syncbn.convert_sync_bn(model)
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    assert grads == [torch.Size([5, 4])]


# --------------------------------------------------------------------------------------------
# The backward's collective is skipped on every rank alike when no input needs a gradient


def _count_backward(rank: int, world_size: int, wants_grad: list[bool]) -> dict:
    calls = []
    real = comm.all_reduce_sum

    def counting(t, group=None):
        calls.append(t.numel())
        return real(t, group)

    torch.manual_seed(0)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    layer = syncbn.convert_sync_bn(copy.deepcopy(ref))
    sizes = [2, 3]
    full = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sl = _slice(rank, sizes)
    x = full[sl].clone().requires_grad_(wants_grad[rank])
    xr = full.clone().requires_grad_()
    import syncbn._autograd as autograd_module

    autograd_module.comm.all_reduce_sum = counting
    try:
        layer(x).backward(grad[sl])
    finally:
        autograd_module.comm.all_reduce_sum = real
    ref(xr).backward(grad)
    assert_close(_summed(layer.weight.grad), ref.weight.grad, TOL, "grad_weight")
    assert_close(_summed(layer.bias.grad), ref.bias.grad, TOL, "grad_bias")
    if wants_grad[rank]:
        assert_close(x.grad, xr.grad[sl], TOL, "grad_input")
    return {"calls": len(calls)}


@pytest.mark.parametrize("wants_grad,expected", [([False, False], 0), ([True, False], 1), ([True, True], 1)])
def test_backward_all_reduce_only_when_some_rank_needs_the_input_gradient(wants_grad, expected):
    out = run_on_ranks(2, _count_backward, wants_grad)
    assert [o["calls"] for o in out] == [expected, expected]


# --------------------------------------------------------------------------------------------
# API shape


def test_renorm_takes_syncbatchnorm_positional_order():
    layer = syncbn.SyncBatchRenorm(64, 1e-5, 0.01, True, True)
    assert layer.process_group is None and layer.track_running_stats and layer.momentum == 0.01
    act = syncbn.SyncBatchRenormAct(8, 1e-5, 0.01, True, True, None, act=nn.ReLU())
    assert act.process_group is None
    with pytest.raises(ValueError, match="track_running_stats=True"):
        syncbn.SyncBatchRenorm(4, 1e-5, 0.01, True, False)


@pytest.mark.parametrize("misplaced", ["cpu", torch.device("cpu"), torch.float32])
def test_device_in_the_process_group_slot_raises_at_construction(misplaced):
    # nn.BatchNorm2d's 6th positional argument is device; nn.SyncBatchNorm's (and ours) the group.
    with pytest.raises(TypeError, match="pass device and dtype by keyword"):
        syncbn.SyncBatchNorm(4, 1e-5, 0.1, True, True, misplaced)
    with pytest.raises(TypeError, match="process_group must be"):
        syncbn.SyncBatchRenorm(4, 1e-5, 0.01, True, True, misplaced)


def test_group_norm_act_takes_timms_argument_order():
    layer = syncbn.GroupNormAct(16, 4, act=nn.ReLU())
    assert layer.num_channels == 16 and layer.num_groups == 4
    assert syncbn.GroupNormAct(64).num_groups == 32


def test_internal_hooks_are_private():
    layer = syncbn.SyncBatchNorm(4)
    assert not hasattr(layer, "stats_sink") and not hasattr(layer, "layer_path")


def test_frozen_batch_norm_state_dict_has_a_version():
    frozen = syncbn.FrozenBatchNorm(4)
    meta = frozen.state_dict()._metadata[""]
    assert meta["version"] == syncbn.FrozenBatchNorm._version == 1
    again = syncbn.FrozenBatchNorm(4)
    again.load_state_dict(frozen.state_dict())
    copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))
