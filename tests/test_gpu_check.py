"""benchmarks/gpu_check.py on CPU with torch's CUDA kernels emulated, so the GPU check cannot rot unseen.

The fast tests run the script's checks (every correctness case, the kernel count) inside the
harness's process groups, each on the path it checks (the synchronized path, through the emulated
fused kernels); the slow one runs the whole script as CI would run it on a GPU, compilation and
timings included, and reads the files it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

from .harness import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script_cases(rank: int, world_size: int) -> list[dict]:
    from syncbn import _config

    with _config.testing(always_sync=world_size == 1, **gpu_check.emulation(True)):
        results = [gpu_check.run_case(case, rank, world_size, "cpu") for case in gpu_check.CASES]
        results.append(gpu_check.check_kernels("cpu"))
    return results


@pytest.mark.parametrize("world_size", [2, 1], ids=["W2", "W1-forced-sync"])
def test_gpu_check_cases_pass_on_emulated_kernels(world_size):
    for results in run_on_ranks(world_size, _script_cases, timeout=300):
        assert len(results) == len(gpu_check.CASES) + 1
        failed = [(r["case"], r["failed"]) for r in results if not r["ok"]]
        assert not failed, failed
        kernels = results[-1]
        assert kernels["errors"]["calls"] == {k: 2 for k in gpu_check._FOUR}, kernels


def _kernel_check_outside_the_synchronized_path(rank: int, world_size: int) -> dict:
    from syncbn import _config

    # Fused kernels on CPU, but a group of one without the forced synchronized path: plain batch norm.
    with _config.testing(**gpu_check.emulation(True)):
        return gpu_check.check_kernels("cpu")


def test_gpu_check_kernel_count_fails_off_the_synchronized_path():
    """The kernel-count check is no formality: where the layer does not synchronize it fails."""
    (res,) = run_on_ranks(1, _kernel_check_outside_the_synchronized_path)
    assert not res["ok"] and res["errors"]["calls"] == {}, res


def test_gpu_check_reports_failures(monkeypatch):
    """A case whose layer is wrong is reported as failed, with the quantities that differ."""
    import syncbn

    real = syncbn.SyncBatchNorm.forward
    monkeypatch.setattr(syncbn.SyncBatchNorm, "forward", lambda self, x: real(self, x) * 1.001)
    res = gpu_check.run_case({"dtype": "float32", "features": (3, 4)}, 0, 1, "cpu")
    assert not res["ok"] and "output" in res["failed"] and "grad_input" in res["failed"]
    monkeypatch.undo()
    assert gpu_check.run_case({"dtype": "float32", "features": (3, 4)}, 0, 1, "cpu")["ok"]


@pytest.mark.slow
def test_gpu_check_cpu_emulated_end_to_end(tmp_path):
    """The whole script in its CPU mode: every case in both process groups (compiled steps with
    static and dynamic shapes included), the launch counts, the timings; it writes its table."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-emulated", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    text = (tmp_path / "gpu_check.txt").read_text()
    n = len(result["results"])
    assert lines[-1] == f"{n} passed, 0 failed" == text.strip().splitlines()[-1]
    names = [r["case"] for r in result["results"]]
    for phase in ("W=2 gloo", "W=1 gloo, sync path forced"):
        mine = [name for name in names if name.startswith(phase + ":")]
        assert len(mine) == len(gpu_check.CASES) + 3, (phase, mine)
        assert f"{phase}: fused kernels launched per step" in mine
        assert any(name.startswith(phase + ": compiled fullgraph, aot_eager, equals eager") for name in mine), mine
        assert any("dynamic shapes" in name for name in mine), mine
    assert any(name.startswith("no group equals nn.BatchNorm2d") for name in names)
    assert result["info"]["device"] == "cpu" and "emulated" in result["info"]["mode"]
    assert [row["case"] for row in result["launches"]] == ["float32", "bfloat16 channels_last", "float16, float16 parameters"]
    for row in result["launches"]:
        assert row["syncbn"]["backward"]["launches"] <= row["torch"]["backward"]["launches"] + 1, row
    assert [row["shape"] for row in result["timings"]] == [list(s) for s in gpu_check.DRY_SHAPES for _ in (0, 1)]
    for row in result["timings"]:
        assert all(ms > 0 for ms in row["median_ms"].values())
        assert "torch SyncBN kernels, no comm" in row["median_ms"]  # replayed through the emulations
