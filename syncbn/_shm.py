"""Shared-memory all_reduce for ranks on one machine: part of the communication layer (comm.py).

A Gloo all_reduce of a few KB takes 0.4-0.7 ms between two processes of one VM (several TCP round
trips, each through a worker thread and a process wake-up); the statistics of every synchronized
layer need two of them per step. Ranks that share a machine can instead exchange the vectors
through one shared file mapping: each rank copies its vector into its own slot, publishes a round
number, waits until every rank of the group has published the same round, and sums the slots.
That takes tens of microseconds.

Layout of the mapping (int64 words, then float64 data)::

    token[2]                     random words rank 0 writes, every rank reads back
    header[r] = (round, pid, numel of buffer 0, numel of buffer 1) of rank r
    data[2][W][capacity]

Two buffers (data and sizes) alternate by round parity: a rank can only publish round k + 2
(reusing buffer k % 2) after every rank has published k + 1, which each does only after it
finished reading k. Stores become visible in program order on x86-64 (TSO), which the publish step
relies on: the channel is only used there.

A channel is built only when it is provably shared (:meth:`ShmChannel.create`): every rank has
the same host name and the same PID namespace, and reads back the random token rank 0 wrote into
the file, so containers with their own ``/dev/shm`` or their own PIDs fall back to
``torch.distributed``. Rank 0 reserves the file's memory with ``posix_fallocate`` (a sparse file
on a full ``/dev/shm`` would kill every rank with SIGBUS at the first write) and deletes the file
as soon as every rank has mapped it. The file is created only once every rank has arrived, and its
name holds the creator's PID namespace, PID and start time, so a file left by a creator killed
within that window is deleted by the next channel built in that namespace.

Failure behaviour matches a collective with a timeout: a peer whose process died is detected
within tens of milliseconds (``RuntimeError``); a live peer that never arrives makes the call fail
after the group's timeout. Every rank publishes its vector's size with its round, so ranks that
pass different sizes raise ``ValueError`` on every rank, also when some of the sizes exceed the
channel's capacity; a size every rank exceeds together grows the channel.

Waiting spins for the first ~0.1 ms (the common case: the peers are there), then yields the CPU
until 2 ms have passed, then sleeps in growing steps of up to 0.5 ms: a rank waiting for a
straggler 200 ms late costs about a tenth of a core instead of a whole one, and notices the
straggler within one sleep step plus the scheduler's wake-up, about a millisecond (measured in
``benchmarks/bench_transport.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import secrets
import socket
import tempfile
import time
import uuid
import warnings
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _compat, _config

__all__ = ["ShmChannel", "shm_supported", "shm_dir"]

_TOKEN = 2  # random int64 words at the start of the mapping
_HEADER = 4  # round, pid, numel of buffer 0, numel of buffer 1
_DEFAULT_TIMEOUT = timedelta(minutes=30)
_PREFIX = "syncbn-"
# syncbn-<pid namespace inode>-<creator pid>-<creator start time in clock ticks>-<random>
_NAME = re.compile(r"^syncbn-(\d+)-(\d+)-(\d+)-[0-9a-f]{32}$")

# Waiting: spin this long, then yield the CPU at every poll until _SLEEP_AFTER_S, then sleep in
# steps doubling from _SLEEP_MIN_S to _SLEEP_MAX_S (the bound on the extra latency of a late peer).
# Module attributes so that benchmarks/bench_transport.py can compare the policies.
_SPIN_S = 1e-4
_SLEEP_AFTER_S = 2e-3
_SLEEP_MIN_S = 5e-5
_SLEEP_MAX_S = 5e-4
# How often a waiting rank checks for dead peers and the timeout.
_CHECK_EVERY_S = 0.01
# The waiting loop's clock, CPU yield and sleep, looked up at every call: a private seam through
# which tests observe the back-off (the sequence of yields and sleeps it asks for) on a simulated
# clock instead of measuring time. Production code never changes them.
_clock = time.monotonic
_yield = os.sched_yield
_sleep = time.sleep

_warned = False


def shm_supported() -> bool:
    """Whether this machine's memory model lets the channel publish with plain stores."""
    return platform.machine().lower() in ("x86_64", "amd64")


def shm_dir() -> str:
    """Folder of the (short-lived) mapping files: ``$SYNCBN_SHM_DIR``, else ``/dev/shm``, else the temp dir."""
    folder = _config.shm_dir()
    if folder:
        return folder
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _group_timeout(group: Optional[dist.ProcessGroup]) -> float:
    """Seconds a rank waits for its peers: ``$SYNCBN_TIMEOUT``, else the group's own timeout."""
    env = _config.timeout()
    if env is not None:
        return env.total_seconds()
    own = _compat.group_timeout(group)
    return (own or _DEFAULT_TIMEOUT).total_seconds()


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pid_namespace() -> int:
    """Inode of this process's PID namespace (0 when unknown: then no channel is built)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _own_proc() -> bool:
    """Whether /proc shows this PID namespace (it may be mounted from another one)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _start_time(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot (-1 if gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return -1 if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return -1


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this PID namespace still runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)  # asks this process's own PID namespace
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An exited peer stays a zombie until its launcher reaps it.
    return not _own_proc() or _start_time(pid) >= 0


def _sweep(folder: str, namespace: int) -> None:
    """Delete mapping files whose creator, in this PID namespace, is gone (killed inside setup)."""
    if not _own_proc():  # pids in /proc would not be ours: leave every file alone
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) != namespace:
            continue
        pid, start = int(m.group(2)), int(m.group(3))
        if _start_time(pid) != start:  # the creator exited (or its pid now belongs to another process)
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class ShmChannel:
    """A shared-memory all_reduce (sum) of float64 CPU vectors among the ranks of one group.

    Build it with :meth:`create`, a collective over ``group`` that returns None when the ranks
    cannot provably share memory; every rank gets the same answer. The channel keeps no reference
    to the group (comm.py ties its lifetime to the group's).
    """

    def __init__(self, raw: Tensor, world: int, index: int, capacity: int, timeout: float) -> None:
        self.world = world
        self.index = index
        self.capacity = capacity
        self.round = 0
        self.timeout = timeout
        # More ranks than cores: spinning only delays the peer we wait for, so yield at once.
        self.spin_s = 0.0 if world > _usable_cpus() else _SPIN_S
        self.raw = raw  # owns the mapping the views below (the ctypes one too) look into
        self.header = raw[_TOKEN : _TOKEN + world * _HEADER].view(world, _HEADER)
        self.rounds = self.header[:, 0]
        self.data = raw[_TOKEN + world * _HEADER :].view(torch.float64).view(2, world, capacity)
        # The same header words as plain machine integers: reading and writing one through ctypes
        # is a load or a store, about 0.1 us, where a tensor element costs several operators.
        self._words = (ctypes.c_int64 * (world * _HEADER)).from_address(self.header.data_ptr())
        # Per (parity, numel): the (W, numel) slots and this rank's slot (bounded, cleared when full).
        self._views: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.header[index, 1] = os.getpid()

    @staticmethod
    def words(world: int, capacity: int) -> int:
        """Size of the mapping in int64 words."""
        return _TOKEN + world * _HEADER + 2 * world * capacity

    @classmethod
    def create(cls, group: Optional[dist.ProcessGroup], capacity: int, numel: int) -> Optional["ShmChannel"]:
        """Collectively map a new channel for vectors of up to ``max(capacity, numel on any rank)``.

        Returns None on every rank when the ranks do not share a host name, a PID namespace and
        the file (say two containers), or when the memory cannot be reserved (then with one
        ``RuntimeWarning`` that says why).
        """
        world = dist.get_world_size(group)
        index = dist.get_rank(group)
        namespace = _pid_namespace()
        me = (socket.gethostname(), namespace, numel)
        everyone: list = [None] * world
        # Also the rendezvous: nothing is created in /dev/shm before every rank has arrived.
        dist.all_gather_object(everyone, me, group=group)
        capacity = max([capacity] + [int(e[2]) for e in everyone])
        shared = shm_supported() and namespace != 0 and all(e[:2] == me[:2] for e in everyone)
        words = cls.words(world, capacity)
        path, token, problem = "", [0, 0], ""
        try:
            if index == 0 and shared:
                path, token, problem = cls._make_file(words, namespace)
            proposal = [path, token, problem]
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast_object_list(proposal, src=src, group=group)
            path_seen, token_seen, problem = proposal
            raw, local_problem = None, ""
            if path_seen:
                try:
                    raw = torch.from_file(path_seen, shared=True, size=words, dtype=torch.int64)
                    if raw[:_TOKEN].tolist() != list(token_seen):
                        raw = None  # same name, another file: this rank has its own /dev/shm
                except FileNotFoundError:
                    raw = None  # not this machine's file (another mount namespace)
                except (OSError, RuntimeError) as err:
                    raw, local_problem = None, f"could not map {path_seen} on rank {index}: {err}"
            ok = torch.tensor([0 if raw is not None else 1], dtype=torch.int64)
            # Also: every rank has mapped the file before rank 0 deletes it.
            dist.all_reduce(ok, group=group)
        finally:
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        # Said once, by the rank that met the problem (rank 0 reserves the memory).
        problem = local_problem or (problem if index == 0 else "")
        if problem:
            _warn_once(
                f"syncbn: the shared-memory transport is off for this process group ({problem}); "
                "its statistics go through torch.distributed instead (correct, slower). Give "
                "/dev/shm more room (e.g. docker run --shm-size=1g) or set SYNCBN_SHM=0 to skip "
                "this attempt."
            )
        if int(ok.item()) != 0 or raw is None:
            return None
        return cls(raw, world, index, capacity, _group_timeout(group))

    @staticmethod
    def _make_file(words: int, namespace: int) -> tuple[str, list[int], str]:
        """Rank 0: create, reserve and sign the file; returns (path, token, problem)."""
        folder = shm_dir()
        _sweep(folder, namespace)
        pid = os.getpid()
        name = f"{_PREFIX}{namespace}-{pid}-{_start_time(pid)}-{uuid.uuid4().hex}"
        path = os.path.join(folder, name)
        token = [secrets.randbits(62) + 1, secrets.randbits(62) + 1]
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            return "", [0, 0], f"could not create a file in {folder}: {err}"
        try:
            try:
                # Reserve every page now: on a full tmpfs a sparse file maps fine and the first
                # write to a missing page kills the process with SIGBUS.
                os.posix_fallocate(fd, 0, 8 * words)
            except OSError as err:
                os.unlink(path)
                return "", [0, 0], f"could not reserve {8 * words} bytes in {folder}: {err.strerror or err}"
            os.pwrite(fd, torch.tensor(token, dtype=torch.int64).numpy().tobytes(), 0)
        finally:
            os.close(fd)
        return path, token, ""

    # Never traced: under torch.compile the collectives run inside opaque custom operators (comm.py).
    def all_reduce_(self, tensor: Tensor) -> bool:
        """Sum ``tensor`` (float64, CPU, contiguous) over the group, in place.

        Returns False, with ``tensor`` untouched, when every rank passed the same size and it
        exceeds the capacity (build a larger channel and call again). Raises ``ValueError`` on
        every rank when the ranks passed different sizes; the channel stays usable.
        """
        slots = self._exchange(tensor, "all_reduce")
        if slots is None:
            return False
        torch.sum(slots, dim=0, out=tensor)
        return True

    def all_gather(self, tensor: Tensor) -> Optional[Tensor]:
        """Every rank's ``tensor`` (float64, CPU, contiguous, ``L`` values) as a new ``(W, L)`` tensor.

        Row ``r`` is group rank ``r``'s vector. Returns None when every rank passed the same size
        and it exceeds the capacity; raises ``ValueError`` on every rank when the sizes differ, as
        :meth:`all_reduce_`.
        """
        slots = self._exchange(tensor, "all_gather")
        return None if slots is None else slots.clone()

    def _slots(self, parity: int, n: int) -> tuple[Tensor, Tensor]:
        views = self._views.get((parity, n))
        if views is None:
            if len(self._views) >= 64:
                self._views.clear()
            slots = self.data[parity, :, :n]
            views = self._views[(parity, n)] = (slots, slots[self.index])
        return views

    def _exchange(self, tensor: Tensor, what: str) -> Optional[Tensor]:
        """Publish ``tensor`` in this rank's slot, wait for every rank; the ``(W, n)`` slots, or None if too big."""
        n = tensor.numel()
        fits = n <= self.capacity
        self.round += 1
        k = self.round
        parity = k % 2
        words = self._words
        mine = self.index * _HEADER
        slots = None
        if fits:
            slots, slot = self._slots(parity, n)
            slot.copy_(tensor if tensor.dim() == 1 else tensor.reshape(-1))
        words[mine + 2 + parity] = n
        words[mine] = k  # publish: the slot's stores are visible before this one
        self._wait(k)
        # Decided from what every rank published, so every rank decides the same.
        sizes = words[2 + parity : self.world * _HEADER : _HEADER]
        if any(size != n for size in sizes):
            raise ValueError(
                f"the ranks of the group passed vectors of different sizes {sizes} to the "
                f"same {what}: they are not in the same layer. Run with SYNCBN_DEBUG=1 to see "
                "which layer each rank is in."
            )
        return slots

    def _ready(self, k: int) -> bool:
        return min(self._words[0 : self.world * _HEADER : _HEADER]) >= k

    def _wait(self, k: int) -> None:
        if self._ready(k):
            return
        start = _clock()
        now = start
        spin_until = start + self.spin_s
        while now < spin_until:
            if self._ready(k):
                return
            now = _clock()
        # Waiting long: give the CPU away, then sleep, and check on the peers now and then.
        sleep_from = start + _SLEEP_AFTER_S
        deadline = start + self.timeout
        next_check = start + _CHECK_EVERY_S
        pause = _SLEEP_MIN_S
        while not self._ready(k):
            if now < sleep_from:
                _yield()
            else:
                _sleep(pause)
                pause = min(2 * pause, _SLEEP_MAX_S)
            now = _clock()
            if now >= next_check:
                next_check = now + _CHECK_EVERY_S
                self._check_peers(k, now > deadline)

    def _check_peers(self, k: int, expired: bool) -> None:
        late = [r for r in range(self.world) if int(self.rounds[r]) < k]
        if not late:
            return
        # create() only builds channels whose ranks share this PID namespace: their pids mean here
        # what they meant there.
        # A pid of 0 is a peer that has not written its pid yet (it does so right after create(),
        # with no barrier after it): late, not dead.
        pids = [int(self.header[r, 1]) for r in late]
        dead = [r for r, pid in zip(late, pids) if pid != 0 and not _pid_alive(pid)]
        if dead:
            raise RuntimeError(f"group rank(s) {dead} exited before joining")
        if expired:
            raise RuntimeError(
                f"group rank(s) {late} did not join within the group's timeout ({self.timeout:.0f} s)"
            )
