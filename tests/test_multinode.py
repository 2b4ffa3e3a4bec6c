"""Across machines: two "hosts" on this machine, made of namespaces, run launch/multinode.sh.

Each host is a network namespace (joined to the other by a veth pair with addresses that exist only
inside the two namespaces), with its own host name (UTS namespace) and its own /dev/shm (a tmpfs in
its own mount namespace). The host names resolve nowhere, so the launcher must be given the node's
own address (LOCAL_ADDR), as on clusters without shared DNS. Checked:

- the training example across 2 hosts x 1 process gives the losses and accuracy of 1 host x 2;
- 2 x 2: statistics identical on all 4 ranks and equal to BatchNorm on the whole batch; with
  new_sync_groups(2) identical within a host, different across; shared memory within a host,
  Gloo between hosts; the timeout comes from SYNCBN_TIMEOUT;
- a host killed mid-run, and the link going down mid-run (timeout from the example's --timeout):
  every surviving rank raises within the timeout and the launchers exit non-zero;
- two PID namespaces sharing a host name and /dev/shm (a Kubernetes pod): correct statistics,
  no false "exited".

Skipped, with the reason, without root or network namespaces. Every namespace and process made
here is removed also when a test fails. Ports are fixed, but inside private network namespaces.
Run as a script (``tests/test_multinode.py probe MODE OUT_DIR``) it is the worker the launchers start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import pytest

# Slow tier: each test starts torchrun agents and workers in namespaces. The fast tier covers the
# pieces: the transport's fallbacks between PID namespaces (test_shm), a group spanning sub-groups
# (test_batchnorm's groups of two), launch scripts that parse and explain (test_distributed).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
_SUBNET = "10.213.0"  # inside the test's own network namespaces only
_IFACE = "sbn0"
_port = [29600]


def _unavailable() -> Optional[str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network, mount and UTS namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}(8)"
    probe = f"sbnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns` unavailable: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Host(NamedTuple):
    name: str  # host name inside, also the network namespace's suffix
    netns: str
    addr: str
    pid: int  # a process holding the host's UTS and mount namespaces


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[Host]]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"sbn{os.getpid()}"
    netns = [f"{tag}a", f"{tag}b"]
    holders: list[subprocess.Popen] = []
    try:
        for ns in netns:
            _ip("netns", "add", ns)
        _ip("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        made = []
        for i, (ns, end) in enumerate(zip(netns, ("x", "y"))):
            addr = f"{_SUBNET}.{i + 1}"
            _ip("link", "set", f"{tag}{end}", "netns", ns, "name", _IFACE)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", _IFACE)
            if i == 0:  # a second address on host a, for a second "container" in its network namespace
                _ip("-n", ns, "addr", "add", f"{_SUBNET}.3/24", "dev", _IFACE)
            _ip("-n", ns, "link", "set", _IFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            name = f"syncbn-host-{'ab'[i]}"
            holder = subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation", "private",
                 "sh", "-c",
                 f"hostname {name} && mount -t tmpfs -o size=256m tmpfs /dev/shm && echo $$ && exec sleep 3600"],
                stdout=subprocess.PIPE, text=True, start_new_session=True,
            )
            holders.append(holder)
            line = holder.stdout.readline().strip() if holder.stdout else ""
            assert line.isdigit(), f"could not set up host {name}: {line!r}"
            made.append(Host(name, ns, addr, int(line)))
        yield made
    finally:
        for ns in netns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for holder in holders:
            try:
                os.killpg(holder.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            holder.wait(timeout=10)
        for ns in netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{tag}x"], capture_output=True)  # if never moved


class Launch(NamedTuple):
    proc: subprocess.Popen
    log: Path


def _launch(host: Host, master: Host, nnodes: int, node_rank: int, nproc: int, args: list[str], log: Path,
            port: int, env: Optional[dict] = None, own_pid_namespace: bool = False,
            local_addr: Optional[str] = None) -> Launch:
    cmd = ["nsenter", "-t", str(host.pid), "--uts", "--mount", "--net", f"--wd={ROOT}", "--"]
    if own_pid_namespace:
        cmd += ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    cmd += ["bash", "launch/multinode.sh", *args]
    full_env = dict(
        os.environ,
        NNODES=str(nnodes), NODE_RANK=str(node_rank), NPROC=str(nproc),
        MASTER_ADDR=master.addr, MASTER_PORT=str(port), RDZV_ID=f"run{port}",
        LOCAL_ADDR=local_addr or host.addr, GLOO_SOCKET_IFNAME=_IFACE, PYTHON=sys.executable, OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    for name in ("SYNCBN_SHM", "SYNCBN_TIMEOUT", "SYNCBN_DEBUG"):
        full_env.pop(name, None)
    full_env.update(env or {})
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return Launch(proc, log)


def _next_port() -> int:
    _port[0] += 1
    return _port[0]


def _wait(launches: list[Launch], timeout: float) -> list[int]:
    """Exit codes; a launcher still running after ``timeout`` is killed (with its workers) and fails."""
    deadline = time.monotonic() + timeout
    codes = []
    for launch in launches:
        try:
            codes.append(launch.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for launch in launches:
        _kill(launch)
    return codes


def _kill(launch: Launch) -> None:
    if launch.proc.poll() is None:
        try:
            os.killpg(launch.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launch.proc.wait(timeout=10)


def _kill_host(host: Host) -> None:
    """SIGKILL every process in the host's network namespace but the one holding its namespaces."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        if int(pid) != host.pid:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _logs(launches: list[Launch]) -> str:
    return "\n".join(f"--- {l.log.name} ---\n{l.log.read_text()[-3000:]}" for l in launches)


def _results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------- the probe the launchers start


def _probe(mode: str, out_dir: str) -> None:
    import socket

    import torch
    import torch.distributed as dist

    import syncbn
    from syncbn import _shm, comm

    torch.set_num_threads(1)
    info = syncbn.init_distributed()
    rank, world = info.rank, info.world_size
    out = Path(out_dir)
    res: dict = {"rank": rank, "host": socket.gethostname(), "pidns": _shm._pid_namespace(),
                 "timeout": _shm._group_timeout(None)}
    # Every rank knows the whole batch; it normalizes its own 4 samples.
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(4 * world, 3, 5, generator=gen) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1) + 2.0
    mine = x_all[4 * rank : 4 * rank + 4]
    if mode == "late" and rank == 1:
        layer = syncbn.SyncBatchNorm(3)
        layer(mine)  # builds (or not) the channel
        time.sleep(0.3)  # a healthy rank, late
    else:
        layer = syncbn.SyncBatchNorm(3)
        layer(mine)
    if mode == "late":
        layer(mine)
    res["world_mean"] = layer.running_mean.tolist()
    res["world_var"] = layer.running_var.tolist()
    ref = torch.nn.BatchNorm1d(3)
    for _ in range(2 if mode == "late" else 1):
        ref(x_all)
    res["world_ref"] = [ref.running_mean.tolist(), ref.running_var.tolist()]
    res["world_shm"] = comm._channels.get(id(comm._resolve(None)), (None, None))[1] is not None
    if mode != "late":
        group = syncbn.new_sync_groups(2)
        sub = syncbn.SyncBatchNorm(3, process_group=group)
        sub(mine)
        res["sub_mean"] = sub.running_mean.tolist()
        first = 4 * (rank // 2) * 2
        ref_sub = torch.nn.BatchNorm1d(3)
        ref_sub(x_all[first : first + 8])
        res["sub_ref"] = [ref_sub.running_mean.tolist(), ref_sub.running_var.tolist()]
        res["sub_var"] = sub.running_var.tolist()
        res["sub_shm"] = comm._channels.get(id(comm._resolve(group)), (None, None))[1] is not None
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    if mode == "loop":
        # Keep exchanging statistics until a peer is lost: then this rank must raise.
        v = torch.ones(6, dtype=torch.float64)
        (out / f"ready{rank}").write_text("")
        try:
            while True:
                comm.all_reduce_sum(v.clone())
                time.sleep(0.02)
        except Exception as err:
            (out / f"error{rank}.json").write_text(json.dumps({"error": str(err)}))
            raise
    dist.barrier()
    syncbn.cleanup()


# ---------------------------------------------------------------- tests


def _train_line(log: str) -> list[str]:
    lines = re.findall(r"epoch \d+/\d+ loss=\S+ held_out_acc=\S+ \(\d+/\d+\)", log)
    assert lines, log[-3000:]
    return lines


def test_two_hosts_train_like_one_host(hosts, tmp_path):
    a, b = hosts
    args = ["examples/train_resnet.py", "--epochs", "2", "--limit-train", "192", "--width", "4",
            "--batch-size", "16", "--timeout", "60"]
    one, two = _next_port(), _next_port()
    runs = [
        _launch(a, a, 1, 0, 2, args, tmp_path / "one_host.log", one),
        _launch(a, a, 2, 0, 1, args, tmp_path / "host_a.log", two),
        _launch(b, a, 2, 1, 1, args, tmp_path / "host_b.log", two),
    ]
    codes = _wait(runs, 240)
    assert codes == [0, 0, 0], _logs(runs)
    single = _train_line(runs[0].log.read_text())
    across = _train_line(runs[1].log.read_text())
    assert across == single, _logs(runs)


def _two_by_two(hosts, tmp_path, mode, env, args_extra=()):
    a, b = hosts
    port = _next_port()
    out = tmp_path / "out"
    out.mkdir()
    args = [str(ROOT / "tests" / "test_multinode.py"), "probe", mode, str(out), *args_extra]
    runs = [
        _launch(a, a, 2, 0, 2, args, tmp_path / "host_a.log", port, env),
        _launch(b, a, 2, 1, 2, args, tmp_path / "host_b.log", port, env),
    ]
    return runs, out


def _check_stats(results: list[dict], timeout: float) -> None:
    import torch

    hosts_seen = [r["host"] for r in results]
    assert hosts_seen == ["syncbn-host-a", "syncbn-host-a", "syncbn-host-b", "syncbn-host-b"], hosts_seen
    for r in results:
        assert r["world_mean"] == results[0]["world_mean"] and r["world_var"] == results[0]["world_var"]
        torch.testing.assert_close(torch.tensor([r["world_mean"], r["world_var"]]), torch.tensor(r["world_ref"]))
        torch.testing.assert_close(torch.tensor([r["sub_mean"], r["sub_var"]]), torch.tensor(r["sub_ref"]))
        assert r["world_shm"] is False, "the world group spans two hosts: expected Gloo"
        assert r["sub_shm"] is True, "a host's own group: expected shared memory"
        assert r["timeout"] == timeout
    assert results[0]["sub_mean"] == results[1]["sub_mean"] and results[2]["sub_mean"] == results[3]["sub_mean"]
    assert results[0]["sub_mean"] != results[2]["sub_mean"]


def test_two_by_two_statistics_and_a_killed_host(hosts, tmp_path):
    timeout = 30.0
    runs, out = _two_by_two(hosts, tmp_path, "loop", {"SYNCBN_TIMEOUT": str(timeout)})
    try:
        deadline = time.monotonic() + 180
        while not all((out / f"ready{r}").exists() for r in range(4)):
            assert time.monotonic() < deadline and all(l.proc.poll() is None for l in runs), _logs(runs)
            time.sleep(0.2)
        _check_stats(_results(out, 4), timeout)
        _kill_host(hosts[1])  # its launcher and both workers (torchrun puts them in their own sessions)
        # An upper bound whose expiry is the failure (a hang), far above the group's timeout.
        codes = _wait(runs[:1], timeout + 60)
    finally:
        _wait(runs, 0)
    assert codes[0] not in (0, None), f"launcher of host a: exit code {codes[0]}\n" + _logs(runs)
    for r in (0, 1):
        err = json.loads((out / f"error{r}.json").read_text())["error"]
        assert "peer rank crashed, exited or skipped" in err, (r, err)
        # The lost peers are noticed by their closed connections, not by waiting out the timeout.
        assert "Timed out" not in err and "did not join within" not in err, (r, err)


def test_link_down_every_rank_raises_within_the_timeout(hosts, tmp_path):
    a, b = hosts
    timeout = 4.0
    args = ["examples/train_resnet.py", "--epochs", "200", "--limit-train", "64", "--width", "4",
            "--batch-size", "8", "--timeout", str(timeout)]
    port = _next_port()
    # The launcher cut off from node 0 waits on the rendezvous store at most this long per read, and
    # is stopped this long after its workers have exited.
    env = {"RDZV_READ_TIMEOUT": "5", "STUCK_AFTER": "3"}
    runs = [
        _launch(a, a, 2, 0, 2, args, tmp_path / "host_a.log", port, env),
        _launch(b, a, 2, 1, 2, args, tmp_path / "host_b.log", port, env),
    ]
    try:
        deadline = time.monotonic() + 180
        while "epoch 1/200" not in runs[0].log.read_text():
            assert time.monotonic() < deadline and all(l.proc.poll() is None for l in runs), _logs(runs)
            time.sleep(0.2)
        _ip("-n", a.netns, "link", "set", _IFACE, "down")
        down = time.monotonic()
        codes = _wait(runs, timeout + 60)
        took = time.monotonic() - down
    finally:
        _wait(runs, 0)
        subprocess.run(["ip", "-n", a.netns, "link", "set", _IFACE, "up"], capture_output=True)
    assert all(c not in (0, None) for c in codes), f"exit codes {codes} after {took:.0f} s\n" + _logs(runs)
    logs = "".join(l.log.read_text() for l in runs)
    for r in range(4):  # every rank raised, naming the timeout
        assert re.search(rf"\[rank{r}\]: RuntimeError: .*(?:Timed out|timeout)", logs), (r, _logs(runs))


def test_pid_namespaces_sharing_host_and_dev_shm(hosts, tmp_path):
    """Two launchers on host a, each in its own PID namespace: same host name, same /dev/shm.

    Each launcher is PID 1 of its namespace; torchrun's rendezvous tells nodes apart by address and
    PID, so the second one announces host a's second address (LOCAL_ADDR).
    """
    a, _ = hosts
    port = _next_port()
    out = tmp_path / "out"
    out.mkdir()
    args = [str(ROOT / "tests" / "test_multinode.py"), "probe", "late", str(out)]
    runs = [
        _launch(a, a, 2, r, 1, args, tmp_path / f"pod{r}.log", port, own_pid_namespace=True,
                local_addr=f"{_SUBNET}.{1 + 2 * r}")
        for r in range(2)
    ]
    codes = _wait(runs, 180)
    assert codes == [0, 0], _logs(runs)
    import torch

    results = _results(out, 2)
    assert results[0]["pidns"] != results[1]["pidns"] and results[0]["host"] == results[1]["host"]
    for r in results:
        assert r["world_mean"] == results[0]["world_mean"]
        torch.testing.assert_close(torch.tensor([r["world_mean"], r["world_var"]]), torch.tensor(r["world_ref"]))
        assert r["world_shm"] is False, "expected torch.distributed between PID namespaces"


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "probe":
    _probe(sys.argv[2], sys.argv[3])
