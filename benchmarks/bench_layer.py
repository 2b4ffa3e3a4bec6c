"""Forward+backward time of one normalization layer: local BN vs syncbn vs the peers.

Every world size runs in its own set of spawned processes (Gloo on CPU, one thread each; NCCL on
CUDA when ``--device cuda``). Implementations are timed interleaved (A B C A B C ...), so machine
drift hits all alike; each timed step is the slowest rank's time (what the job waits for).

Reported per shape and world size:
- median time of a forward+backward step, and the median of per-pair ratios to local BN;
- the measured latency of syncbn's two collectives ("coll ms": the forward's all_gather of 3C+3
  float64 values per rank plus the backward's all_reduce of 2C+1; shared memory between ranks of one
  machine, else torch.distributed; torch.distributed's all_reduce goes to the JSON) and the
  resulting floor ``(local + gather + reduce) / local`` that no synchronized layer can beat; and
  syncbn's own collectives timed in place during its steps ("AR@step": latency plus waiting for
  the slowest rank), which splits its time into compute and communication;
- bytes saved for backward relative to the input (``saved_tensors_hooks``);
- output error against a float64 reference at |mean|/std = 1e4 (float32 input); the "local BN"
  row's error is torch's fp32 BatchNorm on the whole concatenated batch (the yardstick).

Usage::

    python benchmarks/bench_layer.py                      # CPU, world sizes 1 2 4, all shapes
    python benchmarks/bench_layer.py --world-sizes 2 --reps 50 --json out.json
    python benchmarks/bench_layer.py --device cuda --world-sizes 1 --dtypes float32 bfloat16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

import syncbn

try:
    from ._spawn import exit_together, run_processes
except ImportError:  # run as a script: python benchmarks/bench_layer.py
    from _spawn import exit_together, run_processes

SHAPES = [(16, 64, 56, 56), (16, 256, 14, 14), (64, 512, 7, 7), (256, 1024)]


def _local_bn(shape: tuple[int, ...], **kw) -> nn.Module:
    return (nn.BatchNorm1d if len(shape) <= 3 else nn.BatchNorm2d)(shape[1], **kw)


class _As4d(nn.Module):
    """Feed a 4-D-only layer (fairscale's is a BatchNorm2d) an (N, C) input as (N, C, 1, 1)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self.layer(x)
        return self.layer(x.reshape(x.shape[0], x.shape[1], -1, 1)).reshape(x.shape)


class _DebugMode(nn.Module):
    """Runs a syncbn layer's forward with consistency mode (``syncbn.set_debug``) on."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        syncbn.set_debug(True)
        try:
            return self.layer(x)
        finally:
            syncbn.set_debug(False)


def _implementations(world: int, device: torch.device) -> dict[str, Callable[[tuple], nn.Module]]:
    impls: dict[str, Callable[[tuple], nn.Module]] = {
        "local BN": lambda s: _local_bn(s),
        "syncbn": lambda s: syncbn.SyncBatchNorm(s[1]),
    }
    if world > 1:
        impls["syncbn dbg"] = lambda s: _DebugMode(syncbn.SyncBatchNorm(s[1]))
    try:
        from fairscale.experimental.nn import SyncBatchNorm as FairscaleSyncBN

        impls["fairscale"] = lambda s: _As4d(FairscaleSyncBN(s[1]))
    except Exception:  # not installed, or broken against this torch
        pass
    if device.type == "cuda" and dist.is_initialized():
        impls["torch SyncBN"] = lambda s: nn.SyncBatchNorm(s[1])
    return impls


def _slowest(seconds: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> float:
    if dist.is_initialized():
        dist.barrier()
    _sync(device)
    t0 = time.perf_counter()
    y = layer(x)
    y.backward(grad)
    _sync(device)
    return time.perf_counter() - t0


def _allreduce_latency(numel: int, reps: int, device: torch.device, reduce: Callable[[torch.Tensor], object]) -> float:
    """Median time of ``reduce`` (a collective) on a ``numel`` float64 vector, every rank starting together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    t = torch.zeros(numel, dtype=torch.float64, device=device)
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        reduce(t)
        _sync(device)
        times.append(_slowest(time.perf_counter() - t0, device))
    return statistics.median(times)


def _saved_bytes_ratio(layer: nn.Module, x: torch.Tensor) -> float:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values()) / (x.numel() * x.element_size())


def _offset_error(
    make: Callable[[tuple], nn.Module], shape: tuple, world: int, rank: int, device, whole_batch: bool
) -> float:
    """Max |output - float64 reference| at |mean|/std = 1e4 on the group's concatenated batch.

    ``whole_batch``: run the layer on the whole concatenated batch in this process (torch's
    single-process BN, the yardstick) instead of on this rank's slice.
    """
    gen = torch.Generator().manual_seed(0)
    full = (torch.randn((shape[0] * world,) + shape[1:], generator=gen, dtype=torch.float64) + 1e4).float()
    ref = _local_bn(shape, dtype=torch.float64)(full.double())
    sl = slice(rank * shape[0], (rank + 1) * shape[0])
    layer = make(shape).to(device)
    y = (layer(full.to(device))[sl] if whole_batch else layer(full[sl].to(device))).double().cpu()
    err = (y - ref[sl]).abs().max().item()
    return _slowest(err if err == err else float("inf"), device)


def _run_world(rank: int, world: int, store_path: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    if world > 1 or args.group_for_single or device.type == "cuda":
        store = dist.FileStore(store_path, world)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    impls = _implementations(world, device)
    # Time syncbn's own collectives where they happen (waiting for the slowest peer included), to
    # split its step time into compute and communication: the forward's all_gather, the backward's
    # all_reduce.
    waits: list[float] = []
    real_all_reduce = syncbn.comm.all_reduce_sum
    real_all_gather = syncbn.comm.all_gather

    def timed(real):
        def collective(tensor, group=None):
            t0 = time.perf_counter()
            out = real(tensor, group)
            waits.append(time.perf_counter() - t0)
            return out

        return collective

    syncbn.comm.all_reduce_sum = timed(real_all_reduce)
    syncbn.comm.all_gather = timed(real_all_gather)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in [tuple(s) for s in args.shapes]:
            torch.manual_seed(rank)
            x = torch.randn(shape, device=device, dtype=dtype)
            if args.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            grad = torch.randn_like(x)
            layers = {name: make(shape).to(device) for name, make in impls.items()}
            times: dict[str, list[float]] = {name: [] for name in layers}
            waits.clear()  # filled by the syncbn rows (with and without consistency mode)
            for rep in range(args.warmup + args.reps):
                for name, layer in layers.items():
                    t = _slowest(_time_step(layer, x, grad, device), device)
                    if rep >= args.warmup:
                        times[name].append(t)
            c = shape[1]
            # The floor uses the transport syncbn really takes (shared memory between the ranks of
            # one machine, else torch.distributed); torch.distributed's own latency is kept too.
            latency = _allreduce_latency(2 * c + 1, args.reps, device, real_all_reduce)
            gather_latency = _allreduce_latency(3 * c + 3, args.reps, device, real_all_gather)
            torch_latency = _allreduce_latency(2 * c + 1, args.reps, device, dist.all_reduce)
            local = statistics.median(times["local BN"])
            row = {
                "world_size": world,
                "shape": list(shape),
                "dtype": dtype_name,
                "channels_last": bool(args.channels_last and x.dim() == 4),
                "allreduce_latency_ms": latency * 1e3,
                "allgather_latency_ms": gather_latency * 1e3,
                "torch_allreduce_latency_ms": torch_latency * 1e3,
                # syncbn's collectives timed in place: latency plus waiting for the slowest rank.
                "syncbn_allreduce_in_step_ms": statistics.median(waits) * 1e3 if waits else 0.0,
                "limit_ratio": (local + latency + gather_latency) / local,
                "impls": {},
            }
            for name, layer in layers.items():
                ratios = [t / base for t, base in zip(times[name], times["local BN"])]
                entry = {
                    "median_ms": statistics.median(times[name]) * 1e3,
                    "ratio_to_local": statistics.median(ratios),
                    "saved_bytes_ratio": _saved_bytes_ratio(layer, x),
                }
                if dtype == torch.float32:
                    entry["error_at_mean_1e4"] = _offset_error(
                        impls[name], shape, world, rank, device, whole_batch=(name == "local BN")
                    )
                row["impls"][name] = entry
            rows.append(row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    if dist.is_initialized():
        exit_together()


def _print_table(rows: list[dict]) -> None:
    head = (
        f"{'W':>2} {'shape':<18} {'dtype':<8} {'impl':<10} {'median ms':>10} {'x local':>8} "
        f"{'limit x':>8} {'coll ms':>7} {'AR@step':>7} {'saved/in':>8} {'err@1e4':>9}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        for name, e in row["impls"].items():
            shape = "x".join(map(str, row["shape"])) + ("cl" if row["channels_last"] else "")
            err = e.get("error_at_mean_1e4")
            print(
                f"{row['world_size']:>2} {shape:<18} {row['dtype']:<8} {name:<10} {e['median_ms']:>10.3f} "
                f"{e['ratio_to_local']:>8.3f} {row['limit_ratio']:>8.3f} {row['allreduce_latency_ms'] + row['allgather_latency_ms']:>7.3f} "
                f"{row['syncbn_allreduce_in_step_ms']:>7.3f} "
                f"{e['saved_bytes_ratio']:>8.3f} {'' if err is None else f'{err:.2e}':>9}"
            )


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+", default=SHAPES,
                        help="shapes as NxCxHxW, e.g. 16x64x56x56 256x1024")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--group-for-single", action="store_true",
                        help="at world size 1, initialize a 1-rank group (default: no group at all)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    for world in args.world_sizes:
        rows += run_processes(_run_world, world, args, args.timeout)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, {args.threads} thread(s) per process, {args.reps} interleaved reps")
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "shapes"},
                       "shapes": [list(s) for s in args.shapes], "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
