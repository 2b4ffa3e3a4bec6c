"""Reliability: ranks that go different ways fail fast and clearly; bad values propagate, never hang.

Every test that could hang runs its synchronized layers on a fresh sub-group with its own Gloo
timeout (``_group``), so a regression costs seconds and leaves the harness's default group (and its
worker pool) usable. Nothing here measures time: a test whose ranks must fail says so by the error
they raise, and the harness's timeout (a generous upper bound) turns a hang into a failure. A short
group timeout is used only where its expiry is the expected outcome (a peer that never joins);
everywhere else the group's timeout is generous, so a slow, loaded machine cannot make it expire.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn import comm

from .harness import mp_context, run_on_ranks
from .parity import assert_close

# A group timeout the test expects to expire (a peer that never joins).
EXPIRING_TIMEOUT_S = 3.0
# A group timeout that must not expire (every rank takes part): far above any load-induced lag,
# below the harness's timeout so that a hang still comes back as a traceback.
GENEROUS_TIMEOUT_S = 30.0


def _group(world_size: int, seconds: float = GENEROUS_TIMEOUT_S):
    """A new group of every rank with its own collective timeout (every rank must call this)."""
    return dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=seconds))


def _outcome(fn, *args, **kwargs) -> dict:
    """Run ``fn``; return what it raised (type and message), or None and "" when it returned."""
    try:
        fn(*args, **kwargs)
        return {"raised": None, "message": ""}
    except Exception as err:  # noqa: BLE001 - the test inspects whatever came
        return {"raised": type(err).__name__, "message": str(err)}


def _is_timeout(message: str) -> bool:
    """Whether the error came from a group's timeout: Gloo's or the shared-memory channel's words."""
    return "Timed out" in message or "did not join within the group's timeout" in message


# ------------------------------------------------------------------------------------------------
# Consistency mode


def test_debug_flag_follows_set_debug_and_environment(monkeypatch):
    try:
        monkeypatch.delenv("SYNCBN_DEBUG", raising=False)
        syncbn.set_debug(None)
        assert not syncbn._consistency.debug_enabled(), "consistency mode must be off by default"
        monkeypatch.setenv("SYNCBN_DEBUG", "1")
        syncbn.set_debug(None)
        assert syncbn._consistency.debug_enabled(), "SYNCBN_DEBUG=1 must turn consistency mode on"
        syncbn.set_debug(False)
        assert not syncbn._consistency.debug_enabled(), "set_debug(False) overrides the environment"
        monkeypatch.setenv("SYNCBN_DEBUG", "0")
        syncbn.set_debug(None)
        assert not syncbn._consistency.debug_enabled()
        syncbn.set_debug(True)
        assert syncbn._consistency.debug_enabled()
    finally:
        monkeypatch.delenv("SYNCBN_DEBUG", raising=False)
        syncbn.set_debug(None)


def _mismatch_rank(rank, world_size, case):
    """Each rank calls a synchronized layer that disagrees with its peer's in one way."""
    group = _group(world_size)
    syncbn.set_debug(True)
    try:
        torch.manual_seed(rank)
        if case == "layer":
            # Same channel count and dtype, different layers: without the check the stats of two
            # unrelated layers would be silently averaged together.
            x = torch.randn(3, 4, 5)
            if rank == 0:
                call = lambda: syncbn.SyncBatchNorm(4, process_group=group)(x)  # noqa: E731
            else:
                call = lambda: syncbn.sync_batch_norm(x, None, None, training=True, process_group=group)  # noqa: E731
            return _outcome(call)
        if case == "skipped":
            # Rank 1 skips the second call of bn1 (a rank-dependent branch): without the check its
            # bn2 would pair with rank 0's bn1 and rank 0's last call would wait forever.
            bn1 = syncbn.SyncBatchNorm(4, process_group=group)
            bn2 = syncbn.SyncBatchNorm(4, process_group=group)
            x = torch.randn(3, 4)

            def calls():
                bn1(x)
                if rank == 0:
                    bn1(x)
                bn2(x)
                bn2(x)

            return _outcome(calls)
        if case == "swapped":
            # Two converted layers of the same class and width, called in a different order on
            # each rank: the recorded module paths tell them apart.
            model = syncbn.convert_sync_bn(
                torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(4), "b": torch.nn.BatchNorm1d(4)}),
                process_group=group,
            )
            x = torch.randn(3, 4)
            order = ["a", "b"] if rank == 0 else ["b", "a"]
            return _outcome(lambda: [model[k](x) for k in order])
        if case == "channels":
            # Different packed sizes: without the check Gloo aborts the process.
            c = 4 if rank == 0 else 6
            return _outcome(syncbn.SyncBatchNorm(c, process_group=group), torch.randn(3, c, 5))
        if case == "dtype":
            dtype = torch.float32 if rank == 0 else torch.float64
            layer = syncbn.SyncBatchNorm(4, process_group=group, dtype=dtype)
            return _outcome(layer, torch.randn(3, 4, 5, dtype=dtype))
        raise AssertionError(case)
    finally:
        syncbn.set_debug(None)


@pytest.mark.parametrize(
    "case,differ,rows",
    [
        ("layer", "layer", ["rank 0: SyncBatchNorm(4) call 1, 4 channels, torch.float32",
                            "rank 1: syncbn.sync_batch_norm call 1, 4 channels, torch.float32"]),
        ("skipped", "call count", ["rank 0: SyncBatchNorm(4) call 2", "rank 1: SyncBatchNorm(4) call 1"]),
        ("swapped", "layer", ["rank 0: SyncBatchNorm(4) at 'a' call 1", "rank 1: SyncBatchNorm(4) at 'b' call 1"]),
        ("channels", "channel count", ["rank 0: SyncBatchNorm(4) call 1, 4 channels",
                                       "rank 1: SyncBatchNorm(6) call 1, 6 channels"]),
        ("dtype", "dtype", ["rank 0: SyncBatchNorm(4) call 1, 4 channels, torch.float32",
                            "rank 1: SyncBatchNorm(4) call 1, 4 channels, torch.float64"]),
    ],
)
def test_consistency_mode_raises_on_every_rank(case, differ, rows):
    results = run_on_ranks(2, _mismatch_rank, case, timeout=60)
    for rank, res in enumerate(results):
        assert res["raised"] == "ValueError", f"rank {rank}: expected ValueError, got {res}"
        msg = res["message"]
        headline = msg.split("\n", 1)[0]
        assert f"consistency check failed on rank {rank}" in headline and differ in headline, msg
        for row in rows:
            assert row in msg, f"rank {rank}: {row!r} missing from:\n{msg}"
        assert "Make every rank run the same" in msg, msg
    tails = [res["message"].split("\n", 1)[1] for res in results]
    assert tails[0] == tails[1], "every rank must report the same values"


def _count_collectives(rank, world_size, debug):
    """Number of all_gather / all_reduce calls of three training forwards of a model with 2 layers."""
    calls = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    syncbn.set_debug(debug)
    # Count torch.distributed calls: keep the statistics on Gloo rather than shared memory.
    syncbn.comm.set_shared_memory(False)
    model = nn.Sequential(syncbn.SyncBatchNorm(4), syncbn.SyncBatchNorm(4))
    try:
        for name in calls:
            setattr(dist, name, counting(name))
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(2, 4, 3))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        syncbn.set_debug(None)
        syncbn.comm.set_shared_memory(True)
    return calls


def test_consistency_mode_is_one_small_collective_and_off_by_default():
    off, on = run_on_ranks(2, _count_collectives, False)[0], run_on_ranks(2, _count_collectives, True)[0]
    # The statistics themselves are one all_gather per synchronized forward (no backward here).
    assert off == {"all_gather": 6, "all_reduce": 0}, f"debug off must add nothing: {off}"
    assert on == {"all_gather": 12, "all_reduce": 0}, f"debug on: one more all_gather per synced call: {on}"


def _consistent_parity(rank, world_size):
    from .parity import check_parity

    syncbn.set_debug(True)
    try:
        return check_parity(rank, world_size, sizes=[2, 4], steps=2)
    finally:
        syncbn.set_debug(None)


def test_consistency_mode_passes_consistent_ranks():
    run_on_ranks(2, _consistent_parity)


# ------------------------------------------------------------------------------------------------
# Faults: a peer that raises (and stays alive) or exits makes the others fail, not hang.


def _peer_raises(rank, world_size):
    group = _group(world_size, EXPIRING_TIMEOUT_S)
    bn = syncbn.SyncBatchNorm(4, process_group=group)
    if rank == 1:
        # The user's code on rank 1 fails before the layer, and the process lingers (an exception
        # handler, a data-loader worker keeping it alive): it never joins the all_reduce.
        return _outcome(lambda: (_ for _ in ()).throw(RuntimeError("data loading failed on rank 1")))
    return _outcome(bn, torch.randn(3, 4, 5))


def test_peer_that_raises_makes_others_fail_within_timeout():
    survivor, failed = run_on_ranks(2, _peer_raises, timeout=60)
    assert failed["raised"] == "RuntimeError"
    # A hang would be the harness's timeout (60 s): rank 0 raises at the group's timeout instead.
    assert survivor["raised"] == "RuntimeError", f"rank 0 must fail, not hang or pass: {survivor}"
    msg = survivor["message"]
    assert "all_gather" in msg and "peer rank crashed, exited or skipped" in msg, msg
    assert _is_timeout(msg), f"a live peer that never joins is noticed by the group's timeout: {msg}"


def _exiting_worker(rank, world_size, store_path, out_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    # A generous timeout: a peer that exits is noticed by its death, not by the timeout.
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=GENEROUS_TIMEOUT_S),
    )
    bn = syncbn.SyncBatchNorm(4)
    x = torch.randn(3, 4, 5)
    bn(x)  # one good step first: the group is up
    if rank == 1:
        os._exit(3)  # killed mid-training: no exception, no cleanup
    res = _outcome(bn, x)
    with open(out_path, "w") as f:
        f.write(repr(res))
    os._exit(0)


def test_peer_that_exits_makes_others_fail_within_timeout(tmp_path):
    ctx = mp_context()  # fresh processes, forked from one that has imported torch
    out = tmp_path / "rank0.txt"
    procs = [
        ctx.Process(target=_exiting_worker, args=(r, 2, str(tmp_path / "store"), str(out)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    # The deadline (past the group's timeout) is an upper bound whose expiry is the failure.
    for p in procs:
        p.join(timeout=GENEROUS_TIMEOUT_S + 60)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "the surviving rank hung"
    assert procs[1].exitcode == 3
    assert procs[0].exitcode == 0 and out.exists(), "rank 0 did not report"
    res = eval(out.read_text())  # noqa: S307 - our own repr of a dict of str/float
    assert res["raised"] == "RuntimeError", res
    assert "peer rank crashed, exited or skipped" in res["message"], res
    assert not _is_timeout(res["message"]), f"the peer's exit must be noticed, not wait for the timeout: {res}"


# ------------------------------------------------------------------------------------------------
# Bad values and unsupported tensors


def _nonfinite_rank(rank, world_size):
    group = _group(world_size)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2 * world_size, 3, 4, generator=gen, dtype=torch.float64)
    full[world_size + 1, 0, 2] = float("nan")  # a NaN in channel 0 and an Inf in channel 1,
    full[world_size + 1, 1, 0] = float("inf")  # both on the last rank only
    lo, hi = 2 * rank, 2 * rank + 2
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    dut = syncbn.SyncBatchNorm(3, process_group=group, dtype=torch.float64)
    y_ref = ref(full)
    y = dut(full[lo:hi])
    y.sum().backward()  # the backward all_reduce must not hang on NaN either (a hang: the group's timeout)
    for key in ("running_mean", "running_var"):
        a, e = getattr(dut, key), getattr(ref, key)
        assert torch.equal(a.isnan(), e.isnan()), f"{key}: NaN at {a.isnan().tolist()}, torch BN at {e.isnan().tolist()}"
        assert_close(a[2:], e[2:], 1e-9, f"{key} of the finite channel")
    assert torch.equal(y.isnan(), y_ref[lo:hi].isnan()), "output NaN pattern differs from torch BN"
    assert_close(y[:, 2], y_ref[lo:hi, 2], 1e-9, "output of the finite channel")
    return {
        "finite_mean": dut.running_mean.isfinite().tolist(),
        "nan_var": dut.running_var.isnan().tolist(),
    }


def test_nan_and_inf_on_one_rank_give_nan_statistics_on_every_rank():
    results = run_on_ranks(2, _nonfinite_rank, timeout=60)
    for rank, res in enumerate(results):
        # Channel 0 (NaN) and 1 (Inf: mean Inf, variance Inf - Inf = NaN) go non-finite on every
        # rank, as in torch BN; channel 2 stays finite.
        assert res["finite_mean"] == [False, False, True], f"rank {rank}: {res}"
        assert res["nan_var"] == [True, True, False], f"rank {rank}: {res}"


def _unsupported_device_rank(rank, world_size, debug):
    # A group whose backend serves CUDA tensors only, fed CPU tensors: the situation of a CPU model
    # on an NCCL group, reproducible without a GPU.
    group = dist.new_group(
        list(range(world_size)), backend="cuda:gloo", timeout=datetime.timedelta(seconds=GENEROUS_TIMEOUT_S)
    )
    syncbn.set_debug(debug)
    try:
        return _outcome(syncbn.SyncBatchNorm(4, process_group=group), torch.randn(3, 4, 5))
    finally:
        syncbn.set_debug(None)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "consistency-mode"])
def test_device_the_group_cannot_reduce_gives_clear_error(debug):
    for rank, res in enumerate(run_on_ranks(2, _unsupported_device_rank, debug, timeout=60)):
        assert res["raised"] == "RuntimeError", f"rank {rank}: {res}"
        msg = res["message"]
        for part in ("cpu", "'cuda:gloo'", "No backend type associated with device type cpu",
                     "use a backend that supports"):
            assert part in msg, f"rank {rank}: {part!r} missing from: {msg}"
        assert not _is_timeout(msg), f"rank {rank}: expected the backend error, not a timeout: {msg}"
