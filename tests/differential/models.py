"""Small torch models for the model and compile families, built alike in the parent and on ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["build_model", "input_shape", "add_hooks", "model_batch"]


class DownsampleBlock(nn.Module):
    """A ResNet BasicBlock with a downsample branch: two parallel batch norms of equal width."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride=2, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = torch.relu(out + self.downsample(x))
        return self.head(out)


def build_model(kind: str, width: int, momentum: Any = 0.1, seed: int = 0) -> nn.Module:
    """A float64 torch model with ``nn.BatchNorm*d`` layers, parameters drawn from ``seed``."""
    torch.manual_seed(seed)
    if kind == "convnet":
        m = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, momentum=momentum),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 2),
        )
    elif kind == "bn_head":
        # A batch norm followed directly by a frozen linear head (no nonlinearity in between).
        m = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width, momentum=momentum),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 2),
        )
        for p in m[4].parameters():
            p.requires_grad_(False)
    elif kind == "downsample":
        m = DownsampleBlock(3, width)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = momentum
    elif kind == "mlp":
        m = nn.Sequential(nn.Linear(6, width), nn.BatchNorm1d(width, momentum=momentum), nn.ReLU(), nn.Linear(width, 2))
    elif kind == "layer":
        m = nn.Sequential(nn.BatchNorm1d(width, momentum=momentum))
    else:
        raise ValueError(kind)
    m = m.double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    return m


def input_shape(kind: str, width: int) -> tuple[int, ...]:
    """One sample's shape."""
    if kind == "mlp":
        return (6,)
    if kind == "layer":
        return (width, 5)
    return (3, 4, 4)


def model_batch(kind: str, width: int, sizes: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """The whole group's batch (float64) and per-sample loss weights for output (N, out)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn((n,) + input_shape(kind, width), generator=gen, dtype=torch.float64) * 2 + 0.5
    out_shape = (n, width, 5) if kind == "layer" else (n, 2)
    t = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    return x, t


def _fwd_hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return output * 1.5 + 0.25


def _pre_hook(module: nn.Module, args: Any) -> Any:
    return (args[0] * 0.75,)


def add_hooks(model: nn.Module) -> int:
    """A forward hook (scale and shift the output) and a forward-pre hook (scale the input) on
    every batch-norm layer. Returns how many layers got them."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) or type(mod).__name__ in ("SyncBatchNorm", "SyncBatchRenorm"):
            mod.register_forward_hook(_fwd_hook)
            mod.register_forward_pre_hook(_pre_hook)
            n += 1
    return n
