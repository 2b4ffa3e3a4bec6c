"""convert_sync_bn / revert_sync_bn (plain and renorm), freeze_bn / unfreeze_bn, convert_bn_to_gn on nested models."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn
import syncbn._rules

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


# --- One rule table: timm's norm-act layers, unknown subclasses, register_conversion ---------------
# Fakes that mimic timm's classes (same module path and class names, same forward) so that the rules
# are tested without timm; tests/ecosystem/ runs the same promises against the real library.


class _Negate(nn.Module):
    """A deterministic stand-in for timm's ``drop``: with a ReLU after it, drop-then-act differs from act-then-drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class SyncBatchNormAct(nn.SyncBatchNorm):
    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features, eps=1e-5, act_layer=nn.ReLU, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill, device=device, dtype=dtype))
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(self.drop(x * scale[:, None, None] + shift[:, None, None]))


for _cls in (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d):
    _cls.__module__ = "timm.layers.norm_act"


class _TimmNet(nn.Module):
    """Conv stem, two timm-style norm-act layers (one with a drop, different acts), a plain BN head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), BatchNormAct2d(8, drop_layer=_Negate, momentum=0.3))
        self.sync_act = SyncBatchNormAct(8)
        self.sync_act.act = nn.Hardswish()
        self.head = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.head(self.sync_act(self.block(self.bn1(self.conv(x)))))


def _timm_net() -> _TimmNet:
    torch.manual_seed(1)
    net = _TimmNet().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training output (after which the running stats moved once) and eval output."""
    train = model.train()(x)
    return train, model.eval()(x)


def _assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


def test_timm_norm_act_convert_keeps_activation_and_reverts():
    model = _timm_net()
    original = copy.deepcopy(model)
    acts = {n: (getattr(m, "drop", None), m.act) for n, m in model.named_modules() if hasattr(m, "act")}
    tensors = {n: _tensors(m) for n, m in _bns(model).items()}

    syncbn.convert_sync_bn(model)
    assert type(model.bn1) is syncbn.SyncBatchNormAct and type(model.block[1]) is syncbn.SyncBatchNormAct
    assert type(model.sync_act) is syncbn.SyncBatchNormAct and type(model.head) is syncbn.SyncBatchNorm
    for name, (drop, act) in acts.items():
        layer = model.get_submodule(name)
        assert layer.act is act and (drop is None or layer.drop is drop), name  # the same objects
        _same_objects(tensors[name], {k: v for k, v in _tensors(layer).items() if k in tensors[name]}, name)
    _same_state(model, original)
    _assert_same_outputs(model, original)  # both take one training step

    reverted = syncbn.revert_sync_bn(model)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    for name, (drop, act) in acts.items():
        layer = reverted.get_submodule(name)
        assert layer.act is act and (drop is None or layer.drop is drop), name
        _same_objects(tensors[name], {k: v for k, v in _tensors(layer).items() if k in tensors[name]}, name)
    assert reverted.block[1].momentum == 0.3
    _same_state(reverted, original)
    _assert_same_outputs(reverted, original)


def test_timm_norm_act_renorm_freeze_and_group_norm_keep_activation():
    # Renorm with r_max=1, d_max=0 is plain BN: the outputs must still match, activations included.
    model = syncbn.convert_sync_bn(_timm_net(), renorm={"r_max": 1.0, "d_max": 0.0})
    assert type(model.bn1) is syncbn.SyncBatchRenormAct and type(model.head) is syncbn.SyncBatchRenorm
    _assert_same_outputs(model, _timm_net())
    assert type(syncbn.revert_sync_bn(model).bn1) is BatchNormAct2d

    model = _timm_net()
    acts = (model.bn1.drop, model.bn1.act)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    expected = copy.deepcopy(model).eval()(x)
    bn1 = model.bn1
    frozen = syncbn.freeze_bn(model)
    assert type(frozen.bn1) is syncbn.FrozenBatchNormAct and (frozen.bn1.drop, frozen.bn1.act) == acts
    assert torch.allclose(frozen.train()(x), expected, rtol=0, atol=1e-12)
    back = syncbn.unfreeze_bn(frozen)
    assert back.bn1 is bn1 and (back.bn1.drop, back.bn1.act) == acts

    model = _timm_net()
    gn = syncbn.convert_bn_to_gn(model, num_groups=4)
    assert type(gn.bn1) is syncbn.GroupNormAct and type(gn.bn1.act) is nn.SiLU
    y = gn.block[1](torch.randn(2, 8, 3, 3, dtype=torch.float64))
    assert (y >= 0).all(), "GroupNormAct must apply the ReLU after the drop"


def test_timm_frozen_norm_act_unfreezes_to_batch_norm_act(monkeypatch):
    import types

    fake = types.ModuleType("timm.layers.norm_act")
    fake.BatchNormAct2d = BatchNormAct2d
    monkeypatch.setitem(sys.modules, "timm.layers.norm_act", fake)
    frozen = FrozenBatchNormAct2d(4, act_layer=nn.SiLU, dtype=torch.float64)
    with torch.no_grad():
        frozen.weight.uniform_(0.5, 1.5)
        frozen.running_mean.normal_()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = frozen(x)
    bn = syncbn.unfreeze_bn(frozen)
    assert type(bn) is BatchNormAct2d and bn.act is frozen.act
    assert torch.allclose(bn.eval()(x), expected, rtol=0, atol=1e-12)


class _LoggedBN(nn.BatchNorm2d):
    """Overrides forward but computes plain batch norm."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


class _ScaledBN(nn.BatchNorm2d):
    """Overrides forward and computes something else: 2 * BN(x)."""

    def forward(self, x):
        return 2 * super().forward(x)


class _TaggedBN(nn.BatchNorm2d):
    """Only adds an attribute (and a constructor of its own): converts as BatchNorm2d."""

    def __init__(self, tag: str) -> None:
        super().__init__(3)
        self.tag = tag


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def _custom_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 3, 1), _LoggedBN(3), nn.Sequential(_ScaledBN(3), nn.BatchNorm2d(3)), _TaggedBN("x")
    ).double()


@pytest.fixture
def clean_rules(monkeypatch):
    monkeypatch.setattr(syncbn._rules, "USER_RULES", {})


@pytest.mark.parametrize("convert", ["convert_sync_bn", "freeze_bn", "convert_bn_to_gn"])
def test_unknown_subclass_is_refused_before_any_change(convert, clean_rules):
    model = _custom_net()
    classes = {n: type(m) for n, m in model.named_modules()}
    kwargs = {"num_groups": 3} if convert == "convert_bn_to_gn" else {}
    with pytest.raises(ValueError) as info:
        getattr(syncbn, convert)(model, **kwargs)
    msg = str(info.value)
    assert "'1' (tests.test_convert._LoggedBN)" in msg and "'2.0' (tests.test_convert._ScaledBN)" in msg
    assert "got 2 whose class overrides it" in msg and "nothing was changed" in msg
    assert "register_conversion(_LoggedBN" in msg and "skip_unknown=True" in msg
    assert "_TaggedBN" not in msg, "a subclass that keeps torch's forward is not unknown"
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_skip_unknown_warns_once_and_converts_the_rest(clean_rules):
    model = _custom_net()
    logged, scaled, tagged = model[1], model[2][0], model[3]
    with pytest.warns(UserWarning) as record:
        syncbn.convert_sync_bn(model, skip_unknown=True)
    assert len(record) == 1
    assert "'1' (tests.test_convert._LoggedBN), '2.0' (tests.test_convert._ScaledBN)" in str(record[0].message)
    assert model[1] is logged and model[2][0] is scaled
    assert type(model[2][1]) is syncbn.SyncBatchNorm and type(model[3]) is syncbn.SyncBatchNorm
    # A subclass that only adds attributes comes back as the very same object.
    back = syncbn.revert_sync_bn(model)
    assert back[3] is tagged and back[3].tag == "x" and type(back[2][1]) is nn.BatchNorm2d


def test_register_conversion_like_and_builders(clean_rules):
    syncbn.register_conversion(_LoggedBN, like=nn.BatchNorm2d)
    syncbn.register_conversion(
        _ScaledBN,
        sync=lambda m, ctx: nn.Sequential(ctx.default(m), _Scale(2.0)),
        freeze=lambda m, ctx: nn.Sequential(ctx.default(m), _Scale(2.0)),
        group_norm=lambda m, ctx: m,  # leave it as it is
    )
    model = _custom_net()
    original = copy.deepcopy(model)
    logged, scaled = model[1], model[2][0]
    syncbn.convert_sync_bn(model, min_count=3)
    assert type(model[1]) is syncbn.SyncBatchNorm and model[1].min_count == 3
    assert type(model[2][0]) is nn.Sequential and type(model[2][0][0]) is syncbn.SyncBatchNorm
    assert model[2][0][0].weight is scaled.weight
    _assert_same_outputs(model, original)  # both take one training step
    back = syncbn.revert_sync_bn(model)
    assert back[1] is logged and back[2][0] is scaled
    _same_state(back, original)
    _assert_same_outputs(back, original)

    frozen = syncbn.freeze_bn(_custom_net())
    assert type(frozen[1]) is syncbn.FrozenBatchNorm and type(frozen[2][0][0]) is syncbn.FrozenBatchNorm
    assert type(syncbn.unfreeze_bn(frozen)[2][0]) is _ScaledBN
    gn = syncbn.convert_bn_to_gn(_custom_net(), num_groups=3)
    assert type(gn[1]) is nn.GroupNorm and type(gn[2][0]) is _ScaledBN


def test_register_conversion_errors(clean_rules):
    with pytest.raises(ValueError, match="already handle"):
        syncbn.register_conversion(nn.BatchNorm2d, like=nn.BatchNorm1d)
    with pytest.raises(ValueError, match="got neither"):
        syncbn.register_conversion(_ScaledBN)
    with pytest.raises(ValueError, match="got both"):
        syncbn.register_conversion(_ScaledBN, like=nn.BatchNorm2d, sync=lambda m, ctx: m)
    with pytest.raises(ValueError, match="like= to be a batch-norm class"):
        syncbn.register_conversion(_ScaledBN, like=nn.Linear)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        syncbn.register_conversion("BatchNorm2d", like=nn.BatchNorm2d)
    # Only a sync rule: freeze_bn still refuses the class.
    syncbn.register_conversion(_ScaledBN, sync=lambda m, ctx: m)
    with pytest.raises(ValueError, match="_ScaledBN"):
        syncbn.freeze_bn(nn.Sequential(_ScaledBN(3)))


def test_bias_none_carries_both_ways():
    bn = nn.BatchNorm2d(4, bias=False).double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    expected = copy.deepcopy(bn).eval()(x)
    sync = syncbn.convert_sync_bn(bn)
    assert sync.bias is None and sync.weight is bn.weight
    assert "bias" not in sync.state_dict()
    back = syncbn.revert_sync_bn(sync)
    assert type(back) is nn.BatchNorm2d and back.bias is None and back.weight is bn.weight
    frozen = syncbn.freeze_bn(back)
    assert frozen.bias is None and torch.allclose(frozen(x), expected, rtol=0, atol=1e-12)
    assert syncbn.unfreeze_bn(frozen) is back and back.bias is None
    direct = syncbn.FrozenBatchNorm(4)
    direct.bias = None
    made = syncbn.unfreeze_bn(direct)
    assert type(made) is syncbn.BatchNormNd and made.bias is None and made.affine
    assert syncbn.convert_bn_to_gn(nn.BatchNorm2d(4, bias=False), num_groups=2).bias is None


def test_import_syncbn_does_not_import_lightning():
    code = "import sys, syncbn; print('lightning' in sys.modules or 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_lightning_plugin_missing_lightning_is_a_clear_import_error(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.plugins", "pytorch_lightning",
                 "pytorch_lightning.plugins", "syncbn.lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.delitem(sys.modules, "syncbn.lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("syncbn.lightning")


def test_lightning_plugin_converts_and_reverts(monkeypatch):
    import abc
    import types

    class LayerSync(abc.ABC):
        @abc.abstractmethod
        def apply(self, model): ...

        @abc.abstractmethod
        def revert(self, model): ...

    plugins = types.ModuleType("lightning.pytorch.plugins")
    plugins.LayerSync = LayerSync
    monkeypatch.setitem(sys.modules, "lightning.pytorch.plugins", plugins)
    monkeypatch.setitem(sys.modules, "pytorch_lightning.plugins", None)
    monkeypatch.delitem(sys.modules, "syncbn.lightning", raising=False)
    module = importlib.import_module("syncbn.lightning")
    monkeypatch.delitem(sys.modules, "syncbn.lightning")
    plugin = module.SyncBatchNormPlugin(fallback="running", renorm=True)
    assert isinstance(plugin, LayerSync)
    model = _timm_net()
    out = plugin.apply(model)
    assert type(out.bn1) is syncbn.SyncBatchRenormAct and out.bn1.fallback == "running"
    assert type(plugin.revert(out).bn1) is BatchNormAct2d
    with pytest.raises(ValueError, match="fallback"):
        module.SyncBatchNormPlugin(fallback="skip")


@pytest.mark.parametrize("convert", ["convert_sync_bn", "freeze_bn", "convert_bn_to_gn"])
def test_uninitialized_lazy_batch_norm_is_refused(convert):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d at '1': got an uninitialized lazy layer"):
        getattr(syncbn, convert)(model)
    model(torch.randn(2, 3, 4, 4))  # now a BatchNorm2d
    assert type(syncbn.convert_sync_bn(model)[1]) is syncbn.SyncBatchNorm


def test_norm_act_layers_take_torchs_bias_argument():
    """bias=False (a learnt scale, no shift) on the norm-act layers too, computing what BN + act does."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    for cls in (syncbn.SyncBatchNormAct, syncbn.FrozenBatchNormAct, syncbn.BatchNormAct):
        layer = cls(3, bias=False, act=nn.ReLU())
        assert layer.bias is None and layer.weight is not None, cls.__name__
        ref = nn.BatchNorm2d(3, bias=False)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            ref.weight.copy_(layer.weight)
        if cls is syncbn.FrozenBatchNormAct:
            ref.eval()
        assert torch.allclose(layer(x), torch.relu(ref(x)), atol=1e-6), cls.__name__
