"""Builders and checks shared by the ecosystem tier (real timm, torchvision, Lightning)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import syncbn

__all__ = ["TIMM_MODELS", "TORCHVISION_MODELS", "build", "outputs", "max_state_diff", "ddp_two_steps"]

# timm families built from BatchNormAct2d (EfficientNet, MobileNetV3, RegNet, CSPNet, DenseNet)
# and one (GhostNet) that mixes it with plain BatchNorm2d.
TIMM_MODELS = [
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "regnety_002",
    "cs3darknet_s",
    "densenet121",
    "ghostnet_050",
]
TORCHVISION_MODELS = ["resnet18", "mobilenet_v3_small"]

INPUT = (3, 32, 32)  # small images: the tier has to fit its time budget on 2 cores


def build(name: str, seed: int = 0) -> nn.Module:
    """A float64 model with pretrained=False, the same weights for the same seed."""
    torch.manual_seed(seed)
    if name in TORCHVISION_MODELS:
        import torchvision

        kwargs = {"dropout": 0.0} if name == "mobilenet_v3_small" else {}  # deterministic outputs
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, drop_rate=0.0)  # no dropout: deterministic
    model = model.double()
    # Running statistics away from their (0, 1) start, so that eval checks see real values.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode output (one running-statistics update) and eval output."""
    train = model.train()(x)
    return train, model.eval()(x)


def max_state_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest difference between two models' parameters and floating-point buffers, by state_dict key."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    floats = [k for k in sa if sa[k].numel() and sa[k].is_floating_point()]
    return max((sa[k] - sb[k]).abs().max().item() for k in floats)


def _loss(out: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    # A mean over the batch: DDP's gradient average over equal per-rank batches is the mean over all.
    return (out * head).mean()


def ddp_two_steps(rank: int, world_size: int, name: str, per_rank: int = 2) -> dict:
    """Two SGD steps of the converted model under DDP vs one process on the concatenated batches."""
    torch.set_num_threads(1)
    model = build(name)  # the same weights on every rank
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(per_rank * world_size, *INPUT, generator=gen, dtype=torch.float64) for _ in range(2)]
    out_features = model.train()(batches[0][:2]).shape[1]
    head = torch.randn(out_features, generator=gen, dtype=torch.float64)
    model = build(name)

    converted = syncbn.convert_sync_bn(model)
    left = [type(m).__name__ for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, syncbn.SyncBatchNorm)]
    assert not left, f"not converted: {left}"
    ddp = nn.parallel.DistributedDataParallel(converted)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for x in batches:
        opt.zero_grad()
        _loss(ddp(x[rank * per_rank : (rank + 1) * per_rank]), head).backward()
        opt.step()

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for x in batches:
        ref_opt.zero_grad()
        _loss(reference.train()(x), head).backward()
        ref_opt.step()
    reverted = syncbn.revert_sync_bn(converted)
    # Errors are measured against how far training moved the state (parameters and running
    # statistics): float64 rounding differs between the two summation orders, nothing more.
    moved = max_state_diff(reference, build(name))
    return {
        "diff": max_state_diff(reverted, reference),
        "moved": moved,
        "state": {k: v.clone() for k, v in reverted.state_dict().items()},
    }
