"""SyncBatchNorm against torch's single-process BatchNorm on the concatenated batch, on real Gloo groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import syncbn
from syncbn import _stats as ST

from .harness import run_on_ranks
from .parity import assert_close, check_parity


def _same_across_group(results: list[dict]) -> None:
    by_group: dict[int, dict] = {}
    for res in results:
        first = by_group.setdefault(res["group"], res)
        for key in ("running_mean", "running_var"):
            assert torch.equal(res[key], first[key]), f"{key} differs across ranks of group {res['group']}"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parity_world_sizes(world_size):
    _same_across_group(run_on_ranks(world_size, check_parity))


def test_parity_two_groups_of_two():
    results = run_on_ranks(4, check_parity, group_size=2)
    _same_across_group(results)
    assert not torch.equal(results[0]["running_mean"], results[2]["running_mean"]), "groups must not mix"


@pytest.mark.parametrize(
    "world_size,sizes",
    [(2, [1, 5]), (3, [1, 4, 2]), (2, [0, 4]), (3, [2, 0, 3]), (4, [0, 0, 3, 1])],
    ids=["uneven2", "uneven3", "empty-first", "empty-middle", "two-empty"],
)
def test_parity_uneven_and_empty(world_size, sizes):
    _same_across_group(run_on_ranks(world_size, check_parity, sizes=sizes))


@pytest.mark.parametrize(
    "features", [(4,), (4, 7), (3, 5, 6), (2, 3, 4, 5)], ids=["NC", "NCL", "NCHW", "NCDHW"]
)
def test_parity_input_ranks(features):
    run_on_ranks(2, check_parity, features=features, sizes=[2, 3])


@pytest.mark.parametrize("features", [(4, 5, 5), (2, 3, 4, 5)], ids=["2d", "3d"])
def test_parity_channels_last(features):
    run_on_ranks(2, check_parity, features=features, channels_last=True, dtype="float32")


@pytest.mark.parametrize(
    "options",
    [
        {"affine": False},
        {"momentum": None, "steps": 4},
        {"track_running_stats": False},
        {"track_running_stats": False, "sizes": [0, 3]},
    ],
    ids=["affine-off", "momentum-none", "no-running-stats", "no-running-stats-empty"],
)
def test_parity_options(options):
    run_on_ranks(2, check_parity, **options)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_parity_dtypes(dtype):
    run_on_ranks(2, check_parity, dtype=dtype, sizes=[3, 5])


def _large_mean(rank, world_size, offset, scale):
    """At |mean|/std = offset/scale in float32: our error no worse than torch's own fp32 BatchNorm2d."""
    gen = torch.Generator().manual_seed(3)
    full = (torch.randn(8, 6, 7, 7, generator=gen, dtype=torch.float64) * scale + offset).float()
    lo, hi = rank * 4, rank * 4 + 4
    dut = syncbn.SyncBatchNorm(6)
    torch_bn = nn.BatchNorm2d(6)
    ref = nn.BatchNorm2d(6, dtype=torch.float64)
    for step in range(2):
        x = full + step
        y = dut(x[lo:hi])
        y_torch = torch_bn(x)
        y_ref = ref(x.double())
        ours = (y.double() - y_ref[lo:hi]).abs().max().item()
        theirs = (y_torch.double() - y_ref).abs().max().item()
        assert torch.isfinite(y).all(), "NaN/Inf in output"
        assert ours <= 2 * theirs + 1e-6, f"step {step}: error {ours:.3g} vs torch fp32 {theirs:.3g}"
    assert (dut.running_var >= 0).all()
    assert_close(dut.running_var, torch_bn.running_var, 1e-3, "running_var")
    assert_close(dut.running_mean, torch_bn.running_mean, 1e-6, "running_mean")


@pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (1e3, 1e-3), (5.0, 0.0)], ids=["1e4", "1e6", "constant"])
def test_large_mean_offset(offset, scale):
    run_on_ranks(2, _large_mean, offset, scale)


def _eval_on_rank0_only(rank, world_size):
    bn = syncbn.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2) + rank
    bn(x)  # one training step on all ranks
    bn.eval()
    if rank == 0:
        # Validation on rank 0 alone: must not wait for the others.
        for _ in range(5):
            bn(torch.randn(2, 3, 2, 2))
    bn.train()
    bn(x)  # all ranks still agree on the collective sequence
    stats = torch.stack([bn.running_mean, bn.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def test_eval_never_communicates():
    run_on_ranks(2, _eval_on_rank0_only, timeout=60)


def _bad_input(rank, world_size):
    bn = syncbn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\): expected input of shape \(N, 4, \*\).*got \(8, 3, 7, 7\)"):
        bn(torch.randn(8, 3, 7, 7))
    with pytest.raises(ValueError, match=r"got \(4,\)"):
        bn(torch.randn(4))
    # The errors were raised before any collective: the group is still in step.
    bn(torch.randn(2, 4, 3, 3))
    dist.barrier()


def test_bad_input_raises_before_collective():
    run_on_ranks(2, _bad_input, timeout=60)


def _functional(rank, world_size):
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    lo, hi = rank * 3, rank * 3 + 3
    y = syncbn.sync_batch_norm(full[lo:hi], rm, rv, training=True, momentum=0.2)
    y_ref = F.batch_norm(full, rm_ref, rv_ref, training=True, momentum=0.2)
    assert_close(y, y_ref[lo:hi], 1e-10, "functional output")
    assert_close(rm, rm_ref, 1e-12, "functional running_mean")
    assert_close(rv, rv_ref, 1e-12, "functional running_var")


def test_functional_form():
    run_on_ranks(2, _functional)


def _jacobian(rank, world_size):
    """The full cross-rank Jacobian equals gamma/sqrt(var+eps) (delta - 1/m - xmu_i xmu_j / (m (var+eps)))."""
    sizes = [2, 3]
    m = sum(sizes)
    gen = torch.Generator().manual_seed(11)
    full = torch.randn(m, 1, generator=gen, dtype=torch.float64) * 2 + 1
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    bn = syncbn.SyncBatchNorm(1, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.fill_(1.7)
    rows = []
    for j in range(m):
        x = full[lo:hi].clone().requires_grad_()
        y = bn(x)
        g = torch.zeros_like(y)
        if lo <= j < hi:
            g[j - lo] = 1.0
        y.backward(g)
        rows.append(x.grad[:, 0].clone())
    block = torch.stack(rows)  # d y_j / d x_i for all j and the local i
    gathered = [torch.zeros(m, max(sizes), dtype=torch.float64) for _ in sizes]
    padded = torch.zeros(m, max(sizes), dtype=torch.float64)
    padded[:, : hi - lo] = block
    dist.all_gather(gathered, padded)
    jac = torch.cat([g[:, :s] for g, s in zip(gathered, sizes)], dim=1)
    x = full[:, 0]
    mu, var, eps = x.mean(), x.var(unbiased=False), bn.eps
    xmu = x - mu
    closed = 1.7 / torch.sqrt(var + eps) * (torch.eye(m, dtype=torch.float64) - 1.0 / m - torch.outer(xmu, xmu) / (m * (var + eps)))
    assert_close(jac, closed, 1e-10, "Jacobian")
    off_diag = jac[~torch.eye(m, dtype=torch.bool)]
    assert off_diag.abs().min() > 1e-6, "training-mode Jacobian must be dense, across ranks too"


def test_jacobian_closed_form_across_ranks():
    run_on_ranks(2, _jacobian)


def _scale_invariance(rank, world_size):
    """Scaling the previous layer's weights by c leaves the output alone and divides their grad by c."""
    torch.manual_seed(0)
    c = 7.5
    conv = nn.Conv2d(3, 5, 3, bias=False).double()
    # eps breaks the invariance by O(eps / var); a tiny eps makes it exact to float64 precision.
    bn = syncbn.SyncBatchNorm(5, eps=1e-14, dtype=torch.float64)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64) + rank
    g = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    y = bn(conv(x))
    y.backward(g)
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    with torch.no_grad():
        conv.weight.mul_(c)
    y_scaled = bn(conv(x))
    y_scaled.backward(g)
    assert_close(y_scaled, y, 1e-10, "output after scaling the previous layer's weights")
    assert_close(conv.weight.grad * c, grad, 1e-10, "grad of the scaled weights times c")


def test_scale_invariance():
    run_on_ranks(2, _scale_invariance)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
        )

    def forward(self, x):
        return self.body(x)


def _ddp_end_to_end(rank, world_size, broadcast_buffers):
    torch.manual_seed(0)
    ref = _Net().double()
    model = syncbn.convert_sync_bn(_Net().double())
    model.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    per_rank = 3
    for _ in range(3):
        x = torch.randn(per_rank * world_size, 3, 6, 6, generator=gen, dtype=torch.float64)
        target = torch.randn(per_rank * world_size, 4, generator=gen, dtype=torch.float64)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.mse_loss(ddp(x[sl]), target[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_ref = F.mse_loss(ref(x), target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
    for (name, p), p_ref in zip(model.state_dict().items(), ref.state_dict().values()):
        assert_close(p, p_ref, 1e-9, f"after 3 DDP steps: {name}")


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_ddp_matches_single_process_training(broadcast_buffers):
    run_on_ranks(2, _ddp_end_to_end, broadcast_buffers)


# ----------------------------------------------------------------------------------------------
# Without a process group (run in the pytest process itself)


@pytest.mark.parametrize(
    "shape,ref_cls", [((6, 4), nn.BatchNorm1d), ((6, 4, 9), nn.BatchNorm1d), ((6, 4, 3, 3), nn.BatchNorm2d), ((3, 4, 2, 3, 3), nn.BatchNorm3d)]
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_process_group_equals_torch(shape, ref_cls, momentum):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = ref_cls(4, momentum=momentum)
    bn = syncbn.SyncBatchNorm(4, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    bn.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(shape)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = bn(a), ref(b)
        assert torch.equal(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert torch.equal(a.grad, b.grad)
        assert torch.equal(bn.weight.grad, ref.weight.grad)
    for key, value in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key
    bn.eval()
    ref.eval()
    x = torch.randn(shape)
    assert torch.equal(bn(x), ref(x))


def test_no_process_group_bad_input():
    bn = syncbn.SyncBatchNorm(64)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(64\): expected input of shape \(N, 64, \*\).*got \(8, 32, 7, 7\)"):
        bn(torch.randn(8, 32, 7, 7))
    with pytest.raises(ValueError, match="fallback"):
        syncbn.SyncBatchNorm(4, fallback="nope")


def test_not_a_torch_syncbatchnorm_subclass():
    bn = syncbn.SyncBatchNorm(4)
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(bn, nn.SyncBatchNorm)
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(4).state_dict())


def test_saved_for_backward_is_input_plus_vectors():
    x = torch.randn(16, 32, 14, 14, requires_grad=True)
    st = ST.merge_rows(ST.local_row(x.detach()).unsqueeze(0))
    mean, var, count = st.mean.float(), st.var.float(), int(st.count)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    from syncbn._autograd import SyncNormFunction

    weight = torch.ones(32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SyncNormFunction.apply(x, weight, None, mean, var, 1e-5, count, None, None, False, None, None, None, None)
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    assert nbytes <= 1.05 * x.numel() * x.element_size(), f"saved {nbytes} bytes for a {x.numel() * 4}-byte input"


def _deepcopy_with_group(rank, world_size):
    import copy
    import pickle

    group = syncbn.new_sync_groups(world_size)
    model = syncbn.convert_sync_bn(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), process_group=group)
    ema = copy.deepcopy(model)  # what EMA helpers do; torch's ProcessGroup itself cannot be copied
    assert ema[1].process_group is group and ema[1].weight is not model[1].weight
    ema(torch.randn(2, 2, 3, 3) + rank)
    stats = ema[1].running_mean.clone()
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    assert torch.equal(gathered[0], gathered[1]), "the copy must still sync over the group"
    restored = pickle.loads(pickle.dumps(model[1]))
    assert restored.process_group is None  # a group only means something in the processes that made it


def test_deepcopy_and_pickle_with_explicit_group():
    run_on_ranks(2, _deepcopy_with_group)


def test_integer_input_rejected_before_any_collective():
    bn = syncbn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\): expected a floating-point input, got torch.int64"):
        bn(torch.zeros(0, 3, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Step counting like torch: every training forward counts, whatever the batch holds


def _sequence_against_torch(layer, ref, batches, slices, exact):
    """Feed each full batch to torch's ``ref`` and this rank's slice to ``layer``; after every step
    the counter must equal torch's and the running statistics torch's (bit for bit when ``exact``)."""
    for step, (full, (lo, hi)) in enumerate(zip(batches, slices)):
        count = full.numel() // full.shape[1]
        if count == 1:
            # torch counts the step, then refuses one value per channel; syncbn's fallback='running'
            # normalizes with the running statistics instead: the same state afterwards.
            with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                ref(full)
        else:
            ref(full)
        layer(full[lo:hi])
        what = f"step {step} ({count} values per channel)"
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1, what
        for key in ("running_mean", "running_var"):
            a, e = getattr(layer, key), getattr(ref, key)
            if exact:
                assert torch.equal(a, e), f"{what}: {key} not bit for bit torch's"
            else:
                assert_close(a, e, 1e-12, f"{what}: {key}")


def _counting_batches(sizes_per_step, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(s), c, 2, generator=gen, dtype=torch.float64) * 3 + 1 for s in sizes_per_step]


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_step_counting_without_group_is_torch_bit_for_bit(momentum):
    # Empty batches and a batch of one sample with one value per channel between normal ones:
    # num_batches_tracked counts every training forward, so momentum=None keeps dividing as torch.
    sizes = [[4], [0], [3], [1], [0], [5]]
    batches = [b[:, :, :1] if s == [1] else b for b, s in zip(_counting_batches(sizes), sizes)]
    ref = nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    layer = syncbn.SyncBatchNorm(3, momentum=momentum, fallback="running", dtype=torch.float64)
    _sequence_against_torch(layer, ref, batches, [(0, b.shape[0]) for b in batches], exact=True)
    # fallback='raise' (the default): raises like torch, after counting like torch.
    layer = syncbn.SyncBatchNorm(3, momentum=momentum, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected at least 2 values per channel"):
        layer(batches[3])
    assert int(layer.num_batches_tracked) == 1


def _counting_in_group(rank, world_size, kind):
    # Uneven, empty on this rank, empty on every rank, one value in the whole group (fallback).
    sizes = [[2, 3], [0, 2], [0, 0], [1, 0], [3, 0], [0, 0], [2, 2]]
    batches = _counting_batches(sizes, seed=1)
    slices = [(sum(s[:rank]), sum(s[: rank + 1])) for s in sizes]
    batches = [b[:, :, :1] if sum(s) == 1 else b for b, s in zip(batches, sizes)]
    ref = nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    group = dist.new_group(list(range(world_size)))
    cls = syncbn.SyncBatchRenorm if kind == "renorm" else syncbn.SyncBatchNorm
    # The classmethod torch users call, with an explicit group.
    layer = cls.convert_sync_batchnorm(nn.BatchNorm1d(3, momentum=None, dtype=torch.float64), group)
    assert type(layer) is cls and layer.process_group is group
    layer.fallback = "running"
    if kind == "renorm":
        layer.r_max, layer.d_max = 1.0, 0.0
    _sequence_against_torch(layer, ref, batches, slices, exact=False)
    stats = torch.cat([layer.running_mean, layer.running_var, layer.num_batches_tracked.double().view(1)])
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    assert all(torch.equal(g, stats) for g in gathered), "state differs across ranks"


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_step_counting_in_group_matches_torch_on_concatenated_batch(kind):
    run_on_ranks(2, _counting_in_group, kind)


# ----------------------------------------------------------------------------------------------
# Constructor parity: torch's bias argument, also on torch versions without it


def _torch_bn_without_bias(cls: type, c: int, **kwargs) -> nn.Module:
    """torch's ``cls(c, bias=False)``, built by hand where the installed torch lacks the argument."""
    from syncbn._compat import NORM_TAKES_BIAS as _TORCH_NORM_TAKES_BIAS

    if _TORCH_NORM_TAKES_BIAS:
        return cls(c, bias=False, **kwargs)
    layer = cls(c, **kwargs)
    layer.register_parameter("bias", None)
    return layer


def test_bias_false_matches_torch():
    torch.manual_seed(0)
    ref = _torch_bn_without_bias(nn.BatchNorm2d, 4, dtype=torch.float64)
    for layer in (
        syncbn.SyncBatchNorm(4, bias=False, dtype=torch.float64),
        syncbn.SyncBatchRenorm(4, momentum=0.1, bias=False, r_max=1.0, d_max=0.0, dtype=torch.float64),
    ):
        assert layer.bias is None and isinstance(layer.weight, nn.Parameter)
        assert list(layer.state_dict()) == list(ref.state_dict())
        x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
        assert_close(layer(x), ref(x), 1e-12, f"{type(layer).__name__} output")
    frozen = syncbn.FrozenBatchNorm(4, bias=False, dtype=torch.float64)
    assert frozen.bias is None and "bias" not in frozen.state_dict()
    ref.eval()
    frozen.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert torch.equal(frozen(x), ref(x))
    assert repr(frozen) == "FrozenBatchNorm(4, eps=1e-05, affine=True, bias=False)"
    # Refused with a reason, not silently ignored: these layers need running statistics.
    with pytest.raises(ValueError, match="FrozenBatchNorm\\(4\\): expected track_running_stats=True"):
        syncbn.FrozenBatchNorm(4, track_running_stats=False)
    with pytest.raises(ValueError, match="SyncBatchRenorm\\(4\\): expected track_running_stats=True"):
        syncbn.SyncBatchRenorm(4, track_running_stats=False)


def test_bias_false_on_torch_without_bias_argument(monkeypatch):
    """What torch versions whose batch norms take no ``bias`` get: syncbn builds it itself."""
    import inspect

    from torch.nn.modules import batchnorm as tbn

    from syncbn import batchnorm as sbn

    real_init = tbn._NormBase.__init__

    def old_norm_init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
        real_init(self, num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)

    def old_bn_init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
        tbn._NormBase.__init__(self, num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)

    def old_reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)  # no bias=False then: fails on None

    def old_extra_repr(self):
        return "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, track_running_stats={track_running_stats}".format(**self.__dict__)

    monkeypatch.setattr(tbn._NormBase, "__init__", old_norm_init)
    monkeypatch.setattr(tbn._BatchNorm, "__init__", old_bn_init)
    monkeypatch.setattr(tbn._NormBase, "reset_parameters", old_reset_parameters)
    monkeypatch.setattr(tbn._NormBase, "extra_repr", old_extra_repr)
    monkeypatch.setattr(sbn, "NORM_TAKES_BIAS", "bias" in inspect.signature(tbn._NormBase.__init__).parameters)
    assert not sbn.NORM_TAKES_BIAS
    with pytest.raises(TypeError):
        nn.BatchNorm2d(4, bias=False)  # the old torch really refuses it

    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    renorm = {"r_max": 1.0, "d_max": 0.0}
    for cls, kw, extra in ((syncbn.SyncBatchNorm, {}, ""), (syncbn.SyncBatchRenorm, renorm, ", r_max=1.0, d_max=0.0")):
        layer = cls(4, bias=False, dtype=torch.float64, **kw)
        assert layer.bias is None and isinstance(layer.weight, nn.Parameter)
        assert "bias" not in layer.state_dict() and [n for n, _ in layer.named_parameters()] == ["weight"]
        momentum = layer.momentum
        assert repr(layer) == (
            f"{cls.__name__}(4, eps=1e-05, momentum={momentum}, affine=True, bias=False, track_running_stats=True{extra})"
        )
        layer.reset_parameters()
        y = layer(x)
        expected = F.batch_norm(x, None, None, layer.weight, None, True, 0.0, layer.eps)
        assert_close(y, expected, 1e-12, f"{cls.__name__} output")
        with_bias = cls(4, dtype=torch.float64)
        assert isinstance(with_bias.bias, nn.Parameter) and "bias=" not in repr(with_bias)


def test_constructor_signatures_cover_torchs():
    import inspect

    def params(cls):
        return inspect.signature(cls).parameters

    # nn.SyncBatchNorm's arguments exactly (order, kind, default), syncbn's own options after them.
    torch_sync, ours = params(nn.SyncBatchNorm), params(syncbn.SyncBatchNorm)
    assert list(ours)[: len(torch_sync)] == list(torch_sync)
    for name, p in torch_sync.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    # Every argument of the installed torch's BatchNorm2d on every layer, with torch's default
    # (Batch Renormalization's momentum default, 0.01, is the paper's).
    for cls in (syncbn.SyncBatchNorm, syncbn.SyncBatchRenorm, syncbn.FrozenBatchNorm):
        ps = params(cls)
        for name, p in params(nn.BatchNorm2d).items():
            assert name in ps, f"{cls.__name__} lacks torch's {name!r}"
            if not (cls is syncbn.SyncBatchRenorm and name == "momentum"):
                assert ps[name].default == p.default, f"{cls.__name__}.{name}"
    layer = syncbn.SyncBatchNorm(4, 1e-3, 0.2, False, False, None, "cpu", torch.float64)  # torch's positions
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.2, False, False)
    assert layer.process_group is None
    layer = syncbn.SyncBatchNorm(4, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.num_batches_tracked.dtype == torch.long


def test_convert_sync_batchnorm_classmethod():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(_torch_bn_without_bias(nn.BatchNorm2d, 4)), nn.SyncBatchNorm(5))
    params = [p for p in model.parameters()]
    # The line torch users write, with nn.SyncBatchNorm changed to syncbn.SyncBatchNorm.
    converted = syncbn.SyncBatchNorm.convert_sync_batchnorm(model)
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in layers] == [syncbn.SyncBatchNorm] * 3
    assert [p for p in converted.parameters()] == params and all(a is b for a, b in zip(converted.parameters(), params))
    assert layers[1].bias is None and layers[1].weight is not None
    assert [m._layer_path for m in layers] == ["0", "1.0", "2"]
    single = syncbn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(4))
    assert type(single) is syncbn.SyncBatchNorm
    renorm = syncbn.SyncBatchRenorm.convert_sync_batchnorm(nn.BatchNorm2d(4, momentum=0.05))
    assert type(renorm) is syncbn.SyncBatchRenorm and renorm.momentum == 0.05
