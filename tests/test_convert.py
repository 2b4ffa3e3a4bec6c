"""convert_sync_bn / revert_sync_bn (plain and renorm), freeze_bn / unfreeze_bn, convert_bn_to_gn on nested models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Nested(nn.Module):
    """BatchNorm1d/2d/3d and nn.SyncBatchNorm at several depths, with non-default options."""

    def __init__(self, untracked: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU())
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4, momentum=None, affine=False)),
                nn.ModuleDict({"norm": nn.SyncBatchNorm(4, momentum=0.3), "inst": nn.InstanceNorm2d(4)}),
            ]
        )
        self.head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=not untracked))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks[0](x.unsqueeze(2)).squeeze(2)
        x = self.blocks[1]["inst"](self.blocks[1]["norm"](x))
        return self.head(x.mean((2, 3)))


def _model(untracked: bool = True) -> _Nested:
    torch.manual_seed(0)
    model = _Nested(untracked).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
                if m.track_running_stats:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(7)
    model.stem[1].eval()
    model.stem[1].bias.requires_grad_(False)
    model.stem[1].qconfig = "qconfig-marker"
    return model


def _bns(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _same_objects(before: dict, after: dict, what: str) -> None:
    assert before.keys() == after.keys(), what
    for key in before:
        assert after[key] is before[key], f"{what}: {key} is not the same object"


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_convert_and_revert_keep_objects_flags_and_classes():
    model = _model()
    original = copy.deepcopy(model)
    before = _bns(model)
    classes = {n: type(m) for n, m in before.items()}
    tensors = {n: _tensors(m) for n, m in before.items()}
    flags = {n: (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) for n, m in before.items()}
    grads = {n: [p.requires_grad for p in m.parameters()] for n, m in before.items()}

    out = syncbn.convert_sync_bn(model, min_count=3, fallback="running", debias=True)
    assert out is model
    after = _bns(model)
    assert after.keys() == before.keys()
    for name, m in after.items():
        assert type(m) is syncbn.SyncBatchNorm, name
        _same_objects(tensors[name], _tensors(m), name)
        assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == flags[name], name
        assert [p.requires_grad for p in m.parameters()] == grads[name], name
        assert (m.min_count, m.fallback, m.debias) == (3, "running", True), name
        assert all(t.dtype == torch.float64 for t in m.parameters()), name
    assert model.stem[1].qconfig == "qconfig-marker"
    assert type(model.blocks[1]["inst"]) is nn.InstanceNorm2d
    _same_state(model, original)

    reverted = syncbn.revert_sync_bn(model)
    for name, m in _bns(reverted).items():
        assert type(m) is classes[name], name
        _same_objects(tensors[name], _tensors(m), name)
        assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == flags[name], name
    _same_state(reverted, original)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(reverted.eval()(x), original.eval()(x))


def test_root_batchnorm_returns_new_module():
    bn = nn.BatchNorm2d(4)
    sync = syncbn.convert_sync_bn(bn)
    assert type(sync) is syncbn.SyncBatchNorm and type(bn) is nn.BatchNorm2d
    assert sync.weight is bn.weight and sync.running_mean is bn.running_mean
    back = syncbn.revert_sync_bn(sync)
    assert type(back) is nn.BatchNorm2d and back.weight is bn.weight
    renorm = syncbn.convert_sync_bn(bn, renorm=True)
    assert type(renorm) is syncbn.SyncBatchRenorm
    assert type(syncbn.revert_sync_bn(renorm)) is nn.BatchNorm2d
    # Built directly, it reverts to the rank-agnostic BatchNormNd.
    assert type(syncbn.revert_sync_bn(syncbn.SyncBatchRenorm(3))) is syncbn.BatchNormNd


def test_convert_to_renorm():
    model = _model(untracked=False)
    original = copy.deepcopy(model)
    tensors = {n: _tensors(m) for n, m in _bns(model).items()}
    momenta = {n: m.momentum for n, m in _bns(model).items()}
    syncbn.convert_sync_bn(model, renorm=True, fallback="running")
    for name, m in _bns(model).items():
        assert type(m) is syncbn.SyncBatchRenorm, name
        assert (m.r_max, m.d_max, m.schedule, m.momentum, m.fallback) == (3.0, 5.0, None, momenta[name], "running")
        _same_objects(tensors[name], _tensors(m), name)
    _same_state(model, original)
    assert model.stem[1].qconfig == "qconfig-marker" and not model.stem[1].bias.requires_grad

    sched = syncbn.RenormSchedule(warmup=2, r_max_at=4, d_max_at=3)
    model2 = syncbn.convert_sync_bn(
        _model(untracked=False), renorm={"r_max": 2.0, "d_max": 0.5, "schedule": sched, "momentum": 0.01}
    )
    for name, m in _bns(model2).items():
        assert (m.r_max, m.d_max, m.schedule, m.momentum) == (2.0, 0.5, sched, 0.01), name
        # The schedule counts from each layer's own num_batches_tracked (7 here): past its end.
        assert m.current_limits() == (2.0, 0.5)
    model2.train()(torch.randn(3, 2, 5, 5, dtype=torch.float64)).sum().backward()

    for name, m in _bns(syncbn.revert_sync_bn(model)).items():
        assert type(m) is type(_bns(original)[name]), name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"renorm": {"r_max": 3.0, "dmax": 1.0}}, r"renorm keys.*\['dmax'\]"),
        ({"renorm": {"r_max": 0.5}}, "r_max >= 1"),
        ({"renorm": "yes"}, "bool or a dict"),
        ({"renorm": True}, r"BatchNorm1d at 'head.1': expected track_running_stats=True"),
        ({"fallback": "skip"}, "fallback"),
        ({"min_count": 1}, "min_count >= 2"),
    ],
    ids=["unknown-key", "bad-r_max", "bad-type", "untracked", "bad-fallback", "bad-min_count"],
)
def test_convert_errors_leave_model_untouched(kwargs, match):
    model = _model()
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        syncbn.convert_sync_bn(model, **kwargs)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_freeze_unfreeze_round_trip():
    model = syncbn.convert_sync_bn(_model(untracked=False))
    model.blocks[1]["norm"] = syncbn.SyncBatchRenorm(4, r_max=2.0, dtype=torch.float64)  # our own layers too
    model.train()
    model.stem[1].eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    expected = copy.deepcopy(model).eval()(x)
    original = copy.deepcopy(model)
    before = _bns(model)
    classes = {n: type(m) for n, m in before.items()}
    params = {n: dict(m.named_parameters()) for n, m in before.items()}
    flags = {n: m.training for n, m in before.items()}
    grads = {n: [p.requires_grad for p in m.parameters()] for n, m in before.items()}

    frozen = syncbn.freeze_bn(model)
    assert frozen is model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, syncbn.FrozenBatchNorm)}
    assert layers.keys() == before.keys() and not _bns(model)
    bn_params = {id(p) for ps in params.values() for p in ps.values()}
    assert not bn_params & {id(p) for p in model.parameters()}, "frozen layers must hold no parameters"
    _same_state(model, original)
    y = model.train()(x)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12), "frozen train output must equal the eval output"
    y.sum().backward()
    _same_state(model, original)

    model.stem[1].eval()
    unfrozen = syncbn.unfreeze_bn(model)
    after = _bns(unfrozen)
    for name, m in after.items():
        assert type(m) is classes[name], name
        _same_objects(params[name], dict(m.named_parameters()), name)
        assert [p.requires_grad for p in m.parameters()] == grads[name], name
        assert m.training == flags[name], name
    assert after["blocks.1.norm"].r_max == 2.0
    _same_state(unfrozen, original)


def test_freeze_root_direct_and_errors():
    bn = nn.BatchNorm2d(3)
    frozen = syncbn.freeze_bn(bn)
    assert type(frozen) is syncbn.FrozenBatchNorm and type(bn) is nn.BatchNorm2d
    back = syncbn.unfreeze_bn(frozen)
    assert back is bn and back.weight is bn.weight
    direct = syncbn.FrozenBatchNorm(3)
    direct.running_mean.fill_(2.0)
    made = syncbn.unfreeze_bn(direct)
    assert type(made) is syncbn.BatchNormNd and made.affine and torch.equal(made.running_mean, direct.running_mean)
    assert not syncbn.unfreeze_bn(syncbn.FrozenBatchNorm(3, affine=False)).affine
    model = _model()
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"freeze_bn: BatchNorm1d at 'head.1': expected track_running_stats=True"):
        syncbn.freeze_bn(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_convert_bn_to_gn():
    model = _model()
    before = _bns(model)
    params = {n: dict(m.named_parameters()) for n, m in before.items()}
    gn_model = syncbn.convert_bn_to_gn(model, num_groups=2)
    assert not _bns(gn_model)
    for name, bn in before.items():
        gn = gn_model.get_submodule(name)
        assert type(gn) is nn.GroupNorm, name
        assert (gn.num_groups, gn.num_channels, gn.eps, gn.affine) == (2, bn.num_features, bn.eps, bn.affine), name
        _same_objects(params[name], dict(gn.named_parameters()), name)
        assert gn.training == bn.training
    gn = gn_model.stem[1]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, gn.eps))
    gn_model(torch.randn(1, 2, 5, 5, dtype=torch.float64))  # batch of one is fine
    assert type(syncbn.convert_bn_to_gn(nn.BatchNorm2d(8), num_groups=4)) is nn.GroupNorm


def test_convert_bn_to_gn_errors_leave_model_untouched():
    model = _model()
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"convert_bn_to_gn: BatchNorm1d at 'head.1': expected a channel count divisible by num_groups=4, got 6 channels.*\[1, 2, 3, 6\]"):
        syncbn.convert_bn_to_gn(model, num_groups=4)
    with pytest.raises(ValueError, match="positive int"):
        syncbn.convert_bn_to_gn(model, num_groups=0)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with pytest.raises(ValueError, match="the root module"):
        syncbn.convert_bn_to_gn(nn.BatchNorm2d(30))
