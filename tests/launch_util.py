"""Run launch scripts and examples as subprocesses, the way a user does, with a timeout each.

Every launch runs in its own session, so a timeout stops the launcher together with what it
started. Ports: prefer port 0 (``--standalone``, a store of one); two launchers that must agree on
a port in advance go through :func:`with_fixed_port`, which retries a port taken in the meantime.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

__all__ = ["REPO", "TIMEOUT_S", "run", "start", "stop", "finish", "base_env", "free_port", "PortClash", "port_clash",
           "with_fixed_port"]

REPO = Path(__file__).resolve().parent.parent
# Starting torch costs seconds per process on a loaded 2-core machine; a launch of 2-4 processes
# that takes longer than this has hung.
TIMEOUT_S = float(os.environ.get("SYNCBN_LAUNCH_TIMEOUT", "150"))


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
    """Start ``cmd`` from the repo root in its own session (so :func:`stop` reaches what it starts),
    stdout and stderr together in one text pipe."""
    return subprocess.Popen(cmd, cwd=cwd or REPO, env=env or base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc``'s process group (a launch script and the launcher it runs): SIGTERM, which
    torchrun passes on to its workers, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the launcher is gone; anything left in its group goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[Optional[int], str]:
    """Wait for a process from :func:`start`; return (exit code, output). One still running after
    ``timeout`` seconds is stopped and its exit code is None: the caller fails on that."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        pass
    stop(proc)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired as e:  # a worker outside the group still holds the pipe
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return None, out


def run(cmd: list[str], env: Optional[dict[str, str]] = None, timeout: float = TIMEOUT_S,
        expect_rc: int = 0, cwd: Optional[Path] = None) -> str:
    """Run ``cmd`` from the repo root; return stdout+stderr; fail with the output on a wrong exit code
    or when it is still running after ``timeout`` seconds (then it is stopped with what it started)."""
    rc, out = finish(start(cmd, env, cwd), timeout)
    if rc is None:
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout:.0f}s; output:\n{out}")
    if rc != expect_rc:
        raise AssertionError(f"{' '.join(cmd)} exited with {rc}, expected {expect_rc}; output:\n{out}")
    return out


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1: only a candidate, since it is released
    before the launcher binds it and another process may take it in between. Never use it alone:
    prefer port 0 (``--standalone``, a group of one, a store the test creates) and, where two
    launchers must agree on a port in advance, go through :func:`with_fixed_port`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How torch's TCPStore (and the OS) say that a port is taken.
_IN_USE = ("EADDRINUSE", "Address already in use", "address already in use")


class PortClash(Exception):
    """A launch found its port taken by another process between choosing and binding it."""


def port_clash(output: str) -> bool:
    """Whether a launcher's output says that binding its rendezvous port failed."""
    return any(words in output for words in _IN_USE)


def with_fixed_port(launch: Callable[[int], T], attempts: int = 3) -> T:
    """Call ``launch(port)`` with a candidate port; when it raises :class:`PortClash`, retry with a
    new one, at most ``attempts`` times in all (then fail). For launchers that must agree on a port
    in advance (two torchrun agents meeting at MASTER_ADDR:MASTER_PORT): the window between
    choosing and binding a port cannot be closed from outside, so a clash is detected and retried.
    """
    clashes = []
    for _ in range(attempts):
        port = free_port()
        try:
            return launch(port)
        except PortClash as clash:
            clashes.append(f"port {port}: {clash}")
    raise AssertionError(f"{attempts} ports in a row were taken before the launcher bound them:\n" + "\n".join(clashes))
