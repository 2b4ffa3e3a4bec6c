"""Micro-batch regimes on real Gloo groups: fallbacks, debiased EMA, accumulate_bn_stats,
recompute_bn_stats and FrozenBatchNorm, each against a single-process float64 reference."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-10


def _make(kind: str, c: int, **kwargs) -> syncbn.SyncBatchNorm:
    cls = {"bn": syncbn.SyncBatchNorm, "renorm": syncbn.SyncBatchRenorm}[kind]
    return cls(c, dtype=torch.float64, **kwargs)


def _span(sizes, rank):
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


def _all_reduce(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance over every dim but 1."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def _train_once(layer, rank, sizes, gen):
    full = torch.randn(sum(sizes), layer.num_features, 2, generator=gen, dtype=torch.float64) * 2 + 1
    lo, hi = _span(sizes, rank)
    layer(full[lo:hi]).sum().backward()
    layer.zero_grad()


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_state_unchanged(layer, before, what, steps=0):
    """Every entry of the state unchanged, but num_batches_tracked grown by ``steps``."""
    for key, value in before.items():
        if key == "num_batches_tracked":
            value = value + steps
        assert torch.equal(layer.state_dict()[key], value), f"{what}: {key} changed"


# ----------------------------------------------------------------------------------------------
# Fallbacks: the decision comes from the all-reduced count, so every rank takes it


def _empty_group(rank, world_size, kind):
    gen = torch.Generator().manual_seed(1)
    layer = _make(kind, 3)
    _train_once(layer, rank, [2] * world_size, gen)
    before = _state(layer)
    x = torch.zeros(0, 3, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    # Like torch's layers, the empty step counts (num_batches_tracked) but changes no statistic.
    _assert_state_unchanged(layer, before, "empty group", steps=1)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    # The group is still in step: a normal step runs and agrees on every rank.
    _train_once(layer, rank, [1] * world_size, gen)
    assert int(layer.num_batches_tracked) == 3
    stats = torch.cat([layer.running_mean, layer.running_var])
    assert torch.equal(_all_reduce(stats), stats * world_size)


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_empty_group_returns_empty_output_without_update(kind):
    run_on_ranks(2, _empty_group, kind)


def _too_few_raise(rank, world_size, kind, sizes, min_count):
    layer = _make(kind, 3, min_count=min_count)
    before = _state(layer)
    x = torch.randn(sizes[rank], 3, dtype=torch.float64)
    name = r"SyncBatchRenorm\(3\)" if kind == "renorm" else r"SyncBatchNorm\(3\)"
    with pytest.raises(ValueError) as info:
        layer(x)
    msg = str(info.value)
    count = sum(sizes)
    expected = f"{name}: expected at least {min_count} values per channel across the process group.*got {count}\\."
    assert re.match(expected, msg), msg
    assert "larger batch" in msg and "drop_last=True" in msg and "fallback='running'" in msg, msg
    # torch counts the step before it raises for too few values; so does syncbn.
    _assert_state_unchanged(layer, before, "after the error", steps=1)
    # Every rank raised after the same single all_reduce: the group is still in step.
    _train_once(layer, rank, [2] * world_size, torch.Generator().manual_seed(0))
    dist.barrier()


@pytest.mark.parametrize(
    "world_size,sizes,min_count,kind",
    [(2, [1, 0], 2, "bn"), (3, [2, 1, 1], 5, "bn"), (2, [0, 1], 2, "renorm")],
    ids=["count1", "below-min_count", "renorm"],
)
def test_too_few_values_raise_on_every_rank(world_size, sizes, min_count, kind):
    run_on_ranks(world_size, _too_few_raise, kind, sizes, min_count)


def _too_few_running(rank, world_size, kind, sizes, min_count):
    gen = torch.Generator().manual_seed(2)
    layer = _make(kind, 3, min_count=min_count, fallback="running")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(generator=gen)
    _train_once(layer, rank, [3] * world_size, gen)  # running stats away from (0, 1)
    before = _state(layer)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    # 2-D input: the count per channel is the number of samples.
    full = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64, requires_grad=True)
    lo, hi = _span(sizes, rank)
    x = full.detach()[lo:hi].clone().requires_grad_()
    y = layer(x)
    y_ref = F.batch_norm(full, layer.running_mean, layer.running_var, weight, bias, False, 0.0, layer.eps)
    assert_close(y, y_ref[lo:hi], TOL, "output (eval math)")
    grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    y.backward(grad[lo:hi])
    y_ref.backward(grad)
    assert_close(x.grad, full.grad[lo:hi], TOL, "grad_input")
    assert_close(_all_reduce(layer.weight.grad), weight.grad, TOL, "grad_weight")
    assert_close(_all_reduce(layer.bias.grad), bias.grad, TOL, "grad_bias")
    assert weight.grad.abs().sum() > 0 and bias.grad.abs().sum() > 0
    _assert_state_unchanged(layer, before, "fallback='running'", steps=1)
    _train_once(layer, rank, [2] * world_size, gen)
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize(
    "world_size,sizes,min_count,kind",
    [(2, [1, 0], 2, "bn"), (3, [1, 2, 0], 4, "bn"), (2, [0, 1], 2, "renorm")],
    ids=["count1", "below-min_count", "renorm"],
)
def test_too_few_values_fall_back_to_running_stats(world_size, sizes, min_count, kind):
    run_on_ranks(world_size, _too_few_running, kind, sizes, min_count)


def test_fallbacks_without_process_group():
    layer = syncbn.SyncBatchNorm(3, fallback="raise")
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\): expected at least 2 values per channel in the batch.*got 1\."):
        layer(torch.randn(1, 3))
    layer = syncbn.SyncBatchNorm(3, fallback="running")
    layer.running_mean.fill_(0.5)
    x = torch.randn(1, 3)
    assert torch.equal(layer(x), F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps))
    assert int(layer.num_batches_tracked) == 1  # a training step, counted as torch counts it
    with pytest.raises(ValueError, match="min_count >= 2"):
        syncbn.SyncBatchNorm(3, min_count=1)


# ----------------------------------------------------------------------------------------------
# debias=True: the bias-corrected average of a zero-initialised EMA


def _debias(rank, world_size, sizes, momentum, steps):
    gen = torch.Generator().manual_seed(4)
    layer = _make("bn", 3, momentum=momentum, debias=True)
    lo, hi = _span(sizes, rank)
    ema_mean = torch.zeros(3, dtype=torch.float64)
    ema_var = torch.zeros(3, dtype=torch.float64)
    for t in range(1, steps + 1):
        full = torch.randn(sum(sizes), 3, 2, generator=gen, dtype=torch.float64) * t + t
        layer(full[lo:hi])
        mean, var = _pooled(full)
        ema_mean = (1 - momentum) * ema_mean + momentum * mean
        ema_var = (1 - momentum) * ema_var + momentum * var
        correction = 1 - (1 - momentum) ** t
        assert_close(layer.running_mean, ema_mean / correction, 1e-12, f"step {t} running_mean")
        assert_close(layer.running_var, ema_var / correction, 1e-12, f"step {t} running_var")
        assert int(layer.num_batches_tracked) == t


@pytest.mark.parametrize("world_size,sizes", [(2, [2, 3]), (3, [1, 0, 4])], ids=["uneven2", "empty3"])
def test_debias_matches_closed_form(world_size, sizes):
    run_on_ranks(world_size, _debias, sizes, 0.2, 5)


def test_debias_without_process_group():
    _debias(0, 1, [4], 0.05, 4)


# ----------------------------------------------------------------------------------------------
# accumulate_bn_stats: k micro-batches update like one batch norm step on their union


def _accumulate(rank, world_size, kind, momentum, debias, micro_sizes, rounds=2):
    """micro_sizes[k][rank]: rank's size in micro-batch k. Two layers, to check every layer is handled."""
    gen = torch.Generator().manual_seed(5)
    extra = {"debias": True} if debias else {}
    layers = nn.ModuleList([_make(kind, 3, momentum=momentum, **extra), _make(kind, 3, momentum=momentum, **extra)])
    ref_mean = [torch.zeros(3, dtype=torch.float64) for _ in layers]
    ref_var = [torch.ones(3, dtype=torch.float64) for _ in layers]
    for rnd in range(1, rounds + 1):
        seen = [[] for _ in layers]
        before = _state(layers)
        with syncbn.accumulate_bn_stats(layers):
            for sizes in micro_sizes:
                lo, hi = _span(sizes, rank)
                for i, layer in enumerate(layers):
                    full = torch.randn(sum(sizes), 3, 2, generator=gen, dtype=torch.float64) * (i + 1) + rnd * (i - 1)
                    x = full[lo:hi].clone().requires_grad_()
                    y = layer(x)
                    if kind == "bn":
                        # Each micro-batch is still normalized with its own synchronized statistics.
                        full_ref = full.clone().requires_grad_()
                        y_ref = F.batch_norm(full_ref, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                        assert_close(y, y_ref[lo:hi], TOL, f"round {rnd} micro-batch output")
                        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
                        y.backward(grad[lo:hi])
                        y_ref.backward(grad)
                        assert_close(x.grad, full_ref.grad[lo:hi], TOL, "micro-batch grad_input")
                    else:
                        y.sum().backward()
                    seen[i].append(full)
            _assert_state_unchanged(layers, before, "inside accumulate_bn_stats")
        for i, layer in enumerate(layers):
            mean, var = _pooled(torch.cat(seen[i]))
            if momentum is None:
                factor = 1.0 / rnd
            elif debias:
                factor = momentum / (1 - (1 - momentum) ** rnd)
            else:
                factor = momentum
            ref_mean[i] = (1 - factor) * ref_mean[i] + factor * mean
            ref_var[i] = (1 - factor) * ref_var[i] + factor * var
            assert_close(layer.running_mean, ref_mean[i], TOL, f"round {rnd} layer {i} running_mean")
            assert_close(layer.running_var, ref_var[i], TOL, f"round {rnd} layer {i} running_var")
            assert int(layer.num_batches_tracked) == rnd
            assert layer._stats_sink is None


@pytest.mark.parametrize(
    "world_size,kind,momentum,debias,micro_sizes",
    [
        (2, "bn", 0.1, False, [[2, 2], [2, 2], [2, 2]]),
        (3, "bn", None, False, [[1, 2, 0], [0, 3, 1], [2, 2, 2]]),
        (2, "bn", 0.3, True, [[1, 3], [2, 0]]),
        (2, "renorm", 0.1, False, [[2, 1], [0, 3], [1, 1]]),
    ],
    ids=["even2", "cumulative-uneven3", "debias2", "renorm2"],
)
def test_accumulate_equals_one_step_on_union(world_size, kind, momentum, debias, micro_sizes):
    run_on_ranks(world_size, _accumulate, kind, momentum, debias, micro_sizes)


def test_accumulate_matches_torch_batchnorm_single_process():
    """k micro-batches of b leave what one nn.BatchNorm2d step on the k*b samples leaves."""
    torch.manual_seed(0)
    layer = syncbn.SyncBatchNorm(4, dtype=torch.float64)
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    xs = [torch.randn(2, 4, 3, 3, dtype=torch.float64) * 3 + 1 for _ in range(4)]
    with syncbn.accumulate_bn_stats(layer):
        for x in xs:
            layer(x)
    ref(torch.cat(xs))
    for key, value in ref.state_dict().items():
        assert_close(layer.state_dict()[key], value, 1e-12, key)


def test_accumulate_error_paths():
    layer = syncbn.SyncBatchNorm(3)
    before = _state(layer)
    with pytest.raises(RuntimeError, match="boom"):
        with syncbn.accumulate_bn_stats(layer):
            layer(torch.randn(4, 3))
            raise RuntimeError("boom")
    _assert_state_unchanged(layer, before, "after an exception")
    assert layer._stats_sink is None
    with syncbn.accumulate_bn_stats(layer):
        with pytest.raises(ValueError, match="already collecting"):
            with syncbn.accumulate_bn_stats(layer):
                pass
    with syncbn.accumulate_bn_stats(layer):
        pass  # no forward: no update
    _assert_state_unchanged(layer, before, "empty accumulation")
    with pytest.raises(ValueError, match=r"torch batch norms 1 \(BatchNorm1d\).*convert_sync_bn"):
        with syncbn.accumulate_bn_stats(nn.Sequential(syncbn.SyncBatchNorm(3), nn.BatchNorm1d(3))):
            pass


# ----------------------------------------------------------------------------------------------
# recompute_bn_stats: exact pooled statistics over every batch on every rank


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.5), nn.ReLU(),
        nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4, momentum=None)),
    ).double()


def _recompute(rank, world_size, batch_sizes):
    torch.manual_seed(0)
    ref = _small_net()
    model = syncbn.convert_sync_bn(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(6)
    fulls = [torch.randn(sum(s), 2, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1 for s in batch_sizes]
    fulls.append(torch.full((sum(batch_sizes[0]), 2, 3, 3), 1e3, dtype=torch.float64))  # must not be used
    spans = [_span(s, rank) for s in batch_sizes] + [_span(batch_sizes[0], rank)]
    batches = [(f[lo:hi], torch.zeros(hi - lo)) for f, (lo, hi) in zip(fulls, spans)]

    # Reference: torch BN in training mode on the concatenated batches, recording each BN's inputs.
    seen = {}
    bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns):
        bn.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0].detach()))
    with torch.no_grad():
        for f in fulls[:-1]:
            ref(f)

    model.eval()
    model[1].train()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    counters = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    out = syncbn.recompute_bn_stats(model, iter(batches), num_batches=len(batch_sizes))
    assert out is model
    assert [m.training for m in model.modules()] == flags
    assert counters == [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert all(p.grad is None for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        mean, var = _pooled(torch.cat(seen[i]))
        assert_close(layer.running_mean, mean, 1e-9, f"layer {i} running_mean")
        assert_close(layer.running_var, var, 1e-9, f"layer {i} running_var")


@pytest.mark.parametrize(
    "world_size,batch_sizes",
    [(2, [[2, 2], [1, 3], [0, 2]]), (3, [[1, 2, 1], [2, 0, 2], [1, 1, 1]])],
    ids=["uneven-empty2", "uneven-empty3"],
)
def test_recompute_equals_pooled_statistics(world_size, batch_sizes):
    run_on_ranks(world_size, _recompute, batch_sizes)


def test_recompute_batch_formats_and_errors():
    torch.manual_seed(0)
    layer = syncbn.SyncBatchNorm(2, dtype=torch.float64)
    xs = [torch.randn(3, 2, dtype=torch.float64) + i for i in range(3)]
    mean, var = _pooled(torch.cat(xs))
    for batches in (xs, [(x, None) for x in xs], [[x] for x in xs]):
        syncbn.recompute_bn_stats(layer, batches)
        assert_close(layer.running_mean, mean, 1e-12, "running_mean")
        assert_close(layer.running_var, var, 1e-12, "running_var")

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = syncbn.SyncBatchNorm(2, dtype=torch.float64)

        def forward(self, image):
            return self.bn(image)

    kw = syncbn.recompute_bn_stats(Kw(), [{"image": x} for x in xs])
    assert_close(kw.bn.running_var, var, 1e-12, "dict batches")
    with pytest.raises(ValueError, match="expected each batch to be a Tensor"):
        syncbn.recompute_bn_stats(layer, [3.0])
    assert layer._stats_sink is None and layer.training
    with pytest.raises(ValueError, match="num_batches >= 0"):
        syncbn.recompute_bn_stats(layer, xs, num_batches=-1)
    with pytest.raises(ValueError, match="convert_sync_bn"):
        syncbn.recompute_bn_stats(nn.BatchNorm1d(2), xs)


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm: a per-channel affine map in every mode, never communicating


def _frozen_reference(layer, x):
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def test_frozen_is_affine_in_every_mode():
    torch.manual_seed(0)
    frozen = syncbn.FrozenBatchNorm(4, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.normal_()
        frozen.running_mean.normal_()
        frozen.running_var.uniform_(0.5, 2.0)
    before = _state(frozen)
    assert list(frozen.parameters()) == []
    for mode in (True, False):
        frozen.train(mode)
        for shape in [(1, 4), (2, 4, 3), (2, 4, 3, 3), (0, 4, 2)]:
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            y = frozen(x)
            assert_close(y, _frozen_reference(frozen, x), 1e-12, f"output {shape} training={mode}")
            g = torch.randn_like(y)
            y.backward(g)
            expected = g * (frozen.weight / torch.sqrt(frozen.running_var + frozen.eps)).reshape((1, -1) + (1,) * (len(shape) - 2))
            assert_close(x.grad, expected, 1e-12, "grad_input")
    _assert_state_unchanged(frozen, before, "FrozenBatchNorm")
    with pytest.raises(ValueError, match=r"FrozenBatchNorm\(4\): expected input of shape \(N, 4, \*\).*got \(2, 3\)"):
        frozen(torch.randn(2, 3))


def test_frozen_state_dict_compatible_with_batchnorm():
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
        ref.weight.normal_()
    ref.eval()
    frozen = syncbn.FrozenBatchNorm(3)
    frozen.load_state_dict(ref.state_dict())
    assert list(frozen.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(frozen.train()(x), ref(x))
    # torchvision's FrozenBatchNorm2d checkpoints have no num_batches_tracked.
    legacy = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    syncbn.FrozenBatchNorm(3).load_state_dict(legacy)


def _frozen_on_one_rank(rank, world_size):
    frozen = syncbn.FrozenBatchNorm(3)
    bn = syncbn.SyncBatchNorm(3)
    if rank == 0:
        for _ in range(3):
            x = torch.randn(2, 3, 2, requires_grad=True)
            frozen.train()(x).sum().backward()  # no collective: nobody waits
    bn(torch.randn(2, 3, 2)).sum().backward()
    dist.barrier()


def test_frozen_never_communicates():
    run_on_ranks(2, _frozen_on_one_rank, timeout=60)
