"""Elastic restart: ``MAX_RESTARTS=1 launch/torchrun.sh`` survives a worker SIGKILLed mid-training.

Two torchrun jobs of ``examples/train_resnet.py`` (2 CPU processes, Gloo, SyncBatchNorm) run side
by side: one uninterrupted, one through ``tests/elastic_worker.py``, which SIGKILLs rank 1 in the
middle of epoch 2 on the first attempt. torchrun restarts both workers, ``--resume`` picks up the
epoch-1 checkpoint, and both jobs must end with bitwise-identical parameters, buffers and
optimizer state.

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: since torch 2.5 torchrun lets the workers' process group
share its rendezvous store across restarts, and a restarted Gloo group can then read a dead
worker's address ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712).
Without the variable this test fails for that reason on torch 2.13; ``launch/torchrun.sh`` sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_resnet.py"
TIMEOUT_S = 240
ARGS = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "128", "--width", "4", "--seed", "3"]


def _torchrun(script: Path, ckpt_dir: Path, log: Path, env: dict, *extra: str) -> subprocess.Popen:
    # Through the launch script, which sets --max-restarts from MAX_RESTARTS and exports
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 itself (the environment here does not).
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(script), *ARGS, "--checkpoint-dir", str(ckpt_dir), *extra]
    env = dict(env, NPROC="2", MAX_RESTARTS="1", PYTHON=sys.executable)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path, what: str) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what}: torchrun still running after {TIMEOUT_S}s; log:\n{log.read_text()[-4000:]}")
    text = log.read_text()
    assert proc.returncode == 0, f"{what}: torchrun exited with {proc.returncode}; log:\n{text[-4000:]}"
    return text


def _tensors(obj, prefix=""):
    """Flatten the tensors of a (nested) checkpoint into {path: tensor}."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


@pytest.mark.slow
def test_worker_killed_mid_training_resumes_to_identical_parameters(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plain_dir, killed_dir = tmp_path / "plain", tmp_path / "killed"
    kill_env = dict(env, SYNCBN_KILL_RANK="1", SYNCBN_KILL_AFTER=str(killed_dir / "last.pt"))
    plain = _torchrun(EXAMPLE, plain_dir, tmp_path / "plain.log", env)
    killed = _torchrun(
        ROOT / "tests" / "elastic_worker.py", killed_dir, tmp_path / "killed.log", kill_env, "--resume"
    )
    _wait(plain, tmp_path / "plain.log", "uninterrupted run")
    log = _wait(killed, tmp_path / "killed.log", "killed run")
    assert "rank 1: SIGKILL mid-epoch" in log, f"the worker was never killed; log:\n{log[-4000:]}"
    assert "resumed from" in log and "at epoch 1/2" in log, f"no resume from epoch 1; log:\n{log[-4000:]}"

    expected = torch.load(plain_dir / "last.pt", map_location="cpu", weights_only=True)
    got = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)
    assert got["epoch"] == expected["epoch"] == 2
    for part in ("model", "optimizer"):
        want, have = _tensors(expected[part]), _tensors(got[part])
        assert want.keys() == have.keys(), f"{part}: different entries"
        differ = [k for k in want if not torch.equal(want[k], have[k])]
        assert not differ, f"{part}: resumed run differs from the uninterrupted one in {differ[:5]}"
