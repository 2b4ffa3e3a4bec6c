"""benchmarks/gpu_check.py runs end to end on CPU (--dry-run), so the GPU check cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    n = len(result["results"])
    assert lines[-1] == f"{n} passed, 0 failed"
    names = [r["case"] for r in result["results"]]
    # Every case ran in both multi-process phases, plus the no-group and kernel checks.
    for phase in ("W=2 gloo", "W=1 gloo, sync path forced"):
        assert sum(name.startswith(phase + ":") for name in names) == len(gpu_check.CASES) + 1, phase
        assert any(name.startswith(phase + ": compiled fullgraph") for name in names), phase
    assert any(name.startswith("no group equals nn.BatchNorm2d") for name in names)
    assert result["info"]["device"] == "cpu" and result["info"]["torch"]
    assert [row["shape"] for row in result["timings"]] == [list(s) for s in gpu_check.DRY_SHAPES for _ in (0, 1)]
    for row in result["timings"]:
        assert all(ms > 0 for ms in row["median_ms"].values())


def test_gpu_check_reports_failures(monkeypatch):
    """A case whose layer is wrong is reported as failed, with the quantities that differ."""
    import syncbn

    real = syncbn.SyncBatchNorm.forward
    monkeypatch.setattr(syncbn.SyncBatchNorm, "forward", lambda self, x: real(self, x) * 1.001)
    res = gpu_check.run_case({"dtype": "float32", "features": (3, 4)}, 0, 1, "cpu")
    assert not res["ok"] and "output" in res["failed"] and "grad_input" in res["failed"]
    monkeypatch.undo()
    assert gpu_check.run_case({"dtype": "float32", "features": (3, 4)}, 0, 1, "cpu")["ok"]
