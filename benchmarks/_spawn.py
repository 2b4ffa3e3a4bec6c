"""Run a benchmark function on W fresh processes that share a Gloo/NCCL rendezvous file."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
from typing import Any, Callable

__all__ = ["run_processes", "exit_together"]


def exit_together() -> None:
    """End a benchmark process once every rank is done, skipping torch's teardown.

    Tearing Gloo down while a peer still talks to it can abort the process ("terminate called
    without an active exception"), and freeing DDP's reducer after the group can deadlock on the
    GIL (torch 2.13); the results are already written, so leave without either.
    """
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(target: Callable[..., None], world: int, args: Any, timeout: float) -> Any:
    """Start ``target(rank, world, store_path, args, out_path)`` on ``world`` spawned processes.

    Rank 0 writes its result as JSON to ``out_path``; this returns it. A process that fails, or
    that is still running after ``timeout`` seconds, kills the others and raises ``RuntimeError``.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=target, args=(r, world, store_path, args, out_path)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        if any(p.is_alive() or p.exitcode != 0 for p in procs):
            for p in procs:
                p.kill()
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"world size {world}: a benchmark process failed or timed out (exit codes {codes})")
        with open(out_path) as f:
            return json.load(f)
