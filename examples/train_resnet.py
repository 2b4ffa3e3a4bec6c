"""Train a CIFAR-style ResNet-18 with data-parallel DDP and synchronized batch norm.

    bash launch/torchrun.sh examples/train_resnet.py                  # 2 CPU processes, digits, SyncBN
    bash launch/torchrun.sh examples/train_resnet.py --norm bn        # local BN, for comparison
    bash launch/accelerate.sh examples/train_resnet.py                # same, started by accelerate
    python examples/train_resnet.py --epochs 2                        # one process, no launcher
    NPROC=8 bash launch/torchrun.sh examples/train_resnet.py --dataset cifar10 \
        --data-dir ~/data/cifar-10-batches-py --epochs 30 --width 64 --batch-size 64

--norm picks what the model's BatchNorm2d layers become:
  bn      torch's local BatchNorm2d: each rank normalizes with its own batch (DDP's default)
  syncbn  syncbn.SyncBatchNorm: statistics of the whole global batch
  renorm  syncbn.SyncBatchRenorm with the paper's warm-up and relaxation of r_max / d_max
  gn      GroupNorm (syncbn.convert_bn_to_gn), independent of the batch size
  frozen  BN statistics measured once on the initial network (syncbn.recompute_bn_stats over 20
          batches), then frozen (syncbn.freeze_bn): a fixed affine map, as when fine-tuning
With --checkpoint-dir every epoch ends with an atomic checkpoint; --resume continues from it exactly.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if __package__ in (None, ""):  # run as a file: make `examples` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syncbn  # noqa: E402
from examples.data import DATASETS, Split, augment, load_dataset  # noqa: E402
from examples.models import resnet18  # noqa: E402

__all__ = [
    "main", "parse_args", "build_model", "freeze_measured", "learning_rate", "no_buffer_sync_kwargs", "NORMS",
]

NORMS = ("bn", "syncbn", "renorm", "gn", "frozen")
CHECKPOINT_NAME = "last.pt"
# Run settings a checkpoint must share with the run that resumes it.
_MUST_MATCH = ("norm", "dataset", "width", "seed", "lr", "epochs", "weight_decay", "limit_train")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", choices=NORMS, default="syncbn", help="normalization layers (default: syncbn)")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits (no download)")
    p.add_argument("--data-dir", default=None, help="cifar10: directory with the python-pickle batches")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32, help="samples per process and step (default: 32)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32, help="ResNet-18 base width; 64 is the standard model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="train on the first N training images only (quick tries)")
    p.add_argument("--checkpoint-dir", default=None, help="write last.pt here after every epoch")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue from PATH, or (no PATH) from CHECKPOINT_DIR/last.pt when it exists",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this run, as if interrupted (to try --resume)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a collective waits for the other ranks before every rank raises (a lost node "
        "or link); default: $SYNCBN_TIMEOUT, else torch's 30 minutes",
    )
    args = p.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"expected --timeout > 0 seconds, got {args.timeout}")
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    if args.resume == "auto" and args.checkpoint_dir is None:
        p.error("--resume without a PATH needs --checkpoint-dir (where last.pt lives), got neither")
    return args


# ---------------------------------------------------------------- model
def build_model(args: argparse.Namespace, data: Split, device: torch.device, steps_per_epoch: int) -> nn.Module:
    """ResNet-18 with the --norm layers, on ``device`` (--norm frozen: see :func:`freeze_measured`)."""
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = resnet18(num_classes=data.num_classes, in_channels=data.in_channels, width=args.width)
    if args.norm == "syncbn":
        model = syncbn.convert_sync_bn(model)
    elif args.norm == "renorm":
        # The paper's proportions (plain BN for 5k of 40k steps, r_max reached at 40k, d_max at 25k),
        # scaled to this run's length.
        total = args.epochs * steps_per_epoch
        schedule = syncbn.RenormSchedule(warmup=total // 8, r_max_at=total, d_max_at=(5 * total) // 8)
        model = syncbn.convert_sync_bn(model, renorm={"schedule": schedule})
    elif args.norm == "gn":
        model = syncbn.convert_bn_to_gn(model, num_groups=min(32, args.width))
    elif args.norm == "frozen":
        model = syncbn.convert_sync_bn(model)  # measured with synchronized statistics, then frozen
    return model.to(device)


def freeze_measured(model: nn.Module, loader: DataLoader, device: torch.device) -> nn.Module:
    """--norm frozen: set running statistics to the exact statistics of 20 batches, then freeze."""
    batches = (x.to(device) for x, _ in loader)
    syncbn.recompute_bn_stats(model, batches, num_batches=min(20, len(loader)))
    return syncbn.freeze_bn(model)


def learning_rate(args: argparse.Namespace, step: int, total_steps: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 0: a pure function of the
    step, so a resumed run needs no scheduler state."""
    warmup = max(1, total_steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


# ---------------------------------------------------------------- checkpoints
def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then os.replace over the old one,
    so an interruption leaves either the previous checkpoint or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_resume(args: argparse.Namespace) -> Optional[Path]:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.checkpoint_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(args.resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(
            f"--resume: expected a checkpoint file (or a directory holding {CHECKPOINT_NAME}), got "
            f"{args.resume!r}, which does not exist; pass the path printed by the earlier run, or "
            f"--resume without a PATH to start fresh when there is none"
        )
    return path


def load_checkpoint(path: Path, args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = ckpt["args"]
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in _MUST_MATCH
             if saved.get(k) != getattr(args, k)]
    if ckpt["world_size"] != world_size or saved.get("batch_size") != args.batch_size:
        diffs.append(
            f"world_size x batch_size {ckpt['world_size']}x{saved.get('batch_size')} -> "
            f"{world_size}x{args.batch_size}"
        )
    if diffs:
        raise ValueError(
            f"--resume {path}: expected the settings of the run that wrote it, got changes: "
            f"{'; '.join(diffs)}; rerun with the original settings or start without --resume"
        )
    return ckpt


# ---------------------------------------------------------------- train / evaluate
def all_sum(values: list[float], info: syncbn.DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.is_distributed:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, info: syncbn.DistInfo, batch_size: int = 256) -> tuple[int, int]:
    """Held-out accuracy in eval mode; each rank scores its own slice, counts are summed.
    Eval-mode batch norm never communicates, so the ranks may see different slice sizes."""
    model.eval()
    x_all = data.x_test[info.rank :: info.world_size]
    y_all = data.y_test[info.rank :: info.world_size]
    correct = 0
    for i in range(0, len(y_all), batch_size):
        x = x_all[i : i + batch_size].to(info.device)
        y = y_all[i : i + batch_size].to(info.device)
        correct += int((model(x).argmax(1) == y).sum())
    c, n = all_sum([correct, len(y_all)], info)
    return int(c), int(n)


def broadcast_local_buffers(model: nn.Module, info: syncbn.DistInfo) -> None:
    """--norm bn: every rank has its own running statistics; make rank 0's the model's (what the
    checkpoint holds and what DDP's broadcast_buffers=True would do) before evaluating."""
    if info.is_distributed:
        for b in model.buffers():
            dist.broadcast(b, 0)


def no_buffer_sync_kwargs() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast: ``broadcast_buffers=False``,
    named ``forward_sync_buffers=False`` since torch 2.13 (the old name warns there)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    timeout = None if args.timeout is None else datetime.timedelta(seconds=args.timeout)
    info = syncbn.init_distributed(timeout=timeout)
    log = print if info.is_main else (lambda *a, **k: None)
    log(
        f"world_size={info.world_size} backend={info.backend} device={info.device} "
        f"norm={args.norm} batch_per_rank={args.batch_size}",
        flush=True,
    )

    data = load_dataset(args.dataset, args.data_dir)
    if args.limit_train is not None:
        data = data._replace(x_train=data.x_train[: args.limit_train], y_train=data.y_train[: args.limit_train])
    train_set = TensorDataset(data.x_train, data.y_train)
    # Per-epoch shuffling through set_epoch; every rank gets len/world samples (padded by repeats).
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=args.seed)
    # drop_last: a last batch of 1 sample cannot be batch-normalized.
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"expected at least one full batch per rank, got {len(sampler)} samples per rank for "
            f"--batch-size {args.batch_size}; lower --batch-size or use fewer processes"
        )
    total_steps = args.epochs * steps_per_epoch

    model = build_model(args, data, info.device, steps_per_epoch)
    resume_path = resolve_resume(args)
    if args.norm == "frozen" and resume_path is None:
        model = freeze_measured(model, loader, info.device)
    elif args.norm == "frozen":
        model = syncbn.freeze_bn(model)  # the checkpoint holds the measured statistics
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model=resnet18 width={args.width} params={n_params / 1e6:.2f}M dataset={data.name} "
        f"train={len(data.y_train)} held_out={len(data.y_test)} global_batch={args.batch_size * info.world_size} "
        f"steps_per_epoch={steps_per_epoch}",
        flush=True,
    )

    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    start_epoch = 0
    # A different augmentation stream per rank; replaced by the checkpointed state on resume.
    torch.manual_seed(args.seed * 1000 + info.rank + 1)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, args, info.world_size)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"])
        torch.set_rng_state(ckpt["rng"][info.rank]["cpu"])
        if info.device.type == "cuda" and "cuda" in ckpt["rng"][info.rank]:
            torch.cuda.set_rng_state(ckpt["rng"][info.rank]["cuda"], info.device)
        log(f"resumed from {resume_path} at epoch {start_epoch}/{args.epochs}", flush=True)
    elif args.resume == "auto":
        log(f"no checkpoint in {args.checkpoint_dir}; starting from scratch", flush=True)

    ddp_model: nn.Module = model
    if info.is_distributed:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # No buffer broadcast (broadcast_buffers=False): synchronized layers already hold identical statistics on every
        # rank, and the per-forward broadcast would cost a collective for nothing.
        ddp_model = DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync_kwargs())

    from tqdm import tqdm

    flip = data.name == "cifar10"
    ckpt_path = Path(args.checkpoint_dir) / CHECKPOINT_NAME if args.checkpoint_dir else None
    acc = 0.0
    last_epoch = start_epoch
    start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not (info.is_main and sys.stderr.isatty()),
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step, total_steps)
            x = augment(x, data.pad, flip).to(info.device)
            y = y.to(info.device)
            loss = F.cross_entropy(ddp_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_time = time.perf_counter() - t0
        last_epoch = epoch + 1
        loss_sum, seen = all_sum([loss_sum, seen], info)
        if args.norm == "bn":
            broadcast_local_buffers(model, info)
        correct, total = evaluate(model, data, info)
        acc = correct / total
        log(
            f"epoch {epoch + 1}/{args.epochs} loss={loss_sum / seen:.4f} "
            f"held_out_acc={100 * acc:.2f}% ({correct}/{total}) "
            f"images/s={seen / train_time:.0f} time={train_time:.1f}s",
            flush=True,
        )
        if ckpt_path is not None:
            # Every rank's RNG state (augmentation) goes into rank 0's file.
            rng = [None] * info.world_size
            if info.is_distributed:
                dist.all_gather_object(rng, _rng_state(info.device))
            else:
                rng = [_rng_state(info.device)]
            if info.is_main:
                save_checkpoint(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "world_size": info.world_size,
                        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
                        "rng": rng,
                        "sampler": {"seed": sampler.seed, "next_epoch": epoch + 1},
                    },
                )
        if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
            log(f"stopping after epoch {epoch + 1} (--stop-after {args.stop_after}); continue with --resume", flush=True)
            break
    if last_epoch == start_epoch:  # resumed a finished run: nothing trained, still report
        acc = evaluate(model, data, info)[0] / len(data.y_test)
    status = "done" if last_epoch >= args.epochs else "stopped"
    log(
        f"{status}: held_out_acc={100 * acc:.2f}% epochs={last_epoch}/{args.epochs} "
        f"wall={time.perf_counter() - start:.1f}s"
        + (f" checkpoint={ckpt_path}" if ckpt_path else ""),
        flush=True,
    )
    if info.is_distributed:
        dist.barrier()  # rank 0 has finished writing before anyone exits
    syncbn.cleanup()


if __name__ == "__main__":
    main()
