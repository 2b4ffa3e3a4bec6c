"""Fit a tiny model with Lightning on 2 CPU processes (strategy="ddp") and syncbn's plugin.

Usage: python tests/ecosystem/lightning_fit.py OUT_DIR
Each rank trains on data of its own (a different offset and scale per rank) and writes
OUT_DIR/rank{R}.pt with its final state_dict and the classes of its modules after fit.
tests/ecosystem/test_lightning.py runs it and compares the ranks with one process.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from syncbn.lightning import SyncBatchNormPlugin

STEPS = 2
PER_RANK = 8
LR = 0.1


def rank_data(rank: int) -> torch.Tensor:
    """``STEPS * PER_RANK`` images for one rank; local batch statistics would differ between ranks."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(STEPS * PER_RANK, 3, 8, 8, generator=gen) * (1 + rank) + 3 * rank


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        nn.BatchNorm1d(3),
    )


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([1.0, -2.0, 0.5])
    return (out - target).pow(2).mean()


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        return loss_fn(self(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(rank_data(self.global_rank)), batch_size=PER_RANK, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        plugins=[SyncBatchNormPlugin()],
        max_steps=STEPS,
        use_distributed_sampler=False,  # each rank brings its own data
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out_dir,
    )
    trainer.fit(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m).__name__ for m in model.modules()]
    torch.save({"state": state, "classes": classes}, os.path.join(args.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
