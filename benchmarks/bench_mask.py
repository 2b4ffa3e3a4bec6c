"""Masked synchronized BN (padded sequences) against the same layer unmasked, in the same run.

Every world size runs in its own set of spawned processes (Gloo on CPU, one thread each). Each
rank's batch is ``(N, C, *S)`` with lengths falling evenly from full to a length that makes
``--padding`` of the positions padding (0.25 by default: lengths from T down to T/2). The
implementations are timed interleaved (A B C A B C ...), so machine drift hits all alike; each
timed step is the slowest rank's time (what the job waits for). Implementations:
- ``unmasked``: ``SyncBatchNorm(C)(x)``, statistics over every position (the baseline);
- ``mask=``: ``SyncBatchNorm(C)(x, mask)``;
- ``masked()``: ``with syncbn.masked(mask): layer(x)``, the context manager's lookup included;
- ``pack``: what a user does without ``mask=``: gather the valid positions into ``(V, C)``, run
  ``SyncBatchNorm`` on them, scatter the result back into zeros.

Reported per shape and world size: the median time of a forward (training mode, input requiring a
gradient) and of a forward+backward, and the medians of per-pair ratios to ``unmasked``; and the
largest difference between each masked output and ``pack``'s (the same function, computed apart).

Usage::

    python benchmarks/bench_mask.py                          # world size 2, the default shapes
    python benchmarks/bench_mask.py --world-sizes 1 2 4 --padding 0.5 --reps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import syncbn

try:
    from ._spawn import exit_together, run_processes
except ImportError:  # run as a script: python benchmarks/bench_mask.py
    from _spawn import exit_together, run_processes

# Conformer convolution modules (batch 16 per device, d 256 and 144, 200 and 400 frames), a TDNN
# layer, and an image-shaped one for the mask over several dims.
SHAPES = [(16, 256, 200), (16, 144, 400), (32, 512, 100), (16, 64, 28, 28)]
IMPLS = ("unmasked", "mask=", "masked()", "pack")


def lengths_mask(shape: tuple[int, ...], padding: float) -> Tensor:
    """Bool ``(N, *S)``: sample ``n`` holds data in its first ``L_n`` positions (row-major over
    ``S``), ``L_n`` falling evenly from all of them to ``(1 - 2 * padding)`` of them."""
    n, positions = shape[0], math.prod(shape[2:])
    frac = torch.linspace(1.0, 1.0 - 2 * padding, n) if n > 1 else torch.tensor([1.0 - padding])
    lengths = (frac * positions).round().clamp(min=1).long()
    return (torch.arange(positions) < lengths[:, None]).reshape((n,) + tuple(shape[2:]))


class _Pack(nn.Module):
    """Batch norm over the valid positions done by hand: gather them to ``(V, C)``, normalize,
    scatter back into zeros."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        channels_last = x.movedim(1, -1)
        out = torch.zeros_like(channels_last)
        out[mask] = self.layer(channels_last[mask])
        return out.movedim(-1, 1)


def _calls(channels: int, mask: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """One forward per implementation, each with its own layer (own running statistics)."""
    layers = {name: syncbn.SyncBatchNorm(channels) for name in IMPLS}

    def in_context(x: Tensor) -> Tensor:
        with syncbn.masked(mask):
            return layers["masked()"](x)

    pack = _Pack(layers["pack"])
    return {
        "unmasked": layers["unmasked"],
        "mask=": lambda x: layers["mask="](x, mask),
        "masked()": in_context,
        "pack": lambda x: pack(x, mask),
    }


def _slowest(seconds: float) -> float:
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _time(call: Callable[[Tensor], Tensor], x: Tensor, grad: Optional[Tensor]) -> float:
    """Seconds of one forward (``grad`` None) or forward+backward, every rank starting together."""
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    y = call(x)
    if grad is not None:
        y.backward(grad)
    return time.perf_counter() - t0


def _run_world(rank: int, world: int, store_path: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    rows = []
    for shape in [tuple(s) for s in args.shapes]:
        torch.manual_seed(rank)
        x = torch.randn(shape).requires_grad_()
        grad = torch.randn(shape)
        mask = lengths_mask(shape, args.padding)
        calls = _calls(shape[1], mask)
        fwd: dict[str, list[float]] = {name: [] for name in calls}
        both: dict[str, list[float]] = {name: [] for name in calls}
        for rep in range(args.warmup + args.reps):
            for name, call in calls.items():
                t_fwd = _slowest(_time(call, x, None))
                t_both = _slowest(_time(call, x, grad))
                if rep >= args.warmup:
                    fwd[name].append(t_fwd)
                    both[name].append(t_both)
        with torch.no_grad():
            ref = calls["pack"](x)
            errors = {name: (calls[name](x) - ref).abs().max().item() for name in ("mask=", "masked()")}
        padding = 1.0 - mask.sum().item() / mask.numel()
        row = {"world_size": world, "shape": list(shape), "padding": padding, "impls": {}}
        for name in calls:
            entry = {}
            for kind, times in (("fwd", fwd), ("fwd_bwd", both)):
                entry[f"{kind}_ms"] = statistics.median(times[name]) * 1e3
                entry[f"{kind}_ratio"] = statistics.median(
                    [t / base for t, base in zip(times[name], times["unmasked"])]
                )
            if name in errors:
                entry["max_diff_to_pack"] = _slowest(errors[name])
            row["impls"][name] = entry
        rows.append(row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    if dist.is_initialized():
        exit_together()


def _print_table(rows: list[dict]) -> None:
    head = (f"{'W':>2} {'shape':<14} {'pad':>4} {'impl':<9} {'fwd ms':>8} {'x unmasked':>10} "
            f"{'fwd+bwd ms':>10} {'x unmasked':>10} {'diff to pack':>12}")
    print(head)
    print("-" * len(head))
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        for name, e in row["impls"].items():
            diff = e.get("max_diff_to_pack")
            print(f"{row['world_size']:>2} {shape:<14} {row['padding']:>4.2f} {name:<9} {e['fwd_ms']:>8.3f} "
                  f"{e['fwd_ratio']:>10.3f} {e['fwd_bwd_ms']:>10.3f} {e['fwd_bwd_ratio']:>10.3f} "
                  f"{'' if diff is None else f'{diff:.1e}':>12}")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+", default=SHAPES,
                        help="shapes as NxCxT or NxCxHxW, e.g. 16x256x200")
    parser.add_argument("--padding", type=float, default=0.25, help="fraction of positions that are padding")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.padding < 0.5:
        parser.error(f"expected 0 <= --padding < 0.5 (lengths fall evenly to 1 - 2 * padding), got {args.padding}")
    for shape in args.shapes:
        if len(shape) < 3:
            parser.error(f"expected shapes with positions to mask, (N, C, T) or more, got {'x'.join(map(str, shape))}")

    rows: list[dict] = []
    for world in args.world_sizes:
        rows += run_processes(_run_world, world, args, args.timeout)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s) per process, {args.reps} interleaved reps, padding {args.padding}")
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "shapes"},
                       "shapes": [list(s) for s in args.shapes], "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
