"""The ResNet-18 training of train_resnet.py written the accelerate way.

    bash launch/accelerate.sh examples/train_resnet_accelerate.py        # 2 CPU processes, SyncBN
    NPROC=4 bash launch/accelerate.sh examples/train_resnet_accelerate.py --norm bn
    python examples/train_resnet_accelerate.py --epochs 2                # one process

Accelerate has no synchronized batch norm of its own: convert the model with syncbn BEFORE
`accelerator.prepare` (which wraps it in DDP). `prepare` also shards the DataLoaders, and
`gather_for_metrics` collects the held-out predictions of every process (dropping the padding of
the last batch). On CPU, each process must be told to stay on the CPU: `Accelerator(cpu=True)`,
which this script does when no GPU is visible (launch/accelerate.sh also exports
ACCELERATE_USE_CPU=true); otherwise every process thinks it is alone.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a file: make `examples` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syncbn  # noqa: E402
from examples.data import DATASETS, augment, load_dataset  # noqa: E402
from examples.train_resnet import NORMS, build_model, freeze_measured, learning_rate  # noqa: E402


__all__ = ["main"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", choices=NORMS, default="syncbn")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="cifar10: directory with the python-pickle batches")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32, help="samples per process and step (default: 32)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32, help="ResNet-18 base width; 64 is the standard model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="train on the first N training images only (quick tries)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is visible")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # Statistics are synchronized by the layers themselves: no per-forward buffer broadcast.
    # (torch 2.13 renamed broadcast_buffers; accelerate still passes the old name, which only warns.)
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    state = accelerator.state
    backend = state.backend if state.num_processes > 1 else "none"
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # not "cpu:0"
    accelerator.print(
        f"world_size={accelerator.num_processes} backend={backend} device={device} "
        f"norm={args.norm} batch_per_rank={args.batch_size}",
        flush=True,
    )
    set_seed(args.seed)  # same initial weights everywhere

    data = load_dataset(args.dataset, args.data_dir)
    if args.limit_train is not None:
        data = data._replace(x_train=data.x_train[: args.limit_train], y_train=data.y_train[: args.limit_train])
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256)
    steps_per_epoch = len(train_loader) // accelerator.num_processes
    if steps_per_epoch == 0:
        raise ValueError(
            f"expected at least one full batch per process, got {len(data.y_train)} samples for "
            f"{accelerator.num_processes} processes x --batch-size {args.batch_size}; lower --batch-size"
        )
    total_steps = args.epochs * steps_per_epoch

    # Convert BEFORE prepare: prepare wraps the model in DDP, and the layers must be swapped first.
    model = build_model(args, data, accelerator.device, steps_per_epoch)
    if args.norm == "frozen":
        # Statistics measured with the synchronized layers (every process reads the same first
        # batches of the not yet sharded loader), then frozen before DDP and the optimizer see it.
        model = freeze_measured(model, train_loader, accelerator.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    accelerator.print(
        f"model=resnet18 width={args.width} dataset={data.name} train={len(data.y_train)} "
        f"held_out={len(data.y_test)} global_batch={args.batch_size * accelerator.num_processes} "
        f"steps_per_epoch={steps_per_epoch}",
        flush=True,
    )

    flip = data.name == "cifar10"
    acc = 0.0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for i, (x, y) in enumerate(train_loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, epoch * steps_per_epoch + i, total_steps)
            loss = F.cross_entropy(model(augment(x.cpu(), data.pad, flip).to(accelerator.device)), y)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(y), len(y)], dtype=torch.float64, device=loss_sum.device)
        train_time = time.perf_counter() - t0
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")

        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                pred, y = accelerator.gather_for_metrics((model(x).argmax(1), y))
                correct += int((pred == y).sum())
                total += len(y)
        acc = correct / total
        accelerator.print(
            f"epoch {epoch + 1}/{args.epochs} loss={loss_sum[0] / loss_sum[1]:.4f} "
            f"held_out_acc={100 * acc:.2f}% ({correct}/{total}) "
            f"images/s={loss_sum[1] / train_time:.0f} time={train_time:.1f}s",
            flush=True,
        )
    accelerator.print(f"done: held_out_acc={100 * acc:.2f}% epochs={args.epochs} wall={time.perf_counter() - start:.1f}s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    syncbn.cleanup()  # destroy_process_group(), when end_training has not already


if __name__ == "__main__":
    main()
