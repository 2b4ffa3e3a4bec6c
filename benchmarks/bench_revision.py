"""One synchronized layer against syncbn as it was at a git revision: same processes, interleaved.

Answers "did this change make the layer slower?" with same-run ratios. The package at ``--rev``
(``git archive`` of this repository's ``syncbn/``) is unpacked into a temporary folder as
``syncbn_rev`` (its custom operators renamed ``syncbn_rev::``, so both register side by side) and
imported beside the working tree's ``syncbn``. Every world size runs in fresh spawned processes
(Gloo on CPU, one torch thread each). For each shape the current layer, the revision's layer and
torch's local batch norm run in blocks of ``k`` forward+backward steps, interleaved and in
alternating order, a barrier before each block; a block's time is the slowest rank's.

Reported per shape: the median time per step of each, the median of per-block ratios current /
revision with its interquartile range, and the largest difference between the two layers'
outputs on the first step (they compute the same function: a large value means the revision
differs in what it computes, not only in speed).

Usage::

    python benchmarks/bench_revision.py --rev 23589a3            # W = 2, default shapes
    python benchmarks/bench_revision.py --rev HEAD~5 --world-sizes 2 4 --reps 40 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import syncbn

try:
    from ._spawn import exit_together, run_processes
except ImportError:  # run as a script: python benchmarks/bench_revision.py
    from _spawn import exit_together, run_processes

SHAPES = [(8, 64, 14, 14), (16, 64, 56, 56), (16, 256, 14, 14), (64, 512, 7, 7), (256, 1024)]
ALIAS = "syncbn_rev"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def materialize(rev: str, folder: str, alias: str = ALIAS) -> str:
    """Unpack ``syncbn/`` at git revision ``rev`` into ``folder/alias``; return the commit's short hash.

    Its custom operators are renamed ``alias::`` (``torch.ops.alias``): two packages cannot
    register the same operator names in one process. Raises ``RuntimeError`` naming the
    revision when git cannot find it (say, a shallow clone).
    """
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", f"{rev}^{{commit}}"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", commit, "syncbn"],
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        raise RuntimeError(
            f"bench_revision: expected a git revision of {REPO} that holds syncbn/, got {rev!r} "
            f"({detail.strip() or err}); in a shallow clone, fetch it first (git fetch --unshallow)"
        ) from err
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse paths outside folder
            tar.extractall(folder, filter="data")
        else:  # pragma: no cover - older Pythons (git archive of this repository: trusted)
            tar.extractall(folder)
    os.rename(os.path.join(folder, "syncbn"), os.path.join(folder, alias))
    for root, _, files in os.walk(os.path.join(folder, alias)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path) as f:
                    text = f.read()
                text = text.replace('"syncbn::', f'"{alias}::').replace("torch.ops.syncbn.", f"torch.ops.{alias}.")
                text = text.replace("torch.ops.syncbn,", f"torch.ops.{alias},")
                with open(path, "w") as f:
                    f.write(text)
    return commit


def _local_bn(shape: tuple[int, ...]) -> nn.Module:
    return (nn.BatchNorm1d if len(shape) <= 3 else nn.BatchNorm2d)(shape[1])


def _steps_per_block(shape: tuple[int, ...], wanted: Optional[int]) -> int:
    """Enough steps that a block of a small layer is not all timer and barrier (3 to 40)."""
    if wanted:
        return wanted
    numel = 1
    for s in shape:
        numel *= s
    return max(3, min(40, int(4e6 // numel)))


def _run_world(rank: int, world: int, store_path: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.folder)
    previous = __import__(ALIAS)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    rows = []
    for shape in [tuple(s) for s in args.shapes]:
        torch.manual_seed(rank)
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn_like(x)
        layers = {
            "current": syncbn.SyncBatchNorm(shape[1]),
            "revision": previous.SyncBatchNorm(shape[1]),
            "local BN": _local_bn(shape),
        }
        outputs = {name: layers[name](x).detach() for name in ("current", "revision")}
        out_diff = (outputs["current"] - outputs["revision"]).abs().max().item()
        k = _steps_per_block(shape, args.steps_per_block)
        times: dict[str, list[float]] = {name: [] for name in layers}
        order = list(layers)
        for block in range(args.warmup + args.reps):
            for name in order if block % 2 else order[::-1]:
                layer = layers[name]
                dist.barrier()
                start = time.perf_counter()
                for _ in range(k):
                    layer(x).backward(grad)
                if block >= args.warmup:
                    times[name].append((time.perf_counter() - start) / k)
        for name in times:  # the slowest rank's time of every block
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name] = t.tolist()
        ratios = sorted(a / b for a, b in zip(times["current"], times["revision"]))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rows.append({
            "world_size": world,
            "shape": list(shape),
            "steps_per_block": k,
            "median_ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
            "current_over_revision": statistics.median(ratios),
            "ratio_iqr": [q1, q3],
            "max_output_difference": out_diff,
        })
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    exit_together()


def _print_table(rows: list[dict], rev: str, commit: str) -> None:
    print(f"{'W':>2} {'shape':<16} {'current ms':>10} {'rev ms':>10} {'local ms':>9} "
          f"{'current/rev':>11} {'IQR':>13} {'max |diff|':>10}")
    for r in rows:
        ms = r["median_ms"]
        q1, q3 = r["ratio_iqr"]
        print(f"{r['world_size']:>2} {'x'.join(map(str, r['shape'])):<16} {ms['current']:>10.3f} "
              f"{ms['revision']:>10.3f} {ms['local BN']:>9.3f} {r['current_over_revision']:>11.3f} "
              f"{f'{q1:.3f}-{q3:.3f}':>13} {r['max_output_difference']:>10.2e}")
    print(f"(revision: {rev} = {commit}; ms per forward+backward step, median over blocks; "
          "current/rev: median of per-block ratios)")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision to compare with (a hash, tag, HEAD~3, ...)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2])
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+", default=SHAPES,
                        help="shapes as NxCxHxW, e.g. 8x64x14x14 256x1024")
    parser.add_argument("--reps", type=int, default=30, help="timed blocks per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed blocks first")
    parser.add_argument("--steps-per-block", type=int, default=None, help="default: 3-40 by input size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        commit = materialize(args.rev, folder)
        args.folder = folder
        for world in args.world_sizes:
            rows += run_processes(_run_world, world, args, args.timeout)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s) per process, {args.reps} interleaved blocks")
    _print_table(rows, args.rev, commit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("shapes", "folder")},
                       "commit": commit, "shapes": [list(s) for s in args.shapes], "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
