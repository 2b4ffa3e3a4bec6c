"""Padded sequences: train a small Conformer-style model with masked and unmasked synchronized BN.

    python examples/masked_sequences.py                        # starts its 2 CPU ranks itself
    python examples/masked_sequences.py --quick                # a smoke run of a few seconds
    bash launch/torchrun.sh examples/masked_sequences.py       # the same, started by torchrun
    torchrun --standalone --nproc-per-node=2 examples/masked_sequences.py

The task (generated, nothing downloaded): each sequence has 4 channels and 10-200 frames; a noisy
sine wave in two of its channels has one of 4 frequencies, which is the class. Batches are padded
to their longest sequence, with garbage in the padded frames. The model is a stem, two Conformer
convolution modules (pointwise conv, GLU, depthwise conv, batch norm, SiLU, pointwise conv) written
as WeNet writes them (the padded frames are zeroed before the depthwise conv, but ``self.norm(x)``
gets no mask), masked mean pooling and a head with a batch norm of its own.

The model is trained twice on 2 ranks (Gloo), from the same initial weights on the same batches,
after ``syncbn.convert_sync_bn``:
  masked    each forward runs inside ``syncbn.masked(mask, layers=model.blocks)``: the modules'
            batch norms take the statistics of the valid frames of both ranks (the head's batch
            norm normalizes pooled vectors and stays unmasked);
  unmasked  the same code without the context: the statistics also pool the padded frames.
Both models then score the same held-out sequences padded two ways:
  A  each batch padded to its own longest sequence (as in training);
  B  every sequence padded to 256 frames.
and twice: with the running statistics (eval mode, what is deployed) and with the batch statistics
of the 2 ranks (train mode: what each training step computes). The table gives the accuracy under
A and B and the largest difference of a logit between A and B.

What to expect: with batch statistics, the unmasked model's logits move with the padding (the
statistics pool padded frames, more of them under B), the masked model's do not (float32 rounding
aside). With running statistics neither moves: eval-mode batch norm is a fixed per-channel affine
map, and this model never lets a padded frame reach a valid one. So the mask makes what a training
step computes for a sequence independent of its batch mates' padding, and the running statistics
those of the valid frames; on this task it does not change the accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

if __package__ in (None, ""):  # run as a file: make `examples` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import syncbn  # noqa: E402
from examples.train_resnet import no_buffer_sync_kwargs  # noqa: E402

__all__ = ["main", "parse_args", "make_data", "pad_batch", "ConvModule", "SequenceClassifier", "PAD_B"]

IN_CHANNELS = 4
FREQUENCIES = (0.04, 0.06, 0.08, 0.10)  # cycles per frame, one per class
PAD_B = 256  # padding B: every sequence padded to this many frames
GARBAGE = 5.0  # scale of the garbage in padded frames


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank and step (default: 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--width", type=int, default=32, help="channels of the model (default: 32)")
    p.add_argument("--kernel", type=int, default=15, help="depthwise conv kernel (default: 15)")
    p.add_argument("--min-len", type=int, default=10)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--train", type=int, default=4096, help="training sequences (default: 4096)")
    p.add_argument("--test", type=int, default=512, help="held-out sequences (default: 512)")
    p.add_argument("--eval-batch", type=int, default=16, help="held-out sequences per rank and batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="ranks to start without a launcher (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20 steps, 512 training and 64 held-out sequences")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train, args.test = min(args.steps, 20), min(args.train, 512), min(args.test, 64)
    for name in ("steps", "batch_size", "width", "train", "test", "eval_batch", "nproc", "threads"):
        if getattr(args, name) < 1:
            p.error(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    if not 2 <= args.min_len <= args.max_len <= PAD_B:
        p.error(f"expected 2 <= --min-len <= --max-len <= {PAD_B}, got {args.min_len} and {args.max_len}")
    return args


# ---------------------------------------------------------------- data
class Sequences(NamedTuple):
    """``x`` is ``(n, IN_CHANNELS, PAD_B)``: each sequence's frames, then garbage up to PAD_B."""

    x: Tensor
    lengths: Tensor
    labels: Tensor


def make_data(n: int, min_len: int, max_len: int, seed: int) -> Sequences:
    """``n`` sequences of ``min_len``-``max_len`` frames; the same on every rank and every run."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    labels = torch.randint(len(FREQUENCIES), (n,), generator=gen)
    t = torch.arange(PAD_B, dtype=torch.float32)
    freq = torch.tensor(FREQUENCIES)[labels, None]
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    amp = 0.5 + torch.rand(n, 1, generator=gen)
    x = torch.randn(n, IN_CHANNELS, PAD_B, generator=gen)  # noise in every channel
    x[:, 0] += amp * torch.sin(2 * math.pi * freq * t + phase)
    x[:, 1] += amp * torch.cos(2 * math.pi * freq * t + phase)
    x += torch.randn(n, IN_CHANNELS, 1, generator=gen)  # a per-sequence offset
    padded = torch.arange(PAD_B) >= lengths[:, None]
    garbage = GARBAGE * torch.randn(n, IN_CHANNELS, PAD_B, generator=gen) + GARBAGE
    x = torch.where(padded[:, None], garbage, x)
    return Sequences(x, lengths, labels)


def pad_batch(data: Sequences, idx: Tensor, pad_to: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The sequences ``idx`` padded to ``pad_to`` frames (None: their longest): ``x (B, C, T)``,
    ``mask (B, T)`` (True on a sequence's frames) and labels."""
    lengths = data.lengths[idx]
    t = int(lengths.max()) if pad_to is None else pad_to
    mask = torch.arange(t) < lengths[:, None]
    return data.x[idx, :, :t], mask, data.labels[idx]


# ---------------------------------------------------------------- model
class ConvModule(nn.Module):
    """A Conformer convolution module as WeNet writes it: the padded frames are zeroed before the
    depthwise conv (so it never reads them), but the batch norm is called as ``self.norm(x)``."""

    def __init__(self, d: int, kernel: int) -> None:
        super().__init__()
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.norm = nn.BatchNorm1d(d)
        self.act = nn.SiLU()
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:  # x (N, d, T), keep (N, 1, T) bool
        x = F.glu(self.pointwise1(x.masked_fill(~keep, 0.0)), dim=1)
        x = self.depthwise(x.masked_fill(~keep, 0.0))
        x = self.act(self.norm(x))  # no mask here: inside syncbn.masked the layer finds its own
        return self.pointwise2(x).masked_fill(~keep, 0.0)


class SequenceClassifier(nn.Module):
    def __init__(self, width: int, kernel: int, num_classes: int = len(FREQUENCIES)) -> None:
        super().__init__()
        self.stem = nn.Conv1d(IN_CHANNELS, width, 1)
        self.blocks = nn.ModuleList([ConvModule(width, kernel) for _ in range(2)])
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        keep = mask[:, None, :]
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h, keep)
        pooled = h.masked_fill(~keep, 0.0).sum(-1) / mask.sum(-1, keepdim=True)
        return self.head(pooled)


def mask_scope(model: SequenceClassifier, mask: Tensor, use_mask: bool) -> contextlib.AbstractContextManager:
    """The only difference between the two runs. ``layers=``: the head's batch norm sees ``(N, C)``
    pooled vectors, which no ``(N, T)`` mask fits (without it, the context raises ValueError)."""
    return syncbn.masked(mask, layers=model.blocks) if use_mask else contextlib.nullcontext()


# ---------------------------------------------------------------- train / evaluate
def all_reduce(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def train(args: argparse.Namespace, info: syncbn.DistInfo, data: Sequences, use_mask: bool, log) -> SequenceClassifier:
    torch.manual_seed(args.seed)  # the same initial weights for both models and on every rank
    model = syncbn.convert_sync_bn(SequenceClassifier(args.width, args.kernel))
    ddp_model: nn.Module = model
    if info.is_distributed:
        ddp_model = DistributedDataParallel(model, **no_buffer_sync_kwargs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    global_batch = args.batch_size * info.world_size
    order = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    perm, pos = torch.randperm(len(data.labels), generator=order), 0
    name = "masked" if use_mask else "unmasked"
    model.train()
    t0 = time.perf_counter()
    loss_sum, correct, seen, valid, frames = 0.0, 0, 0, 0, 0
    for step in range(args.steps):
        if pos + global_batch > len(perm):
            perm, pos = torch.randperm(len(data.labels), generator=order), 0
        idx = perm[pos : pos + global_batch][info.rank * args.batch_size : (info.rank + 1) * args.batch_size]
        pos += global_batch
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, mask, y = pad_batch(data, idx)
        with mask_scope(model, mask, use_mask):
            logits = ddp_model(x, mask)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        valid, frames = valid + int(mask.sum()), frames + mask.numel()
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            loss_sum, correct, seen, valid, frames = all_reduce([loss_sum, correct, seen, valid, frames])
            log(f"{name:>8} step {step + 1}/{args.steps} loss={loss_sum / seen:.4f} "
                f"train_acc={100 * correct / seen:.1f}% padded_frames={100 * (1 - valid / frames):.0f}% "
                f"time={time.perf_counter() - t0:.1f}s", flush=True)
            loss_sum, correct, seen, valid, frames = 0.0, 0, 0, 0, 0
    return model


@torch.no_grad()
def predict(model: SequenceClassifier, data: Sequences, info: syncbn.DistInfo, args: argparse.Namespace,
            use_mask: bool, pad_to: Optional[int], batch_stats: bool) -> tuple[Tensor, Tensor]:
    """This rank's logits and labels on its slice of ``data``, in batches of ``--eval-batch``.

    ``batch_stats``: train mode, each batch normalized with the statistics of the ranks' batches
    (on a copy, so the running statistics stay as trained); else eval mode (running statistics).
    Every rank runs the same number of batches: in train mode each batch is a collective.
    """
    model = copy.deepcopy(model).train() if batch_stats else model.eval()
    idx = torch.arange(info.rank, len(data.labels), info.world_size)
    logits, labels = [], []
    for i in range(0, len(idx), args.eval_batch):
        x, mask, y = pad_batch(data, idx[i : i + args.eval_batch], pad_to)
        with mask_scope(model, mask, use_mask):
            logits.append(model(x, mask))
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def compare_paddings(model: SequenceClassifier, data: Sequences, info: syncbn.DistInfo, args: argparse.Namespace,
                     use_mask: bool, batch_stats: bool) -> tuple[float, float, float]:
    """Accuracy under padding A and B, and the largest |logit A - logit B| over all ranks."""
    a, y = predict(model, data, info, args, use_mask, None, batch_stats)
    b, _ = predict(model, data, info, args, use_mask, PAD_B, batch_stats)
    correct_a, correct_b, n = all_reduce([int((a.argmax(1) == y).sum()), int((b.argmax(1) == y).sum()), len(y)])
    (diff,) = all_reduce([(a - b).abs().max().item()], dist.ReduceOp.MAX)
    return correct_a / n, correct_b / n, diff


def _spawned(rank: int, world: int, port: int, argv: Optional[list[str]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main(argv)


def spawn(argv: Optional[list[str]], nproc: int) -> None:
    """No launcher: start ``nproc`` ranks here, as torchrun would; a failed rank stops the others."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(r, nproc, port, argv)) for r in range(nproc)]
    for p in procs:
        p.start()
    running = list(procs)
    while running:
        wait([p.sentinel for p in running])
        running = [p for p in running if p.is_alive()]
        if any(p.exitcode for p in procs if not p.is_alive()):
            for p in running:
                p.kill()
            for p in procs:
                p.join()
            codes = [p.exitcode for p in procs]
            raise SystemExit(f"masked_sequences: a rank failed (exit codes {codes}); see its traceback above")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if syncbn.distributed.launcher_env() is None and args.nproc > 1:
        return spawn(argv if argv is not None else sys.argv[1:], args.nproc)
    torch.set_num_threads(args.threads)
    info = syncbn.init_distributed(device="cpu")
    log = print if info.is_main else (lambda *a, **k: None)
    start = time.perf_counter()
    train_data = make_data(args.train, args.min_len, args.max_len, seed=args.seed)
    test_data = make_data(args.test, args.min_len, args.max_len, seed=args.seed + 10_000)
    log(f"world_size={info.world_size} backend={info.backend} batch_per_rank={args.batch_size} "
        f"steps={args.steps} train={args.train} test={args.test} lengths={args.min_len}-{args.max_len}", flush=True)

    results = {}
    for use_mask in (True, False):
        model = train(args, info, train_data, use_mask, log)
        name = "masked" if use_mask else "unmasked"
        for batch_stats in (False, True):
            results[name, batch_stats] = compare_paddings(model, test_data, info, args, use_mask, batch_stats)

    log(f"\n{args.test} held-out sequences, padded A: each batch of {args.eval_batch} per rank to its "
        f"longest; B: all to {PAD_B} frames")
    head = f"{'model':<9} {'statistics':<17} {'acc A':>7} {'acc B':>7} {'max|logit A-B|':>15}"
    log(head)
    log("-" * len(head))
    for (name, batch_stats), (acc_a, acc_b, diff) in results.items():
        stats = "batch (training)" if batch_stats else "running (eval)"
        log(f"{name:<9} {stats:<17} {100 * acc_a:>6.2f}% {100 * acc_b:>6.2f}% {diff:>15.1e}")
    log(f"done: wall={time.perf_counter() - start:.1f}s", flush=True)
    if info.is_distributed:
        dist.barrier()
    syncbn.cleanup()


if __name__ == "__main__":
    main()
