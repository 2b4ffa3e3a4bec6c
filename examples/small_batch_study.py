"""Why synchronized BN exists: 4 processes with 2 samples each, trained five ways.

    NPROC=4 bash launch/torchrun.sh examples/small_batch_study.py            # writes docs/small_batch_study.{csv,png}

Every variant starts from the same weights and sees the same global batches of 8 digits per step
(the union of the 4 ranks' batches of 2 is exactly the reference's batch of 8), without
augmentation, so the only difference is how the normalization layers compute their statistics.
The default model is a 3-conv net whose head has a BatchNorm1d (one value per sample and channel,
like the 1x1 maps at the end of a ResNet on small images): with 2 samples a local BN there
normalizes every feature to about +-1, the case that hurts most.


  bn            local BatchNorm2d: each rank normalizes with its own 2 samples (DDP's default)
  syncbn        syncbn.SyncBatchNorm: statistics of all 8 samples of the step
  renorm        syncbn.SyncBatchRenorm over the 4 ranks (r_max/d_max ramped in after a warm-up)
  gn            GroupNorm with 8 groups (syncbn.convert_bn_to_gn): no batch statistics at all
  reference_b8  one process, batch 8, BatchNorm2d: what syncbn should reproduce

Rank 0 writes held-out accuracy per epoch to a CSV and a PNG plot (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if __package__ in (None, ""):  # run as a file: make `examples` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syncbn  # noqa: E402
from examples.data import Split, load_dataset  # noqa: E402
from examples.models import SmallConvNet, resnet18  # noqa: E402
from examples.train_resnet import no_buffer_sync_kwargs  # noqa: E402

__all__ = ["main", "VARIANTS"]

VARIANTS = ("bn", "syncbn", "renorm", "gn", "reference_b8")
LABELS = {
    "bn": "local BN, 4x2",
    "syncbn": "SyncBatchNorm, 4x2",
    "renorm": "SyncBatchRenorm, 4x2",
    "gn": "GroupNorm, 4x2",
    "reference_b8": "BN, 1 process x 8",
}
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2, help="samples per process and step (default: 2)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--model", choices=("small", "resnet18"), default="small",
                   help="small: 3-conv net with a BatchNorm1d head (fast); resnet18: the CIFAR ResNet-18 at --width")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64,
                   help="small net: width of its Linear-BatchNorm1d-ReLU head (0: a plain linear head)")
    p.add_argument("--gn-groups", type=int, default=8)
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "docs"), help="where the CSV and PNG go (default: docs/)")
    p.add_argument("--name", default="small_batch_study", help="file name stem of the CSV and PNG")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"expected --variants from {VARIANTS}, got {bad or 'nothing'}")
    return args


def make_model(args: argparse.Namespace, variant: str, data: Split) -> nn.Module:
    torch.manual_seed(args.seed)  # identical initial weights for every variant and rank
    if args.model == "small":
        model: nn.Module = SmallConvNet(data.num_classes, data.in_channels, args.width, hidden=args.hidden)
    else:
        model = resnet18(data.num_classes, data.in_channels, args.width)
    if variant == "syncbn":
        model = syncbn.convert_sync_bn(model)
    elif variant == "renorm":
        model = syncbn.convert_sync_bn(model, renorm={"schedule": args.renorm_schedule})
    elif variant == "gn":
        model = syncbn.convert_bn_to_gn(model, num_groups=args.gn_groups)
    return model


def lr_at(args: argparse.Namespace, step: int, total: int) -> float:
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * step / total))


def epoch_order(args: argparse.Namespace, n: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation; every rank and the reference draw the same one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))


def accuracy(model: nn.Module, data: Split, rank: int, world: int, reduce: bool) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.x_test[rank::world], data.y_test[rank::world]
        counts = torch.tensor([(model(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
    if reduce:
        dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def train_variant(
    args: argparse.Namespace, variant: str, data: Split, rank: int, world: int, record: Callable
) -> None:
    """Train one variant; ``reference_b8`` runs on rank 0 alone with batch world*batch_size."""
    single = variant == "reference_b8"
    w, r = (1, 0) if single else (world, rank)
    bs = args.batch_size * world if single else args.batch_size
    model = make_model(args, variant, data)
    net = model if single else DistributedDataParallel(model, **no_buffer_sync_kwargs())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    n = len(data.y_train)
    steps = n // (args.batch_size * world)
    total = args.epochs * steps
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = epoch_order(args, n, epoch)
        loss_sum = 0.0
        for step in range(steps):
            # Global batch = order[8k : 8k+8]; rank r takes every world-th sample of it.
            idx = order[step * bs * w : (step + 1) * bs * w][r::w]
            for g in opt.param_groups:
                g["lr"] = lr_at(args, epoch * steps + step, total)
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
        if variant == "bn":
            for b in model.buffers():  # local statistics differ per rank: the model is rank 0's
                dist.broadcast(b, 0)
        acc = accuracy(model, data, r, w, reduce=not single)
        record(variant, epoch + 1, acc, loss_sum / steps, time.perf_counter() - t0)


def write_outputs(rows: list[dict], args: argparse.Namespace, world: int) -> tuple[Path, Path]:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{args.name}.csv", out / f"{args.name}.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for variant in args.variants:
        pts = [(r["epoch"], 100 * r["held_out_acc"]) for r in rows if r["variant"] == variant]
        style = "--" if variant == "reference_b8" else "-"
        ax.plot(*zip(*pts), style, marker="o", label=LABELS[variant])
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"digits, {world} processes x {args.batch_size} samples ({args.model} net, seed {args.seed})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    info = syncbn.init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    log = print if info.is_main else (lambda *a, **k: None)
    log(f"world_size={world} backend={info.backend} batch_per_rank={args.batch_size} "
        f"variants={','.join(args.variants)} epochs={args.epochs}", flush=True)
    if world < 2:
        log("note: with a single process bn, syncbn and reference_b8 coincide; run with NPROC=4", flush=True)
    torch.set_num_threads(1)

    data = load_dataset("digits")
    if args.limit_train is not None:
        data = data._replace(x_train=data.x_train[: args.limit_train], y_train=data.y_train[: args.limit_train])
    steps = len(data.y_train) // (args.batch_size * world)
    if steps == 0:
        raise ValueError(
            f"expected at least one step of {world}x{args.batch_size} samples, got {len(data.y_train)} "
            f"training images; raise --limit-train or lower --batch-size"
        )
    total = args.epochs * steps
    # Paper proportions (5k warm-up, d_max at 25k, r_max at 40k steps) scaled to this run.
    args.renorm_schedule = syncbn.RenormSchedule(total // 8, total, (5 * total) // 8)

    rows: list[dict] = []

    def record(variant: str, epoch: int, acc: float, loss: float, seconds: float) -> None:
        rows.append({"variant": variant, "epoch": epoch, "held_out_acc": round(acc, 4),
                     "train_loss": round(loss, 4), "seconds": round(seconds, 2)})
        log(f"{variant:>12} epoch {epoch}/{args.epochs} held_out_acc={100 * acc:.2f}% "
            f"loss={loss:.4f} time={seconds:.1f}s", flush=True)

    for variant in args.variants:
        if variant == "reference_b8":
            if rank == 0:
                train_variant(args, variant, data, rank, world, record)
            if info.is_distributed:
                dist.barrier()
        else:
            train_variant(args, variant, data, rank, world, record)

    if info.is_main:
        csv_path, png_path = write_outputs(rows, args, world)
        print(f"\n| variant | held-out accuracy after epoch {args.epochs} | best |\n|---|---|---|")
        for variant in args.variants:
            accs = [r["held_out_acc"] for r in rows if r["variant"] == variant]
            print(f"| {LABELS[variant]} | {100 * accs[-1]:.2f}% | {100 * max(accs):.2f}% |")
        print(f"\nwrote {csv_path} and {png_path}", flush=True)
    syncbn.cleanup()


if __name__ == "__main__":
    main()
