"""Run launch scripts and examples as subprocesses, the way a user does, with a timeout each."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

__all__ = ["REPO", "run", "free_port", "base_env"]

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


def run(cmd: list[str], env: Optional[dict[str, str]] = None, timeout: float = TIMEOUT_S,
        expect_rc: int = 0, cwd: Optional[Path] = None) -> str:
    """Run ``cmd`` from the repo root; return stdout+stderr; fail with the output on a wrong exit code."""
    try:
        proc = subprocess.run(cmd, cwd=cwd or REPO, env=env or base_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout:.0f}s; output:\n{out}") from None
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}, expected {expect_rc}; output:\n{proc.stdout}"
        )
    return proc.stdout


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for launchers that need a fixed one: multinode, SLURM)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
