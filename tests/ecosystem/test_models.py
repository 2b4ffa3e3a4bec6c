"""Real timm and torchvision models: conversion never changes what they compute; DDP equals one process.

Runs in .venv-eco (`bash scripts/setup_env.sh --ecosystem`); skipped where timm or torchvision is
missing (the main suite's torch 2.13 venv).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="ecosystem tier: needs timm (bash scripts/setup_env.sh --ecosystem)")
torchvision = pytest.importorskip("torchvision", reason="ecosystem tier: needs torchvision (.venv-eco)")

import syncbn  # noqa: E402
import syncbn._rules  # noqa: E402

from ..harness import run_on_ranks  # noqa: E402
from .models import INPUT, TIMM_MODELS, TORCHVISION_MODELS, build, ddp_two_steps  # noqa: E402
from .models import max_state_diff, outputs  # noqa: E402

ALL_MODELS = TIMM_MODELS + TORCHVISION_MODELS
BatchNormAct2d = timm.layers.BatchNormAct2d


def _bn_classes(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_conversion_never_changes_outputs_and_reverts(name):
    model = build(name)
    original = copy.deepcopy(model)
    norm_acts = sum(type(m) is BatchNormAct2d for m in model.modules())
    if name in TIMM_MODELS:
        assert norm_acts > 0, f"{name} is expected to use BatchNormAct2d"
    x = torch.randn(4, *INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    converted = syncbn.convert_sync_bn(model)
    assert sum(type(m) is syncbn.SyncBatchNormAct for m in converted.modules()) == norm_acts
    assert set(_bn_classes(converted)) <= {"SyncBatchNorm", "SyncBatchNormAct"}
    for got, want in zip(outputs(converted, x), outputs(original, x)):  # train (stats move), then eval
        assert (got - want).abs().max().item() <= 1e-9
    assert max_state_diff(converted, original) <= 1e-9  # the same running-statistics update

    reverted = syncbn.revert_sync_bn(converted)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    fresh = build(name, seed=1)
    fresh.load_state_dict(reverted.state_dict())  # strict: the same keys
    assert torch.equal(fresh.eval()(x), original.eval()(x))


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_002", "resnet18"])
def test_renorm_freeze_and_group_norm_keep_activations(name):
    x = torch.randn(4, *INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    original = build(name)
    # r_max=1, d_max=0: Batch Renormalization computes plain batch norm.
    renorm = syncbn.convert_sync_bn(build(name), renorm={"r_max": 1.0, "d_max": 0.0})
    for got, want in zip(outputs(renorm, x), outputs(copy.deepcopy(original), x)):
        assert (got - want).abs().max().item() <= 1e-9

    expected = copy.deepcopy(original).eval()(x)
    frozen = syncbn.freeze_bn(copy.deepcopy(original))
    assert not _bn_classes(frozen)
    assert (frozen.train()(x) - expected).abs().max().item() <= 1e-9  # frozen: eval output in train mode
    back = syncbn.unfreeze_bn(frozen)
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]

    gn = syncbn.convert_bn_to_gn(copy.deepcopy(original), num_groups=1)
    assert not _bn_classes(gn)
    gn(x)

    if name in TIMM_MODELS:  # timm's own frozen layers unfreeze to timm's BatchNormAct2d
        timm_frozen = timm.layers.freeze_batch_norm_2d(copy.deepcopy(original))
        assert any(type(m).__name__ == "FrozenBatchNormAct2d" for m in timm_frozen.modules())
        unfrozen = syncbn.unfreeze_bn(timm_frozen)
        assert sum(type(m) is BatchNormAct2d for m in unfrozen.modules()) == sum(
            type(m) is BatchNormAct2d for m in original.modules()
        )
        assert (unfrozen.eval()(x) - expected).abs().max().item() <= 1e-9


@pytest.mark.parametrize("name", ALL_MODELS)
def test_ddp_two_ranks_equal_one_process_on_the_concatenated_batch(name):
    results = run_on_ranks(2, ddp_two_steps, name)
    for rank, result in enumerate(results):
        diff, moved = result["diff"], result["moved"]
        assert diff <= 1e-9 and moved > 0.01, f"rank {rank}: differs by {diff}, training moved the state by {moved}"
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key  # identical on both ranks


class LoggedBN(nn.BatchNorm2d):
    """A user's subclass that overrides forward but computes batch norm."""

    def forward(self, x):
        self.seen = x.shape
        return super().forward(x)


def _with_user_layers(name: str) -> nn.Module:
    model = build(name)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d and child.num_features == 64:
                user = LoggedBN(64).double()
                user.load_state_dict(child.state_dict())
                setattr(parent, child_name, user)
    return model


def test_user_subclass_error_skip_and_register(monkeypatch):
    monkeypatch.setattr(syncbn._rules, "USER_RULES", {})
    model = _with_user_layers("resnet18")
    paths = [n for n, m in model.named_modules() if type(m) is LoggedBN]
    assert len(paths) >= 4
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as info:
        syncbn.convert_sync_bn(model)
    for path in paths:
        assert f"'{path}' (tests.ecosystem.test_models.LoggedBN)" in str(info.value)
    assert [type(m) for m in model.modules()] == classes, "nothing may change before the error"

    with pytest.warns(UserWarning, match="LoggedBN") as record:
        skipped = syncbn.convert_sync_bn(copy.deepcopy(model), skip_unknown=True)
    assert len(record) == 1
    assert sum(type(m) is LoggedBN for m in skipped.modules()) == len(paths)

    syncbn.register_conversion(LoggedBN, like=nn.BatchNorm2d)
    original = copy.deepcopy(model)
    converted = syncbn.convert_sync_bn(model)
    assert not any(type(m) is LoggedBN for m in converted.modules())
    x = torch.randn(4, *INPUT, dtype=torch.float64)
    for got, want in zip(outputs(converted, x), outputs(original, x)):
        assert (got - want).abs().max().item() <= 1e-9
    reverted = syncbn.revert_sync_bn(converted)
    assert [type(m) for m in reverted.modules()] == classes


def test_timm_split_batch_norm_is_refused():
    # timm's own SplitBatchNorm2d (AugMix) overrides forward: converting it blindly would drop the split.
    from timm.layers import convert_splitbn_model

    model = convert_splitbn_model(build("resnet18"), num_splits=2)
    with pytest.raises(ValueError, match=r"timm\.layers\.split_batchnorm\.SplitBatchNorm2d"):
        syncbn.convert_sync_bn(model)
