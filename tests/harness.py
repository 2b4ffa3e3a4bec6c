"""Multi-process test harness: pools of Gloo worker processes that live for the pytest session.

Starting a process costs seconds here (importing torch), so instead of spawning per test, one pool
of ``W`` workers per world size is started on first use and kept. ``run_on_ranks(W, fn, *args)``
sends ``fn`` (a module-level function, pickled by reference) to every worker, which calls
``fn(rank, world_size, *args)`` inside an initialized Gloo group and sends back the result or its
traceback. Rendezvous goes through a temporary ``FileStore`` (no ports, so parallel pytest-xdist
workers never collide). Any failure or timeout tears the pool down, so the next test gets a fresh,
consistent group: a failing test never poisons the others.

Sized to the machine: the workers are forked from one fork server per pytest process that has
imported torch once (:func:`mp_context`), so a pool starts in well under a second instead of
seconds per process; and at most :data:`MAX_POOL_PROCS` pool processes live at a time in one pytest
process (the least recently used pools are closed to make room), derived from the usable CPUs and
the number of pytest-xdist workers. Every wait has a deadline whose expiry fails the test.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from collections import Counter
from typing import Any, Callable, Optional

__all__ = [
    "run_on_ranks",
    "run_on_fresh_ranks",
    "DistributedTestError",
    "TEST_TIMEOUT_S",
    "COLLECTIVE_TIMEOUT_S",
    "MAX_POOL_PROCS",
    "mp_context",
    "pool_stats",
]

# Time one test may take on all ranks before the pool is killed and the test fails.
TEST_TIMEOUT_S = float(os.environ.get("SYNCBN_TEST_TIMEOUT", "120"))
# Gloo's own timeout for a collective some rank never joins.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("SYNCBN_COLLECTIVE_TIMEOUT", "60"))
_START_TIMEOUT_S = 120.0
# An idle worker checks this often that the process that started it still runs.
_IDLE_CHECK_S = 5.0


def _max_pool_procs() -> int:
    """Pool processes one pytest process may keep: twice the usable CPUs, shared among the xdist
    workers (``SYNCBN_TEST_MAX_POOL_PROCS`` overrides). A larger world size still runs, alone."""
    explicit = os.environ.get("SYNCBN_TEST_MAX_POOL_PROCS", "")
    if explicit:
        return max(1, int(explicit))
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    return max(2, (2 * cpus) // workers)


# At most this many live pool processes in this pytest process (2 cores, -n 2: 2 each, 4 in all).
MAX_POOL_PROCS = _max_pool_procs()
# The environment of the session, before any test's monkeypatching: the fork server (and so
# every pool worker) starts from it, whichever test happens to start it.
_SESSION_ENV = dict(os.environ)
_CTX: Optional[Any] = None
_STATS: Counter = Counter()


def mp_context() -> Any:
    """The multiprocessing context for test processes: a fork server that imported torch once
    (children start in a fraction of a second, each importing syncbn and the test module afresh),
    else spawn where there is no fork server. Functions run in its children must be importable."""
    global _CTX
    if _CTX is None:
        if "forkserver" in mp.get_all_start_methods():
            from multiprocessing import forkserver

            ctx = mp.get_context("forkserver")
            # torch._dynamo is most of `import syncbn` (its compile hooks); pytest every test module.
            ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "pytest"])
            saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(_SESSION_ENV)
            try:
                forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(saved)
        else:
            ctx = mp.get_context("spawn")
        _CTX = ctx
    return _CTX


def pool_stats() -> dict[str, int]:
    """Counts for this pytest process: ``started W=k`` pools, ``closed by cap``, ``closed after failure``."""
    return dict(_STATS)


class DistributedTestError(AssertionError):
    """A test function failed (or timed out) on one or more ranks; the message holds every traceback."""


def _worker_main(rank: int, world_size: int, store_path: str, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    results.put((rank, "ready", None))
    parent = mp.parent_process()  # the pytest process (not the fork server)
    while True:
        try:
            item = tasks.get(timeout=_IDLE_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # pytest was killed: do not linger
                os._exit(0)
            continue
        if item is None:
            break
        fn, args, kwargs = item
        try:
            out = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", out))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int) -> None:
        ctx = mp_context()
        _STATS[f"started W={world_size}"] += 1
        self.world_size = world_size
        self.tmpdir = tempfile.mkdtemp(prefix=f"syncbn-pool{world_size}-")
        store_path = os.path.join(self.tmpdir, "store")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, store_path, self.tasks[rank], self.results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self.procs:
            p.start()
        replies = self._collect(_START_TIMEOUT_S, "start")
        errors = [r for r in replies if r[1] != "ready"]
        if errors:
            self.close()
            raise DistributedTestError(self._format(errors, "failed to start"))

    def _collect(self, timeout: float, what: str) -> list[tuple[int, str, Any]]:
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple[int, str, Any]] = {}
        while len(replies) < self.world_size:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in replies]
            if left <= 0 or (dead and self.results.empty()):
                missing = sorted(set(range(self.world_size)) - set(replies))
                self.close()
                reason = "died" if dead and left > 0 else f"timed out after {timeout:.0f}s"
                raise DistributedTestError(
                    f"ranks {missing} of {self.world_size} {reason} during {what}; replies from the "
                    f"others:\n" + self._format(list(replies.values()), "")
                )
            try:
                reply = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            replies[reply[0]] = reply
        return [replies[r] for r in range(self.world_size)]

    @staticmethod
    def _format(replies: list[tuple[int, str, Any]], headline: str) -> str:
        parts = [headline] if headline else []
        for rank, status, payload in replies:
            if status == "error":
                parts.append(f"--- rank {rank} ---\n{payload}")
            else:
                parts.append(f"--- rank {rank}: {status} ---")
        return "\n".join(parts)

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        try:
            # The queue pickles in a background thread, where a failure only prints: the ranks
            # would then wait for a task that never comes. Fail here instead.
            pickle.dumps((fn, args, kwargs))
        except Exception as err:
            raise TypeError(
                f"run_on_ranks({fn.__qualname__}, ...): the function and its arguments must pickle "
                f"(module-level functions, no lambdas): {err}"
            ) from err
        for q in self.tasks:
            q.put((fn, args, kwargs))
        replies = self._collect(timeout, fn.__qualname__)
        if any(status == "error" for _, status, _ in replies):
            # Ranks that raised may have left peers mid-collective: start over with a fresh group.
            _STATS["closed after failure"] += 1
            self.close()
            raise DistributedTestError(
                self._format(replies, f"{fn.__qualname__} failed on world size {self.world_size}")
            )
        return [payload for _, _, payload in replies]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put_nowait(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if _POOLS.get(self.world_size) is self:
            del _POOLS[self.world_size]


# Live pools by world size, least recently used first.
_POOLS: dict[int, _Pool] = {}


def _make_room(world_size: int) -> None:
    """Close the least recently used pools while a new pool of ``world_size`` would exceed the cap."""
    while _POOLS and sum(_POOLS) + world_size > MAX_POOL_PROCS:
        _STATS["closed by cap"] += 1
        next(iter(_POOLS.values())).close()


def _pool(world_size: int) -> _Pool:
    pool = _POOLS.pop(world_size, None)
    if pool is not None and not pool.alive():  # a worker died between tests (a test killed it)
        _STATS["closed after failure"] += 1
        pool.close()
        pool = None
    if pool is None:
        _make_room(world_size)
        pool = _Pool(world_size)
    _POOLS[world_size] = pool  # most recently used last
    return pool


def run_on_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = TEST_TIMEOUT_S, **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank of a Gloo group of ``world_size``.

    ``fn`` must be importable (a module-level function). Returns the per-rank results in rank
    order; raises :class:`DistributedTestError` with every failing rank's traceback.
    """
    return _pool(world_size).run(fn, args, kwargs, timeout)


def run_on_fresh_ranks(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = TEST_TIMEOUT_S, **kwargs: Any
) -> list[Any]:
    """:func:`run_on_ranks` on a group of new processes, closed afterwards (about a second more).

    For tests whose outcome could depend on what earlier tests left in a shared worker (module
    caches, torch._dynamo state, a first call that fills a cache eagerly): they start from fresh
    imports, as a user's first step does.
    """
    _make_room(world_size)
    pool = _Pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout)
    finally:
        pool.close()


@atexit.register
def _shutdown() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
