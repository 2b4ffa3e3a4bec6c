"""Latency of syncbn's all_reduce between ranks of one machine: shared memory (spin vs back-off) vs Gloo.

Two measurements, each over W spawned CPU processes (one thread each), the three transports
interleaved call by call, in an order rotated every round, so machine drift hits all alike:

- **tight loop**: every rank calls all_reduce_sum on a (2C+1) float64 vector back to back (a
  synchronized layer's forward statistics); median wall time per call on rank 0;
- **straggler**: the last rank sleeps D ms before it calls; rank 0 is already waiting. Reported:
  the *extra latency*, from the moment the straggler calls until rank 0 returns (the clocks agree:
  one machine, CLOCK_MONOTONIC), and the CPU rank 0's thread burns while waiting, in % of the wait.

"spin" is the policy before back-off: spin, then ``sched_yield`` at every poll for as long as the
wait lasts; "back-off" (the default) spins ~0.1 ms, yields until 2 ms, then sleeps in steps that
double from 50 us up to 0.5 ms.

Usage::

    python benchmarks/bench_transport.py                    # W=2, C=256, 400 calls, D = 1, 5, 20, 200 ms
    python benchmarks/bench_transport.py --world 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

try:
    from ._spawn import exit_together, run_processes
except ImportError:  # run as a script: python benchmarks/bench_transport.py
    from _spawn import exit_together, run_processes

__all__ = ["main", "POLICIES"]

POLICIES = ("spin", "back-off", "gloo")


def _use(policy: str) -> None:
    from syncbn import _shm, comm

    comm.set_shared_memory(policy != "gloo")
    _shm._SLEEP_AFTER_S = float("inf") if policy == "spin" else 2e-3


def _worker(rank: int, world: int, store_path: str, args: dict, out_path: str) -> None:
    from syncbn import comm

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    x = torch.randn(2 * args["channels"] + 1, dtype=torch.float64)
    for policy in POLICIES:  # build the channel, warm Gloo up
        _use(policy)
        for _ in range(20):
            comm.all_reduce_sum(x.clone())
    tight: dict[str, list[float]] = {p: [] for p in POLICIES}
    for i in range(args["calls"]):
        for policy in POLICIES[i % 3 :] + POLICIES[: i % 3]:  # rotated: no transport always follows Gloo
            _use(policy)
            y = x.clone()
            t0 = time.perf_counter()
            comm.all_reduce_sum(y)
            tight[policy].append(time.perf_counter() - t0)
    late: dict[str, dict[str, list[float]]] = {}
    stamp = torch.zeros(1, dtype=torch.float64)
    for delay in args["delays_ms"]:
        for policy in POLICIES:
            late[f"{policy}@{delay}"] = {"extra": [], "cpu": []}
        for i in range(args["straggler_reps"]):
            for policy in POLICIES[i % 3 :] + POLICIES[: i % 3]:
                _use(policy)
                dist.barrier()
                y = x.clone()
                if rank == world - 1:
                    time.sleep(delay / 1000)
                called = time.monotonic()
                cpu = time.thread_time()
                comm.all_reduce_sum(y)
                returned, cpu = time.monotonic(), time.thread_time() - cpu
                # The straggler's call time, to every rank (outside the timed part).
                stamp.fill_(called if rank == world - 1 else 0.0)
                dist.all_reduce(stamp)
                if rank == 0:
                    row = late[f"{policy}@{delay}"]
                    row["extra"].append(returned - float(stamp.item()))
                    row["cpu"].append(cpu / max(returned - called, 1e-9))
    if rank == 0:
        result = {
            "tight_us": {p: 1e6 * statistics.median(v) for p, v in tight.items()},
            "straggler": {
                k: {"extra_us": 1e6 * statistics.median(v["extra"]), "cpu_pct": 100 * statistics.median(v["cpu"])}
                for k, v in late.items()
            },
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
    exit_together()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes (default 2)")
    p.add_argument("--channels", type=int, default=256, help="C: the vector has 2C+1 float64 values")
    p.add_argument("--calls", type=int, default=400, help="tight-loop calls per transport")
    p.add_argument("--delays-ms", type=float, nargs="+", default=[1.0, 5.0, 20.0, 200.0])
    p.add_argument("--straggler-reps", type=int, default=15, help="straggler calls per transport and delay")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error(f"expected --world >= 2, got {args.world}")
    conf = {"channels": args.channels, "calls": args.calls, "delays_ms": args.delays_ms,
            "straggler_reps": args.straggler_reps}
    result = run_processes(_worker, args.world, conf, args.timeout)
    result.update(world=args.world, channels=args.channels, machine=platform.machine(),
                  cpus=os.cpu_count())
    print(f"all_reduce_sum of {2 * args.channels + 1} float64 values, {args.world} processes "
          f"({result['cpus']} CPUs); medians, transports interleaved")
    print(f"{'transport':<10} {'tight loop':>12}" + "".join(
        f" {'late ' + format(d, 'g') + ' ms: extra':>22} {'CPU':>6}" for d in args.delays_ms))
    for policy in POLICIES:
        line = f"{policy:<10} {result['tight_us'][policy]:>9.1f} us"
        for d in args.delays_ms:
            row = result["straggler"][f"{policy}@{d}"]
            line += f" {row['extra_us']:>19.1f} us {row['cpu_pct']:>5.0f}%"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
