"""Small models shared by the examples, tests and benchmarks.

`resnet18` is the CIFAR-style ResNet-18 (He et al. 2016, as used for CIFAR-10): a 3x3 stem without
max-pooling, four stages of two BasicBlocks at strides 1, 2, 2, 2, global average pooling and a linear
head. Every normalization layer is `nn.BatchNorm2d`, so `syncbn.convert_sync_bn` (or any other
converter) decides what the model trains with. It accepts any input of at least 8x8 pixels: the 8x8
scikit-learn digits end in a 1x1 map, 32x32 CIFAR-10 in a 4x4 map.

    from examples.models import resnet18
    model = resnet18(num_classes=10, in_channels=1, width=32)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet18", "SmallConvNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (projection when shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages at strides 1, 2, 2, 2."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"ResNet: expected positive width, num_classes and in_channels, got width={width}, "
                f"num_classes={num_classes}, in_channels={in_channels}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_planes = width
        for i, n_blocks in enumerate(blocks_per_stage):
            planes = width * 2**i
            layers = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> nn.Module:
    """CIFAR-style ResNet-18 with `nn.BatchNorm2d` layers.

    Args:
        num_classes: size of the output layer. Default: 10.
        in_channels: input image channels (3 for CIFAR-10, 1 for the 8x8 digits). Default: 3.
        width: channels of the first stage; stages use width, 2*width, 4*width, 8*width. The standard
            model is 64 (11.2M parameters); 16 or 32 trains far faster on a CPU. Default: 64.

    Shape: input (N, in_channels, H, W) with H, W >= 8; output (N, num_classes).
    """
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)


class SmallConvNet(nn.Module):
    """A three-layer conv net with BatchNorm2d after each convolution, for quick studies on 8x8 digits.

    conv(3x3)-BN-ReLU x2, stride-2 conv-BN-ReLU, global average pool, then a linear head, or with
    ``hidden > 0`` an MLP head Linear-BatchNorm1d-ReLU-Linear. The BatchNorm1d sees one value per
    sample and channel (like the 1x1 maps at the end of a ResNet on small images, or the projection
    heads of contrastive learning), so it is where tiny per-device batches hurt most.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, hidden: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        if hidden > 0:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(2 * width, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))
