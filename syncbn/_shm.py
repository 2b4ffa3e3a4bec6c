"""Shared-memory all_reduce for ranks on one machine: part of the communication layer (comm.py).

A Gloo all_reduce of a few KB takes 0.4-0.7 ms between two processes of one VM (several TCP round
trips, each through a worker thread and a process wake-up); the statistics of every synchronized
layer need two of them per step. Ranks that share a machine can instead exchange the vectors
through one shared file mapping: each rank copies its vector into its own slot, publishes a round
number, spins until every rank of the group has published the same round, and sums the slots.
That takes tens of microseconds.

Layout of the mapping (int64 header, then float64 data)::

    header[r] = (round, pid, numel of buffer 0, numel of buffer 1) of rank r
    data[2][W][capacity]

Two buffers (data and sizes) alternate by round parity: a rank can only publish round k + 2
(reusing buffer k % 2) after every rank has published k + 1, which each does only after it
finished reading k.
Stores become visible in program order on x86-64 (TSO), which the publish step relies on: the
channel is only used there.

Failure behaviour matches a collective with a timeout: a peer whose process died is detected
within milliseconds (``RuntimeError``); a live peer that never arrives makes the call fail after
the group's timeout. Ranks that pass different sizes raise ``ValueError`` on every rank.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
import uuid
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShmChannel", "shm_supported"]

_HEADER = 4  # round, pid, numel of buffer 0, numel of buffer 1
_DEFAULT_TIMEOUT = timedelta(minutes=30)


def shm_supported() -> bool:
    """Whether this machine's memory model lets the channel publish with plain stores."""
    return platform.machine().lower() in ("x86_64", "amd64")


def _group_timeout(group: Optional[dist.ProcessGroup]) -> float:
    try:  # private API; a missing attribute only costs the default
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:
        return _DEFAULT_TIMEOUT.total_seconds()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited, not yet reaped zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmChannel:
    """A shared-memory all_reduce (sum) of float64 CPU vectors among the ranks of one group.

    Build it with :meth:`create`, a collective over ``group`` that returns None when the ranks
    do not share a machine (or a mapping cannot be shared); every rank gets the same answer.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], path: str, world: int, index: int, capacity: int):
        self.group = group
        self.world = world
        self.index = index
        self.capacity = capacity
        self.round = 0
        self.timeout = _group_timeout(group)
        # Spin this many polls (~2 us each) before yielding the CPU at every poll; with more ranks
        # than cores, spinning only delays the peer we wait for, so yield at once.
        self.spins_before_yield = 0 if world > _usable_cpus() else 200
        words = world * _HEADER + 2 * world * capacity
        raw = torch.from_file(path, shared=True, size=words, dtype=torch.int64)
        self.header = raw[: world * _HEADER].view(world, _HEADER)
        self.rounds = self.header[:, 0]
        self.data = raw[world * _HEADER :].view(torch.float64).view(2, world, capacity)
        self.header[index, 1] = os.getpid()

    @classmethod
    def create(cls, group: Optional[dist.ProcessGroup], capacity: int) -> Optional["ShmChannel"]:
        """Collectively map a new channel able to reduce ``capacity`` values; None if impossible."""
        world = dist.get_world_size(group)
        index = dist.get_rank(group)
        words = world * _HEADER + 2 * world * capacity
        path = ""
        if index == 0 and shm_supported():
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = os.path.join(folder, f"syncbn-{os.getpid()}-{uuid.uuid4().hex}")
            try:
                with open(path, "wb") as f:
                    f.truncate(8 * words)
            except OSError:
                path = ""
        try:
            # Rank 0 proposes a file; every rank checks it sees the same machine and can map it.
            proposal = [path, socket.gethostname()]
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast_object_list(proposal, src=src, group=group)
            path_seen, host = proposal
            channel = None
            if path_seen and host == socket.gethostname() and os.path.exists(path_seen):
                try:
                    channel = cls(group, path_seen, world, index, capacity)
                except Exception:
                    channel = None
            flag = torch.tensor([0 if channel is not None else 1], dtype=torch.int64)
            dist.all_reduce(flag, group=group)  # also: every rank has mapped the file before it goes
        finally:
            if path:
                # The mappings stay valid; nothing is left behind, also when a peer never came.
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        return channel if int(flag.item()) == 0 else None

    # Spinning on shared memory is not traceable: under torch.compile it runs eagerly, a graph
    # break like any collective.
    @torch.compiler.disable
    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` (float64, CPU, contiguous, numel <= capacity) over the group, in place."""
        n = tensor.numel()
        self.round += 1
        k = self.round
        parity = k % 2
        slots = self.data[parity, :, :n]
        slots[self.index].copy_(tensor)
        self.header[self.index, 2 + parity] = n
        self.rounds[self.index] = k  # publish: the slot's stores are visible before this one
        self._wait(k)
        sizes = self.header[:, 2 + parity]
        if bool((sizes != n).any()):
            raise ValueError(
                f"the ranks of the group passed vectors of different sizes {sizes.tolist()} to the "
                "same all_reduce: they are not in the same layer. Run with SYNCBN_DEBUG=1 to see "
                "which layer each rank is in."
            )
        torch.sum(slots, dim=0, out=tensor)
        return tensor

    def _wait(self, k: int) -> None:
        rounds = self.rounds
        spins = 0
        deadline = None
        while not bool((rounds >= k).all()):
            spins += 1
            if spins < self.spins_before_yield:
                continue
            # Waiting long: give the CPU away (more ranks than cores) and check on the peers.
            os.sched_yield()
            if spins % 256:
                continue
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            late = [r for r in range(self.world) if int(rounds[r]) < k]
            dead = [r for r in late if not _pid_alive(int(self.header[r, 1]))]
            if dead:
                raise RuntimeError(f"group rank(s) {dead} exited before joining")
            if now > deadline:
                raise RuntimeError(f"group rank(s) {late} did not join within the group's timeout ({self.timeout:.0f} s)")
