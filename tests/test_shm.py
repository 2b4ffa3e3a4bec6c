"""The shared-memory transport under adversity: each test is a way it used to fail.

1. a process group destroyed and created again in the same processes (other members, timeout);
2. ranks in different PID namespaces (containers sharing IPC and network);
3. a full /dev/shm (SIGBUS at the first write);
4. ranks passing different sizes on both sides of the channel's capacity;
5. a rank waiting for a straggler burning a core;
6. a rank killed during channel setup leaving its file in /dev/shm.

Tests that need processes in other namespaces start fresh processes running this file as a script
(``python -m tests.test_shm worker MODE RANK WORLD STORE OUT``): the slow tier. The fast tier covers
2 and 3 in the shared worker pool of tests/harness.py, with one rank made to see another PID
namespace or a full /dev/shm; a rank to be killed is a process forked from the harness's fork server.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import syncbn
from syncbn import _shm, comm

from .harness import COLLECTIVE_TIMEOUT_S, run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
_F64 = torch.float64
_is_root = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not (_is_root and shutil.which("unshare")), reason="needs root and unshare(1) to make namespaces"
)


def _channel(group=None):
    entry = comm._channels.get(id(comm._resolve(group)))
    return None if entry is None else entry[1]


def _mine(rank: int) -> torch.Tensor:
    return torch.full((4,), float(rank + 1), dtype=_F64)


# ---------------------------------------------------------------- 1. destroy / init again


def _reinit(rank, world_size, store_dir):
    # The pool's default group of 3 builds its channel.
    assert comm.all_reduce_sum(_mine(rank))[0].item() == 6.0
    assert _channel() is not None
    # 3 -> 2: torch's own destroy; ranks 0 and 1 form a new default group with a 5 s timeout.
    dist.destroy_process_group()
    if rank < 2:
        store = dist.FileStore(os.path.join(store_dir, "two"), 2)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=5))
        assert comm.all_reduce_sum(_mine(rank))[0].item() == 3.0
        assert _channel() is not None and _channel().world == 2 and _channel().timeout == 5
        syncbn.cleanup()  # syncbn's destroy also forgets the channels
        assert comm._channels == {}
    # 2 -> 3, with the pool's timeout again (the pool keeps using this group afterwards).
    store = dist.FileStore(os.path.join(store_dir, "three"), 3)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timeout)
    assert comm.all_reduce_sum(_mine(rank))[0].item() == 6.0
    assert _channel().world == 3 and _channel().timeout == COLLECTIVE_TIMEOUT_S
    # A sub-group of the new default group has its own channel, of its own members.
    sub = dist.new_group([0, 1])
    if rank < 2:
        assert comm.all_reduce_sum(_mine(rank), sub)[0].item() == 3.0
        assert _channel(sub).world == 2
    dist.barrier()


def test_new_default_group_gets_its_own_channel(tmp_path):
    """Re-initializing in the same processes (notebooks, sweeps, reused workers) sums over the new group."""
    run_on_ranks(3, _reinit, str(tmp_path), timeout=120)


# ---------------------------------------------------------------- 4. sizes across the capacity


def _sizes_across_capacity(rank, world_size):
    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=5))
    comm.all_reduce_sum(torch.ones(5, dtype=_F64), group)  # build the channel
    cap = _channel(group).capacity
    for big_rank in (0, 1):
        n = cap + 1 if rank == big_rank else 5
        sizes = f"{cap + 1}, 5" if big_rank == 0 else f"5, {cap + 1}"
        # A ValueError, not the RuntimeError of the group's timeout: read from the published sizes.
        with pytest.raises(ValueError, match=r"different sizes \[" + sizes):
            comm.all_reduce_sum(torch.ones(n, dtype=_F64), group)
    # Every rank saw the same sizes: the channel is still usable, and grows when all outgrow it.
    out = comm.all_reduce_sum(torch.full((cap + 1,), float(rank + 1), dtype=_F64), group)
    assert torch.equal(out, torch.full((cap + 1,), 3.0, dtype=_F64))
    assert _channel(group).capacity > cap
    # The very first call of a group, with different sizes (one beyond the default capacity).
    fresh = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=5))
    with pytest.raises(ValueError, match="different sizes"):
        comm.all_reduce_sum(torch.ones(20000 if rank == 0 else 5, dtype=_F64), fresh)
    assert comm.all_reduce_sum(_mine(rank), fresh)[0].item() == 3.0


def test_size_mismatch_across_capacity_raises_at_once_on_every_rank():
    run_on_ranks(2, _sizes_across_capacity, timeout=90)


# ---------------------------------------------------------------- 5. waiting does not burn a core
#
# Observed through _shm's waiting seam (_clock, _yield, _sleep), never through CPU or wall seconds:
# the back-off is the sequence of yields and sleeps the loop asks for.


class _SimulatedTime:
    """Stands in for ``_shm._clock/_yield/_sleep``: time moves only by what the waiting loop does.

    Each clock read costs ``poll_s`` (one poll of the flags), a yield ``yield_s``, a sleep exactly
    what it asked for. ``arrive`` (a callable) runs once the simulated time reaches ``arrive_at``.
    """

    def __init__(self, monkeypatch, poll_s=1e-5, yield_s=5e-5, arrive_at=None, arrive=None):
        self.now = 0.0
        self.start = self.now
        self.poll_s, self.yield_s = poll_s, yield_s
        self.arrive_at, self.arrive = arrive_at, arrive
        self.events: list[tuple[str, float, float]] = []  # (what, at, seconds asked)
        monkeypatch.setattr(_shm, "_clock", self.clock)
        monkeypatch.setattr(_shm, "_yield", self.yield_)
        monkeypatch.setattr(_shm, "_sleep", self.sleep)

    def _advance(self, seconds):
        self.now += seconds
        if self.arrive is not None and self.now - self.start >= self.arrive_at:
            self.arrive()
            self.arrive = None

    def clock(self):
        self._advance(self.poll_s)
        return self.now

    def yield_(self):
        self.events.append(("yield", self.now - self.start, 0.0))
        self._advance(self.yield_s)

    def sleep(self, seconds):
        assert seconds > 0, seconds
        self.events.append(("sleep", self.now - self.start, seconds))
        self._advance(seconds)


def _local_channel(world=2, timeout=30.0, peer_pid=None):
    """Rank 0 of a channel over plain memory; the test plays the other ranks by writing their slots."""
    raw = torch.zeros(_shm.ShmChannel.words(world, 8), dtype=torch.int64)
    channel = _shm.ShmChannel(raw, world, 0, 8, timeout=timeout)
    for r in range(1, world):
        channel.header[r, 1] = os.getpid() if peer_pid is None else peer_pid  # a live peer by default
    return channel


def _publish(channel, rank, k, value):
    parity = k % 2
    channel.data[parity, rank, :4] = value
    channel.header[rank, 2 + parity] = 4
    channel.rounds[rank] = k


def test_waiting_spins_then_yields_then_sleeps_growing_to_the_cap(monkeypatch):
    """A peer 50 ms late: spin ~_SPIN_S, yield until _SLEEP_AFTER_S, then sleeps doubling to _SLEEP_MAX_S."""
    channel = _local_channel()
    channel.spin_s = _shm._SPIN_S
    late_s = 0.05
    sim = _SimulatedTime(monkeypatch, arrive_at=late_s, arrive=lambda: _publish(channel, 1, 1, 2.0))
    out = torch.ones(4, dtype=_F64)
    assert channel.all_reduce_(out)
    assert out.tolist() == [3.0] * 4
    kinds = [e[0] for e in sim.events]
    first_yield = kinds.index("yield")
    first_sleep = kinds.index("sleep")
    # Spinning: no yield and no sleep during the first _SPIN_S.
    assert sim.events[0][1] >= _shm._SPIN_S, sim.events[:3]
    # Then yields only, until _SLEEP_AFTER_S; then sleeps only.
    assert first_yield == 0 and set(kinds[:first_sleep]) == {"yield"} and set(kinds[first_sleep:]) == {"sleep"}
    assert sim.events[first_sleep - 1][1] < _shm._SLEEP_AFTER_S <= sim.events[first_sleep][1]
    pauses = [e[2] for e in sim.events[first_sleep:]]
    expected = [min(_shm._SLEEP_MIN_S * 2**i, _shm._SLEEP_MAX_S) for i in range(len(pauses))]
    assert pauses == pytest.approx(expected, rel=1e-12), pauses[:8]
    assert max(pauses) == _shm._SLEEP_MAX_S
    # The peer is noticed at most one (capped) sleep after it published.
    assert sim.now - sim.start - late_s <= _shm._SLEEP_MAX_S + 2 * sim.poll_s


def test_waiting_with_more_ranks_than_cores_yields_at_once(monkeypatch):
    monkeypatch.setattr(_shm, "_usable_cpus", lambda: 1)
    channel = _local_channel(world=2)
    assert channel.spin_s == 0.0
    sim = _SimulatedTime(monkeypatch, arrive_at=1e-3, arrive=lambda: _publish(channel, 1, 1, 2.0))
    assert channel.all_reduce_(torch.ones(4, dtype=_F64))
    assert sim.events[0][0] == "yield" and sim.events[0][1] < 2 * sim.poll_s, sim.events[:3]


def test_waiting_for_a_live_peer_that_never_comes_raises_at_the_timeout(monkeypatch):
    channel = _local_channel(timeout=5.0)
    sim = _SimulatedTime(monkeypatch)
    with pytest.raises(RuntimeError, match=r"group rank\(s\) \[1\] did not join within the group's timeout \(5 s\)"):
        channel.all_reduce_(torch.ones(4, dtype=_F64))
    waited = sim.now - sim.start
    # Not before the timeout, and at the first peer check after it (simulated time).
    assert 5.0 < waited <= 5.0 + _shm._CHECK_EVERY_S + _shm._SLEEP_MAX_S + 2 * sim.poll_s, waited
    assert max(e[2] for e in sim.events) == _shm._SLEEP_MAX_S


def test_waiting_for_a_dead_peer_raises_at_the_first_check(monkeypatch):
    channel = _local_channel(peer_pid=2**22 + 12345)  # no such process here
    sim = _SimulatedTime(monkeypatch)
    with pytest.raises(RuntimeError, match=r"group rank\(s\) \[1\] exited before joining"):
        channel.all_reduce_(torch.ones(4, dtype=_F64))
    assert sim.now - sim.start <= _shm._CHECK_EVERY_S + _shm._SLEEP_MAX_S + 2 * sim.poll_s


def _wait_for_straggler(rank, world_size, marker):
    """Rank 1 calls only once rank 0 has reached the sleeping phase of its wait (no timing involved)."""
    group = dist.new_group(list(range(world_size)))
    comm.all_reduce_sum(_mine(rank), group)  # build the channel
    assert _channel(group) is not None
    dist.barrier(group)
    marker = Path(marker)
    asked: list[float] = []
    real_sleep = _shm._sleep
    if rank == 0:

        def recording_sleep(seconds):
            if not asked:
                marker.write_text("")
            asked.append(seconds)
            real_sleep(seconds)

        _shm._sleep = recording_sleep
    try:
        if rank == 1:
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert time.monotonic() < deadline, "rank 0 never reached the sleeping phase of its wait"
                time.sleep(0.01)
        out = comm.all_reduce_sum(_mine(rank), group)
    finally:
        _shm._sleep = real_sleep
    assert out[0].item() == 3.0
    return asked


def test_waiting_for_a_straggler_sleeps(tmp_path):
    """Two real ranks: the early one ends up sleeping in capped, growing steps, then gets the right sum."""
    asked, _ = run_on_ranks(2, _wait_for_straggler, str(tmp_path / "sleeping"), timeout=90)
    assert asked, "rank 0 never slept while waiting"
    assert asked[0] == _shm._SLEEP_MIN_S
    assert all(b == min(2 * a, _shm._SLEEP_MAX_S) for a, b in zip(asked, asked[1:])), asked[:10]


# ---------------------------------------------------------------- 6a. stale files are removed


def _build_fresh_channel(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    assert comm.all_reduce_sum(_mine(rank), group)[0].item() == 3.0
    return _channel(group) is not None


def test_files_of_dead_creators_are_removed():
    """A file left by a creator killed between creating and deleting it goes at the next setup."""
    folder = _shm.shm_dir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = _shm._pid_namespace()
    stale = Path(folder) / f"syncbn-{namespace}-{dead.pid}-12345-{'0' * 32}"
    alive = Path(folder) / f"syncbn-{namespace}-{os.getpid()}-{_shm._start_time(os.getpid())}-{'1' * 32}"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    try:
        assert all(run_on_ranks(2, _build_fresh_channel))
        assert not stale.exists(), "the file of a dead creator was left in place"
        assert alive.exists(), "the file of a live creator was removed"
    finally:
        for p in (stale, alive):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- 2, 3 in the pool (fast tier)


def _captured(caught) -> list[str]:
    return [str(w.message) for w in caught if "shared-memory" in str(w.message)]


def _other_pid_namespace(rank, world_size):
    """Rank 1 reports another PID namespace, as from its own container sharing IPC and network."""
    import warnings

    real = _shm._pid_namespace
    if rank == 1:
        _shm._pid_namespace = lambda: real() + 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            group = dist.new_group(list(range(world_size)))
            sums = [comm.all_reduce_sum(_mine(rank), group)[0].item() for _ in range(2)]
        return {"sums": sums, "channel": _channel(group) is not None, "warnings": _captured(caught)}
    finally:
        _shm._pid_namespace = real


def test_other_pid_namespace_falls_back_quietly():
    """Fast stand-in for test_ranks_in_different_pid_namespaces_fall_back."""
    for res in run_on_ranks(2, _other_pid_namespace):
        assert res == {"sums": [3.0, 3.0], "channel": False, "warnings": []}, res


def _no_room_in_dev_shm(rank, world_size):
    """Rank 0 (the one reserving the memory) finds /dev/shm full."""
    import errno
    import warnings

    real_fallocate, real_warned = os.posix_fallocate, _shm._warned

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _shm._warned = False  # an earlier test in this worker may have warned already
    if rank == 0:
        os.posix_fallocate = full
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            group = dist.new_group(list(range(world_size)))
            sums = [comm.all_reduce_sum(_mine(rank), group)[0].item() for _ in range(2)]
        mine = [f for f in os.listdir(_shm.shm_dir()) if f.startswith("syncbn-") and f"-{os.getpid()}-" in f]
        return {"sums": sums, "channel": _channel(group) is not None, "warnings": _captured(caught), "left": mine}
    finally:
        os.posix_fallocate, _shm._warned = real_fallocate, real_warned


def test_full_dev_shm_falls_back_with_one_warning_in_the_pool():
    """Fast stand-in for test_full_dev_shm_falls_back_with_one_warning (no SIGBUS, one warning)."""
    results = run_on_ranks(2, _no_room_in_dev_shm)
    for res in results:
        assert res["sums"] == [3.0, 3.0] and res["channel"] is False and res["left"] == [], res
    # One warning, on the rank that tried to reserve the memory, saying why.
    assert [len(r["warnings"]) for r in results] == [1, 0], results
    assert "could not reserve" in results[0]["warnings"][0] and _shm.shm_dir() in results[0]["warnings"][0]


# ---------------------------------------------------------------- fresh processes


def _worker(mode: str, rank: int, world: int, store: str, out: str) -> None:
    """One rank started as its own process (``python -m tests.test_shm worker ...``)."""
    import warnings

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("SHM_TEST_TIMEOUT", "20")))
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timeout)
    result: dict = {"rank": rank, "pid": os.getpid(), "sums": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "setup_kill":
            Path(out + ".calling").write_text("")
            if rank == 1:
                time.sleep(60)  # never joins: rank 0 is killed inside the channel's setup
            comm.all_reduce_sum(_mine(rank))
        for step in range(3):
            if mode == "late" and rank == 0 and step == 1:
                time.sleep(1.5)  # a healthy peer, late
            result["sums"].append(comm.all_reduce_sum(_mine(rank))[0].item())
        big = torch.full((100000,), float(rank + 1), dtype=_F64)  # beyond the default capacity
        result["sums"].append(comm.all_reduce_sum(big)[0].item())
    result["channel"] = _channel() is not None
    result["warnings"] = [str(w.message) for w in caught if "shared-memory" in str(w.message)]
    Path(out).write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # skip Gloo's teardown (see benchmarks/_spawn.py)


def _command(mode: str, rank: int, world: int, store: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tests.test_shm", "worker", mode, str(rank), str(world), str(store), str(out)]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    env.pop("SYNCBN_SHM", None)
    return env


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # every process started with start_new_session
                except ProcessLookupError:
                    p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _results(tmp_path: Path, world: int) -> list[dict]:
    return [json.loads((tmp_path / f"out{r}").read_text()) for r in range(world)]


@needs_root
@pytest.mark.slow
def test_ranks_in_different_pid_namespaces_fall_back(tmp_path):
    """Rank 1 in its own PID namespace (and /proc), like a container sharing the host's IPC."""
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            _command("late", 0, 2, store, tmp_path / "out0"), cwd=ROOT, env=_env(), start_new_session=True
        ),
        subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
             *_command("late", 1, 2, store, tmp_path / "out1")],
            cwd=ROOT,
            env=_env(),
            start_new_session=True,
        ),
    ]
    codes = _finish(procs, 90)
    assert codes == [0, 0], f"exit codes {codes}: a rank raised (see its stderr above)"
    for res in _results(tmp_path, 2):
        assert res["sums"] == [3.0, 3.0, 3.0, 3.0], res
        assert res["channel"] is False, "expected torch.distributed between PID namespaces"
        assert res["warnings"] == [], res


@needs_root
@pytest.mark.slow
def test_full_dev_shm_falls_back_with_one_warning(tmp_path):
    """Both ranks see a /dev/shm of 64 KiB (a mount namespace); the channel needs ~0.5 MB."""
    store = tmp_path / "store"
    script = (
        "mount -t tmpfs -o size=64k tmpfs /dev/shm || exit 99\n"
        f"{' '.join(_command('plain', 0, 2, store, tmp_path / 'out0'))} & a=$!\n"
        f"{' '.join(_command('plain', 1, 2, store, tmp_path / 'out1'))} & b=$!\n"
        "wait $a; ra=$?; wait $b; rb=$?; echo codes $ra $rb; [ $ra -eq 0 ] && [ $rb -eq 0 ]\n"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    codes = _finish([proc], 90)
    output = proc.stdout.read() if proc.stdout else ""
    assert codes == [0], f"{output.strip()} (-7 or 135 is SIGBUS)"
    results = _results(tmp_path, 2)
    for res in results:
        assert res["sums"] == [3.0, 3.0, 3.0, 3.0], res
        assert res["channel"] is False
    # One warning, on the rank that tried to reserve the memory, saying why.
    assert [len(r["warnings"]) for r in results] == [1, 0], results
    assert "could not reserve" in results[0]["warnings"][0] and "/dev/shm" in results[0]["warnings"][0]


def _forked_worker(mode: str, rank: int, world: int, store: str, out: str) -> None:
    os.environ.pop("SYNCBN_SHM", None)
    _worker(mode, rank, world, store, out)


def test_rank_killed_during_setup_leaves_no_file(tmp_path):
    """SIGTERM (what torchrun sends the other workers when one fails) while the channel is set up."""
    from .harness import mp_context

    ctx = mp_context()  # forked from a process that has imported torch: no start-up cost
    store = tmp_path / "store"
    procs = [
        ctx.Process(target=_forked_worker, args=("setup_kill", r, 2, str(store), str(tmp_path / f"out{r}")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    pid0 = procs[0].pid
    folder = _shm.shm_dir()

    def files():
        return [f for f in os.listdir(folder) if f.startswith("syncbn-") and f"-{pid0}-" in f]

    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "out0.calling").exists():
            assert procs[0].is_alive(), f"rank 0 exited before the setup (exit code {procs[0].exitcode})"
            assert time.monotonic() < deadline, "rank 0 never reached the setup"
            time.sleep(0.05)
        # Rank 0 is in the setup now (its peer never comes). A file made before every rank has
        # arrived would appear now; none may (the file is created after the rendezvous).
        for _ in range(30):
            assert files() == [], f"a file before every rank arrived: {files()}"
            time.sleep(0.01)
        procs[0].terminate()  # SIGTERM
        procs[0].join(timeout=30)
        assert procs[0].exitcode == -signal.SIGTERM, procs[0].exitcode
        assert files() == [], f"left in {folder}: {files()}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=30)
        for f in files():
            os.unlink(os.path.join(folder, f))


def test_bench_transport_smoke(tmp_path, forked_benchmarks):
    from benchmarks import bench_transport

    out = tmp_path / "transport.json"
    result = bench_transport.main(
        ["--calls", "5", "--straggler-reps", "2", "--delays-ms", "2", "--json", str(out), "--timeout", "120"]
    )
    assert json.loads(out.read_text())["tight_us"] == result["tight_us"]
    for policy in bench_transport.POLICIES:
        assert result["tight_us"][policy] > 0
        # Rank 0 returns after the straggler called (same machine, same clock).
        assert result["straggler"][f"{policy}@2.0"]["extra_us"] > 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])


def test_a_peer_that_has_not_written_its_pid_is_late_not_dead():
    """Right after create() a peer may not have written its pid yet (slot 0): never "exited".

    Seen under load in an elastic restart: rank 1 waited past the first peer check before rank 0
    had published its pid, read 0, and raised "group rank(s) [0] exited before joining".
    """
    from syncbn._shm import ShmChannel

    world, capacity = 2, 4
    raw = torch.zeros(ShmChannel.words(world, capacity), dtype=torch.int64)
    channel = ShmChannel(raw, world, 1, capacity, timeout=30.0)  # this process is rank 1
    assert int(channel.header[0, 1]) == 0 and int(channel.header[1, 1]) == os.getpid()
    channel._check_peers(1, expired=False)  # rank 0 late, pid unknown: no error
    channel.header[0, 1] = 2**22 + 12345  # a pid that does not exist here: now it is dead
    with pytest.raises(RuntimeError, match="exited before joining"):
        channel._check_peers(1, expired=False)


# ---------------------------------------------------------------- a channel first used in inference_mode


def _first_call_in_inference_mode(rank, world_size):
    # A new group: its channel is built by the first call, here under inference_mode (an
    # evaluation loop that runs a training-mode layer, as a precise-BN pass can).
    group = dist.new_group(list(range(world_size)))
    with torch.inference_mode():
        gathered = comm.all_gather(_mine(rank), group)
    assert gathered[:, 0].tolist() == [1.0, 2.0]
    assert _channel(group) is not None, "the channel should be built (shared memory is on in the pool)"
    # Later calls outside inference_mode write into the same channel in place.
    assert comm.all_gather(_mine(rank), group)[:, 0].tolist() == [1.0, 2.0]
    assert comm.all_reduce_sum(_mine(rank), group)[0].item() == 3.0
    bn = syncbn.SyncBatchNorm(4, process_group=group)
    bn(torch.randn(3, 4, dtype=_F64).float()).sum().backward()
    dist.destroy_process_group(group)


def test_channel_built_in_inference_mode_is_written_outside_it():
    run_on_ranks(2, _first_call_in_inference_mode)
