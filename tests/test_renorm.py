"""SyncBatchRenorm against the closed form of Batch Renormalization on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn import functional as BF

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-10


def _view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _closed_form(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Ioffe (2017) in float64 on the whole batch: output (differentiable), r and d."""
    dims = [0] + list(range(2, x.dim()))
    mu = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + eps).sqrt()
    sigma = (running_var + eps).sqrt()
    r = (sigma_b / sigma).detach().clamp(1.0 / r_max, r_max)
    d = ((mu - running_mean) / sigma).detach().clamp(-d_max, d_max)
    n = x.dim()
    xhat = (x - _view(mu, n)) / _view(sigma_b, n)
    return _view(weight, n) * (xhat * _view(r, n) + _view(d, n)) + _view(bias, n), r, d


def _ema(running, batch, momentum):
    return (1 - momentum) * running + momentum * batch


def _all_reduce(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def _renorm_parity(rank, world_size, sizes, r_max, d_max, steps=4, momentum=0.3, features=(3, 4)):
    """W ranks of SyncBatchRenorm vs the single-process closed form: outputs, grads, running stats, eval."""
    gen = torch.Generator().manual_seed(7)
    c = features[0]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    layer = syncbn.SyncBatchRenorm(c, momentum=momentum, r_max=r_max, d_max=d_max, dtype=torch.float64)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    clipped = {"r_clipped": False, "r_free": False, "d_clipped": False, "d_free": False}
    n_total = sum(sizes) * int(torch.tensor(features[1:]).prod())  # values per channel
    for step in range(steps):
        # Per-channel offsets and spreads that move between steps, so r and d are sometimes clipped.
        offset = torch.randn(c, generator=gen, dtype=torch.float64) * 1.5
        spread = torch.exp(torch.randn(c, generator=gen, dtype=torch.float64))
        full = torch.randn(sum(sizes), *features, generator=gen, dtype=torch.float64)
        full = (full * _view(spread, full.dim()) + _view(offset, full.dim())).requires_grad_()
        local = full.detach()[lo:hi].clone().requires_grad_()
        y = layer(local)
        y_ref, r, d = _closed_form(full, weight, bias, rm, rv, layer.eps, r_max, d_max)
        assert_close(y, y_ref[lo:hi], TOL, f"step {step} output")
        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
        y.backward(grad[lo:hi])
        y_ref.backward(grad)
        assert_close(local.grad, full.grad[lo:hi], TOL, f"step {step} grad_input")
        assert_close(_all_reduce(layer.weight.grad), weight.grad, TOL, f"step {step} grad_weight")
        assert_close(_all_reduce(layer.bias.grad), bias.grad, TOL, f"step {step} grad_bias")
        layer.zero_grad()
        weight.grad = bias.grad = None
        with torch.no_grad():
            dims = [0] + list(range(2, full.dim()))
            rm = _ema(rm, full.mean(dims), momentum)
            rv = _ema(rv, full.var(dims, unbiased=False) * n_total / (n_total - 1), momentum)
        assert_close(layer.running_mean, rm, TOL, f"step {step} running_mean")
        assert_close(layer.running_var, rv, TOL, f"step {step} running_var")
        assert int(layer.num_batches_tracked) == step + 1
        at_r = (r == r_max) | (r == 1.0 / r_max)
        at_d = d.abs() == d_max
        clipped["r_clipped"] |= bool(at_r.any())
        clipped["r_free"] |= bool((~at_r).any())
        clipped["d_clipped"] |= bool(at_d.any())
        clipped["d_free"] |= bool((~at_d).any())
    layer.eval()
    x = torch.randn(sum(sizes), *features, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = F.batch_norm(x, rm, rv, weight, bias, False, 0.0, layer.eps)
        assert_close(layer(x[lo:hi]), expected[lo:hi], TOL, "eval output")
    return clipped


@pytest.mark.parametrize(
    "world_size,sizes",
    [(2, [3, 3]), (2, [0, 4]), (3, [1, 4, 2]), (3, [2, 0, 3])],
    ids=["even2", "empty-first", "uneven3", "empty-middle"],
)
def test_parity_with_closed_form(world_size, sizes):
    results = run_on_ranks(world_size, _renorm_parity, sizes, 1.5, 0.7)
    seen = {k: any(r[k] for r in results) for k in results[0]}
    # The data must exercise both sides of both clips, or the test proves less than it claims.
    assert all(seen.values()), f"clip regimes not all exercised: {seen}"


def test_parity_unclipped_4d():
    run_on_ranks(2, _renorm_parity, [2, 3], 100.0, 100.0, features=(2, 3, 3))


def _equals_sync_bn(rank, world_size, sizes):
    """r_max=1, d_max=0 (and a schedule still in warm-up) give SyncBatchNorm bit for bit."""
    gen = torch.Generator().manual_seed(3)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    bn = syncbn.SyncBatchNorm(3, momentum=0.2)
    renorms = [
        syncbn.SyncBatchRenorm(3, momentum=0.2, r_max=1.0, d_max=0.0),
        syncbn.SyncBatchRenorm(3, momentum=0.2, schedule=syncbn.RenormSchedule(warmup=10, r_max_at=20, d_max_at=20)),
    ]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(generator=gen)
    for layer in renorms:
        layer.load_state_dict(bn.state_dict())
    for step in range(3):
        full = torch.randn(sum(sizes), 3, 5, generator=gen) * 3 + 2
        grad = torch.randn(full.shape, generator=gen)
        x = full[lo:hi].clone().requires_grad_()
        y = bn(x)
        y.backward(grad[lo:hi])
        for i, layer in enumerate(renorms):
            x2 = full[lo:hi].clone().requires_grad_()
            y2 = layer(x2)
            y2.backward(grad[lo:hi])
            what = f"step {step} layer {i}"
            assert torch.equal(y2, y), f"{what}: output"
            assert torch.equal(x2.grad, x.grad), f"{what}: grad_input"
            assert torch.equal(layer.weight.grad, bn.weight.grad), f"{what}: grad_weight"
            assert torch.equal(layer.bias.grad, bn.bias.grad), f"{what}: grad_bias"
            for key, value in bn.state_dict().items():
                assert torch.equal(layer.state_dict()[key], value), f"{what}: {key}"
            layer.zero_grad()
        bn.zero_grad()


@pytest.mark.parametrize("world_size,sizes", [(2, [2, 3]), (3, [0, 3, 1])], ids=["uneven2", "empty3"])
def test_plain_limits_equal_sync_batch_norm(world_size, sizes):
    run_on_ranks(world_size, _equals_sync_bn, sizes)


# ----------------------------------------------------------------------------------------------
# In the pytest process (no process group): formulas, schedule, module contract


def test_renorm_factors_formulas():
    # Hand-computed with eps = 0: sigma_B = 2, sigma = 1 -> r = 2; (mu_B - mu) / sigma = (7 - 1) / 2 = 3.
    mean = torch.tensor([7.0, 7.0, -5.0, 0.0], dtype=torch.float64)
    var = torch.tensor([4.0, 4.0, 0.01, 1.0], dtype=torch.float64)
    rm = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    rv = torch.tensor([1.0, 4.0, 4.0, 1.0], dtype=torch.float64)
    r, d = BF.renorm_factors(mean, var, rm, rv, 0.0, 3.0, 5.0)
    assert torch.equal(r, torch.tensor([2.0, 1.0, 1.0 / 3.0, 1.0], dtype=torch.float64))  # 0.05 -> 1/3
    assert torch.equal(d, torch.tensor([5.0, 3.0, -3.0, 0.0], dtype=torch.float64))  # 6 -> 5
    r, d = BF.renorm_factors(mean, var, rm, rv, 0.0, 1.5, 2.0)
    assert torch.equal(r, torch.tensor([1.5, 1.0, 1.0 / 1.5, 1.0], dtype=torch.float64))
    assert torch.equal(d, torch.tensor([2.0, 2.0, -2.0, 0.0], dtype=torch.float64))
    assert not r.requires_grad and not d.requires_grad


def test_schedule_values_and_bounds():
    s = syncbn.RenormSchedule(warmup=5000, r_max_at=40000, d_max_at=25000)
    assert s.limits(0, 3.0, 5.0) == (1.0, 0.0)
    assert s.limits(4999, 3.0, 5.0) == (1.0, 0.0)
    assert s.limits(5000, 3.0, 5.0) == (1.0, 0.0)
    assert s.limits(15000, 3.0, 5.0) == pytest.approx((1.0 + 2.0 * 10000 / 35000, 2.5))
    assert s.limits(22500, 3.0, 5.0) == (2.0, 4.375)
    assert s.limits(25000, 3.0, 5.0) == pytest.approx((1.0 + 2.0 * 20000 / 35000, 5.0))
    assert s.limits(40000, 3.0, 5.0) == (3.0, 5.0)
    for r_max, d_max in [(3.0, 5.0), (2.7, 0.3), (1.1, 1e-3)]:
        prev = (1.0, 0.0)
        for step in range(0, 100_001, 97):
            r, d = s.limits(step, r_max, d_max)
            assert 1.0 <= r <= r_max and 0.0 <= d <= d_max, (step, r, d)
            assert r >= prev[0] and d >= prev[1], f"not monotone at {step}"
            prev = (r, d)
        assert s.limits(100_000, r_max, d_max) == (r_max, d_max)
    # No warm-up and ramps of length 0 jump straight to the final values.
    assert syncbn.RenormSchedule(0, 0, 0).limits(0, 3.0, 5.0) == (3.0, 5.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"warmup": -1}, "warmup >= 0"), ({"warmup": 10, "r_max_at": 5}, "r_max_at >= warmup"), ({"warmup": 10, "d_max_at": 9}, "d_max_at")],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        syncbn.RenormSchedule(**{"warmup": 0, "r_max_at": 10, "d_max_at": 10, **kwargs})


def test_layer_follows_long_schedule():
    """Step a schedule with tiny inputs: every step clips at exactly the scheduled limits."""
    torch.manual_seed(0)
    r_final, d_final, warmup, r_at, d_at = 2.5, 1.5, 10, 60, 40
    layer = syncbn.SyncBatchRenorm(
        2, momentum=1e-3, r_max=r_final, d_max=d_final,
        schedule=syncbn.RenormSchedule(warmup, r_at, d_at), dtype=torch.float64,
    )
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    for step in range(75):
        ramp = lambda at: min(1.0, max(0.0, (step - warmup) / (at - warmup)))  # noqa: E731
        r_lim, d_lim = 1.0 + (r_final - 1.0) * ramp(r_at), d_final * ramp(d_at)
        assert layer.current_limits() == pytest.approx((r_lim, d_lim), abs=1e-15)
        # Batch std exactly 5 and mean exactly 3 against running stats near (0, 1): both clips bind.
        z = torch.randn(4, 2, dtype=torch.float64)
        x = (z - z.mean(0)) / z.std(0, unbiased=False) * 5 + 3
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        y_ref, r, d = _closed_form(x, w, b, rm, rv, layer.eps, r_lim, max(d_lim, 0.0))
        assert_close(layer(x), y_ref, TOL, f"step {step}")
        assert torch.equal(r, torch.full_like(r, r_lim)) and torch.equal(d, torch.full_like(d, d_lim))
    # Far past the end of the ramps (as after a resumed checkpoint): the final limits, never more.
    layer.num_batches_tracked.fill_(100_000)
    state = layer.state_dict()
    fresh = syncbn.SyncBatchRenorm(
        2, momentum=1e-3, r_max=r_final, d_max=d_final,
        schedule=syncbn.RenormSchedule(warmup, r_at, d_at), dtype=torch.float64,
    )
    assert fresh.current_limits() == (1.0, 0.0)
    fresh.load_state_dict(state)
    assert fresh.current_limits() == (r_final, d_final)
    z = torch.randn(4, 2, dtype=torch.float64)
    x = (z - z.mean(0)) / z.std(0, unbiased=False) * 50 + 30
    y_ref, r, d = _closed_form(x, w, b, fresh.running_mean.clone(), fresh.running_var.clone(), fresh.eps, r_final, d_final)
    assert_close(fresh(x), y_ref, TOL, "step 100000")
    assert torch.equal(r, torch.full_like(r, r_final)) and torch.equal(d, torch.full_like(d, d_final))
    assert int(fresh.num_batches_tracked) == 100_001


def test_module_contract():
    layer = syncbn.SyncBatchRenorm(4)
    assert layer.momentum == 0.01 and layer.r_max == 3.0 and layer.d_max == 5.0 and layer.schedule is None
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert isinstance(layer, syncbn.SyncBatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
    assert "r_max=3.0" in repr(layer)
    # Eval is exactly batch-norm eval with the running statistics.
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2.0)
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    layer.load_state_dict(ref.state_dict())
    layer.eval()
    ref.eval()
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(layer(x), ref(x))


def test_bad_arguments_and_input():
    with pytest.raises(ValueError, match=r"SyncBatchRenorm\(4\): expected r_max >= 1, got 0.5"):
        syncbn.SyncBatchRenorm(4, r_max=0.5)
    with pytest.raises(ValueError, match=r"SyncBatchRenorm\(4\): expected d_max >= 0, got -1"):
        syncbn.SyncBatchRenorm(4, d_max=-1.0)
    with pytest.raises(ValueError, match="limits"):
        syncbn.SyncBatchRenorm(4, schedule=object())
    with pytest.raises(ValueError, match=r"SyncBatchRenorm\(4\): expected input of shape \(N, 4, \*\).*got \(2, 3\)"):
        syncbn.SyncBatchRenorm(4)(torch.randn(2, 3))
