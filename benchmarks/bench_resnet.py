"""DDP training step of the example ResNet-18 on CPU processes: SyncBN vs local BN.

Both models train side by side in the same processes, their steps interleaved (A B A B ...), so
machine drift hits both alike. Reported: median step time of each (slowest rank), the median of
per-pair ratios, the number of syncbn collectives and their bytes per step, DDP's gradient
all-reduce calls and bytes per step (via a counting comm hook), the measured latency of syncbn's
two collectives per layer (the forward's all_gather of 3C+3 float64 values per rank, the backward's
all_reduce of 2C+1; torch.distributed's all_reduce beside it), and the bound:
local step * 1.05 + one latency of each collective per BN layer.

Usage::

    python benchmarks/bench_resnet.py                       # 2 processes, width 32, batch 8 per rank
    python benchmarks/bench_resnet.py --nproc 2 --width 64 --batch 16 --steps 30 --json out.json
    python benchmarks/bench_resnet.py --compile inductor     # adds torch.compile'd twins, graph counts
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Optional

import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import syncbn  # noqa: E402
from examples.models import resnet18  # noqa: E402

try:
    from ._spawn import exit_together, run_processes
except ImportError:  # run as a script: python benchmarks/bench_resnet.py
    from _spawn import exit_together, run_processes


class _Counter:
    """Counts calls, bytes and (where timed) seconds of the collectives it wraps."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def add(self, t: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += t.numel() * t.element_size()


def _counting_ddp_hook(counter: _Counter):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter.add(bucket.buffer())
        return allreduce_hook(state, bucket)

    return hook


def _worker(rank: int, world: int, store_path: str, args: argparse.Namespace, out_path: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    base = resnet18(num_classes=10, in_channels=3, width=args.width)
    local = base
    group = dist.new_group(list(range(world))) if args.dedicated_group else None
    synced = syncbn.convert_sync_bn(resnet18(num_classes=10, in_channels=3, width=args.width), process_group=group)
    synced.load_state_dict(local.state_dict())
    n_bn = sum(isinstance(m, syncbn.SyncBatchNorm) for m in synced.modules())
    channels = [m.num_features for m in synced.modules() if isinstance(m, syncbn.SyncBatchNorm)]

    variants = [("local BN", local), ("syncbn", synced)]
    graphs = {}
    if args.compile:
        # Compiled twins with the same weights; dynamo's explain (on a spare copy: it runs a
        # forward) counts the graphs and breaks of each model in training mode.
        probe = torch.randn(args.batch, 3, args.image, args.image)
        for name, model in list(variants):
            spare = copy.deepcopy(model)
            explained = torch._dynamo.explain(spare)(probe)
            graphs[f"{name} compiled"] = {
                "graphs": explained.graph_count,
                "graph_breaks": explained.graph_break_count,
                "break_reasons": sorted({str(r.reason).splitlines()[0][:120] for r in explained.break_reasons}),
            }
            torch._dynamo.reset()
            variants.append((f"{name} compiled", copy.deepcopy(model)))

    models, opts, ddp_counters = {}, {}, {}
    for name, model in variants:
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        ddp_counters[name] = _Counter()
        ddp.register_comm_hook(None, _counting_ddp_hook(ddp_counters[name]))
        models[name] = torch.compile(ddp, backend=args.compile) if name.endswith("compiled") else ddp
        opts[name] = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)

    # Count syncbn's own collectives by wrapping the two functions every layer calls: the forward's
    # all_gather of each rank's (3C+3)-value row, the backward's all_reduce of 2C gradient sums and
    # a flag.
    sync_counter = _Counter()
    real_all_reduce = syncbn.comm.all_reduce_sum
    real_all_gather = syncbn.comm.all_gather

    def counting(real):
        def collective(tensor, group=None):
            if torch.compiler.is_compiling():
                # Tracing: the graph calls syncbn's operator, whose eager body comes back here to count.
                return real(tensor, group)
            sync_counter.add(tensor)
            t0 = time.perf_counter()
            out = real(tensor, group)
            sync_counter.seconds += time.perf_counter() - t0
            return out

        return collective

    syncbn.comm.all_reduce_sum = counting(real_all_reduce)
    syncbn.comm.all_gather = counting(real_all_gather)

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    times: dict[str, list[float]] = {name: [] for name in models}
    in_allreduce: list[float] = []
    counted = {}
    for step in range(args.warmup + args.steps):
        for name, ddp in models.items():
            before = (sync_counter.calls, sync_counter.bytes, ddp_counters[name].calls, ddp_counters[name].bytes)
            seconds_before = sync_counter.seconds
            dist.barrier()
            t0 = time.perf_counter()
            loss = F.cross_entropy(ddp(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= args.warmup:
                times[name].append(elapsed.item())
                if name == "syncbn":
                    in_allreduce.append(sync_counter.seconds - seconds_before)
            counted[name] = {
                "syncbn_collectives": sync_counter.calls - before[0],
                "syncbn_bytes": sync_counter.bytes - before[1],
                "ddp_allreduces": ddp_counters[name].calls - before[2],
                "ddp_bytes": ddp_counters[name].bytes - before[3],
            }

    def median_latency(reduce, numel: int) -> float:
        latencies = []
        probe = torch.zeros(numel, dtype=torch.float64)
        for _ in range(50):
            dist.barrier()
            t0 = time.perf_counter()
            reduce(probe)
            lat = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(lat, op=dist.ReduceOp.MAX)
            latencies.append(lat.item())
        return statistics.median(latencies)

    # The bound uses the transport syncbn really takes (shared memory between the ranks of one
    # machine, else torch.distributed); torch.distributed's own latency is reported beside it.
    c = int(statistics.median(channels))
    latency = median_latency(real_all_reduce, 2 * c + 1)
    gather_latency = median_latency(real_all_gather, 3 * c + 3)
    torch_latency = median_latency(dist.all_reduce, 2 * c + 1)

    if rank == 0:
        local_ms = statistics.median(times["local BN"]) * 1e3
        result = {
            "world_size": world,
            "width": args.width,
            "batch_per_rank": args.batch,
            "image": args.image,
            "threads_per_process": args.threads,
            "bn_layers": n_bn,
            "allreduce_latency_ms": latency * 1e3,
            "allgather_latency_ms": gather_latency * 1e3,
            "torch_allreduce_latency_ms": torch_latency * 1e3,
            # Time rank 0 spent inside syncbn's collectives per step: latency plus waiting for the
            # slower rank at each of the 2 * bn_layers synchronization points.
            "syncbn_in_allreduce_ms": statistics.median(in_allreduce) * 1e3,
            "bound_ms": local_ms * 1.05 + n_bn * (latency + gather_latency) * 1e3,
            "compile_backend": args.compile,
            "graphs": graphs,
            "impls": {
                name: {
                    "median_step_ms": statistics.median(ts) * 1e3,
                    "ratio_to_local": statistics.median(
                        [t / b for t, b in zip(ts, times["local BN"])]
                    ),
                    **counted[name],
                }
                for name, ts in times.items()
            },
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
    exit_together()


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--width", type=int, default=32, help="ResNet-18 base width (64 is the usual)")
    parser.add_argument("--batch", type=int, default=8, help="samples per process")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--dedicated-group", action="store_true",
                        help="give syncbn its own process group instead of DDP's default one")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time torch.compile'd twins with this backend (inductor, aot_eager)")
    args = parser.parse_args(argv)

    result = run_processes(_worker, args.nproc, args, args.timeout)

    print(f"# ResNet-18 width {result['width']}, {result['batch_per_rank']} x 3x{args.image}x{args.image} per rank, "
          f"{result['world_size']} CPU processes x {args.threads} thread(s), Gloo, DDP broadcast_buffers=False, "
          f"{args.steps} interleaved steps")
    head = f"{'impl':<19} {'step ms':>9} {'x local':>8} {'syncbn coll.':>12} {'syncbn KB':>10} {'DDP AR':>7} {'DDP MB':>8}"
    print(head)
    print("-" * len(head))
    for name, e in result["impls"].items():
        print(f"{name:<19} {e['median_step_ms']:>9.2f} {e['ratio_to_local']:>8.3f} {e['syncbn_collectives']:>12d} "
              f"{e['syncbn_bytes'] / 1e3:>10.1f} {e['ddp_allreduces']:>7d} {e['ddp_bytes'] / 1e6:>8.2f}")
    print(f"time inside syncbn's collectives per step (rank 0): {result['syncbn_in_allreduce_ms']:.2f} ms")
    print(f"BN layers: {result['bn_layers']}; median C; syncbn all_gather of 3C+3 float64 per rank: "
          f"{result['allgather_latency_ms']:.3f} ms; all_reduce of 2C+1: {result['allreduce_latency_ms']:.3f} ms "
          f"(torch.distributed: {result['torch_allreduce_latency_ms']:.3f} ms); "
          f"bound local*1.05 + layers*(gather + reduce) = {result['bound_ms']:.2f} ms; "
          f"syncbn {'meets' if result['impls']['syncbn']['median_step_ms'] <= result['bound_ms'] else 'exceeds'} it")
    for name, g in result["graphs"].items():
        print(f"{name}: {g['graphs']} graph(s), {g['graph_breaks']} break(s) (dynamo explain, model without DDP)"
              + (f": {'; '.join(g['break_reasons'])}" if g["break_reasons"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
