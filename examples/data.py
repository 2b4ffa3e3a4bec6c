"""Datasets for the examples, all held in memory as tensors: no download at run time.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes), split
  once into 1437 training and 360 held-out images with a fixed seed.
- ``synthetic``: 10 classes of 3x16x16 images, each a fixed random template plus noise; generated
  from a fixed seed, so every rank and every run sees the same data.
- ``cifar10``: the standard python-pickle files (``data_batch_1..5``, ``test_batch``) from
  ``--data-dir`` (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked).

``augment`` draws from torch's global RNG, whose state the training scripts checkpoint.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["DATASETS", "Split", "load_dataset", "augment"]

DATASETS = ("digits", "synthetic", "cifar10")
_SPLIT_SEED = 0  # the held-out split never depends on --seed
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Split(NamedTuple):
    """Normalized float images ``(N, C, H, W)`` and int64 labels for training and held-out evaluation."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def pad(self) -> int:
        """Pixels of random-shift augmentation: 1 for 8x8 digits, 2 for 16x16, 4 for 32x32."""
        return max(1, self.x_train.shape[-1] // 8)


def _standardize(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    dims = (0, 2, 3)
    mean = x_train.mean(dims, keepdim=True)
    std = x_train.std(dims, keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def _digits() -> Split:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ValueError(
            "dataset 'digits': expected scikit-learn (it ships the 8x8 digits), got ImportError; "
            "run `bash scripts/setup_env.sh` or `pip install scikit-learn`, or pick --dataset synthetic"
        ) from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = _standardize(x[train], x[test])
    return Split(x_train, y[train], x_test, y[test], 10, "digits")


def _synthetic(n_train: int = 2048, n_test: int = 512, size: int = 16, classes: int = 10) -> Split:
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    templates = torch.randn(classes, 3, size, size, generator=g)
    # Smooth the templates so that the task needs spatial features, not single pixels.
    templates = torch.nn.functional.avg_pool2d(templates, 3, stride=1, padding=1) * 3.0
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = templates[y] + 1.5 * torch.randn(n_train + n_test, 3, size, size, generator=g)
    x_train, x_test = _standardize(x[:n_train], x[n_train:])
    return Split(x_train, y[:n_train], x_test, y[n_train:], classes, "synthetic")


def _cifar10(data_dir: Optional[str]) -> Split:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if data_dir is None:
        raise ValueError(
            "dataset 'cifar10': expected --data-dir pointing at the unpacked python version "
            "(cifar-10-batches-py with data_batch_1..5 and test_batch), got no --data-dir; download "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it"
        )
    root = Path(data_dir).expanduser()
    if not (root / files[0]).is_file() and (root / "cifar-10-batches-py" / files[0]).is_file():
        root = root / "cifar-10-batches-py"
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise ValueError(
            f"dataset 'cifar10': expected {', '.join(files)} in {root}, but {', '.join(missing)} "
            f"missing; point --data-dir at the unpacked cifar-10-python.tar.gz (the directory "
            f"cifar-10-batches-py or its parent)"
        )

    def read(name: str) -> tuple[Tensor, Tensor]:
        with open(root / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = torch.tensor(d[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        return x, torch.tensor(d[b"labels"], dtype=torch.int64)

    parts = [read(f) for f in files[:5]]
    x_train = torch.cat([p[0] for p in parts]).float() / 255.0
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = read(files[5])
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return Split((x_train - mean) / std, y_train, (x_test.float() / 255.0 - mean) / std, y_test, 10, "cifar10")


def load_dataset(name: str, data_dir: Optional[str] = None) -> Split:
    """Load one of :data:`DATASETS` into memory; raises ``ValueError`` with the remedy when it cannot."""
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic()
    if name == "cifar10":
        return _cifar10(data_dir)
    raise ValueError(f"expected a dataset in {DATASETS}, got {name!r}")


def augment(x: Tensor, pad: int, flip: bool) -> Tensor:
    """Random shifts by up to ``pad`` pixels (zero padding, as in the CIFAR ResNet recipe) and, with
    ``flip``, random horizontal flips; one draw per image from torch's global RNG."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,))
    dx = torch.randint(0, 2 * pad + 1, (n,))
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    c = x.shape[1]
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    if flip:
        mask = torch.rand(n) < 0.5
        out[mask] = out[mask].flip(-1)
    return out
