"""The examples, run the way the README runs them (through the launch scripts, 2 CPU processes,
tiny settings), plus the exact-resume guarantee and the bn_mechanics claims.

The launcher runs are the slow tier (``-m slow``); the fast tier runs each example in this process
without a launcher (one process, the same code path minus the group), and
tests/test_distributed.py starts the launch scripts themselves with a probe."""

from __future__ import annotations

import csv
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from examples import bn_mechanics, demo_sync_stats, train_resnet
from examples.models import SmallConvNet, resnet18

from .launch_util import REPO, base_env, run

# 256 training images, 8 steps of 2x16 per epoch: seconds per run, dominated by starting torch.
TINY = ["--epochs", "2", "--width", "4", "--batch-size", "16", "--limit-train", "256"]
EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+) loss=[\d.]+ held_out_acc=[\d.]+% \(\d+/359\) images/s=\d+ time=[\d.]+s$", re.M
)


def _rank0_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith(("W", "  ", "/"))]


def test_models_shapes() -> None:
    assert resnet18(10, 1, 8)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert resnet18()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in resnet18().parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert SmallConvNet(hidden=16)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected positive width"):
        resnet18(width=0)


@pytest.mark.slow
def test_train_resnet_torchrun_and_exact_resume(tmp_path: Path) -> None:
    """An interrupted-and-resumed run ends with exactly the parameters of an uninterrupted one."""
    script = ["bash", "launch/torchrun.sh", "examples/train_resnet.py", *TINY]
    full = run([*script, "--checkpoint-dir", str(tmp_path / "full")])
    assert full.lstrip().splitlines()[0] == "world_size=2 backend=gloo device=cpu norm=syncbn batch_per_rank=16"
    assert [m.group(1, 2) for m in EPOCH_LINE.finditer(full)] == [("1", "2"), ("2", "2")], full
    assert re.search(r"^done: held_out_acc=[\d.]+% epochs=2/2 wall=", full, re.M), full

    first = run([*script, "--checkpoint-dir", str(tmp_path / "cut"), "--stop-after", "1"])
    assert "stopping after epoch 1 (--stop-after 1)" in first and "stopped:" in first
    assert len(EPOCH_LINE.findall(first)) == 1
    rest = run([*script, "--checkpoint-dir", str(tmp_path / "cut"), "--resume"])
    assert f"resumed from {tmp_path / 'cut' / 'last.pt'} at epoch 1/2" in rest
    assert [m.group(1) for m in EPOCH_LINE.finditer(rest)] == ["2"]
    assert not list((tmp_path / "cut").glob(".*tmp*")), "atomic write left a temporary file"

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert all(torch.equal(x["cpu"], y["cpu"]) for x, y in zip(a["rng"], b["rng"]))
    # The held-out accuracy line is identical too.
    assert EPOCH_LINE.findall(full)[-1] == EPOCH_LINE.findall(rest)[-1]
    assert full.splitlines()[-1].split(" wall=")[0] in rest


def _single_process(monkeypatch) -> None:
    # No launcher: the no-op single-process context; in this process, so it costs no torch start-up.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _checkpoint(path: Path) -> dict:
    return torch.load(path / "last.pt", weights_only=True)


def test_train_resnet_exact_resume_single_process(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """Fast stand-in for the torchrun run: stopped after epoch 1 and resumed, one process ends with
    exactly the parameters, optimizer state and RNG state of an uninterrupted run."""
    _single_process(monkeypatch)
    args = ["--epochs", "2", "--width", "4", "--batch-size", "32", "--limit-train", "128"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_resnet.main([*args, "--checkpoint-dir", str(tmp_path / "full")])
        full = capsys.readouterr().out
        train_resnet.main([*args, "--checkpoint-dir", str(tmp_path / "cut"), "--stop-after", "1"])
        first = capsys.readouterr().out
        train_resnet.main([*args, "--checkpoint-dir", str(tmp_path / "cut"), "--resume"])
        rest = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert [m.group(1, 2) for m in EPOCH_LINE.finditer(full)] == [("1", "2"), ("2", "2")], full
    assert "stopping after epoch 1 (--stop-after 1)" in first and len(EPOCH_LINE.findall(first)) == 1, first
    assert f"resumed from {tmp_path / 'cut' / 'last.pt'} at epoch 1/2" in rest, rest
    assert [m.group(1) for m in EPOCH_LINE.finditer(rest)] == ["2"], rest
    assert not list((tmp_path / "cut").glob(".*tmp*")), "atomic write left a temporary file"
    a, b = _checkpoint(tmp_path / "full"), _checkpoint(tmp_path / "cut")
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert all(torch.equal(x["cpu"], y["cpu"]) for x, y in zip(a["rng"], b["rng"]))
    # The held-out accuracy line is identical too (throughput and time aside).
    last = [list(EPOCH_LINE.finditer(out))[-1].group(0).split(" images/s=")[0] for out in (full, rest)]
    assert last[0] == last[1], last


@pytest.mark.parametrize("norm", train_resnet.NORMS)
def test_train_resnet_every_norm_single_process(norm: str, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    # No launcher: the no-op single-process context; in this process, so it costs no torch start-up.
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores belong to the other pytest workers too
    try:
        train_resnet.main(["--norm", norm, "--epochs", "1", "--width", "4", "--batch-size", "32",
                           "--limit-train", "128"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"world_size=1 backend=none device=cpu norm={norm} batch_per_rank=32"
    assert len(EPOCH_LINE.findall(out)) == 1 and "done: held_out_acc=" in out


def test_train_resnet_errors_say_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="expected --data-dir.*cifar-10-python.tar.gz"):
        train_resnet.main(["--dataset", "cifar10", "--epochs", "1"])
    with pytest.raises(ValueError, match="does not exist"):
        train_resnet.main(["--resume", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit):
        train_resnet.parse_args(["--resume"])  # no PATH and no --checkpoint-dir


def test_train_resnet_as_script_in_this_process(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """Fast stand-in for the plain `python examples/train_resnet.py` run: the file run as __main__."""
    _single_process(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["examples/train_resnet.py", "--epochs", "1", "--width", "4", "--batch-size",
                                      "64", "--limit-train", "128", "--norm", "bn", "--checkpoint-dir", str(tmp_path)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(REPO / "examples" / "train_resnet.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "world_size=1 backend=none device=cpu norm=bn batch_per_rank=64", out
    assert (tmp_path / "last.pt").is_file()
    # A resume of a finished run with changed settings is refused with the differences named.
    with pytest.raises(ValueError, match=r"expected the settings of the run that wrote it.*--width 4 -> 8"):
        train_resnet.main(["--epochs", "1", "--width", "8", "--batch-size", "64", "--limit-train", "128",
                           "--norm", "bn", "--checkpoint-dir", str(tmp_path), "--resume"])


@pytest.mark.slow
def test_train_resnet_runs_as_plain_python_script(tmp_path: Path, monkeypatch) -> None:
    out = run([sys.executable, "examples/train_resnet.py", "--epochs", "1", "--width", "4", "--batch-size", "64",
               "--limit-train", "256", "--norm", "bn", "--checkpoint-dir", str(tmp_path)])
    assert out.splitlines()[0] == "world_size=1 backend=none device=cpu norm=bn batch_per_rank=64"
    assert (tmp_path / "last.pt").is_file()
    monkeypatch.delenv("RANK", raising=False)
    # A resume of a finished run with changed settings is refused with the differences named.
    with pytest.raises(ValueError, match=r"expected the settings of the run that wrote it.*--width 4 -> 8"):
        train_resnet.main(["--epochs", "1", "--width", "8", "--batch-size", "64", "--limit-train", "256",
                           "--norm", "bn", "--checkpoint-dir", str(tmp_path), "--resume"])


@pytest.mark.slow
def test_train_resnet_accelerate_through_accelerate_sh() -> None:
    out = run(["bash", "launch/accelerate.sh", "examples/train_resnet_accelerate.py", *TINY, "--epochs", "1"])
    lines = _rank0_lines(out)
    assert "world_size=2 backend=gloo device=cpu norm=syncbn batch_per_rank=16" in lines[0], out
    assert len(EPOCH_LINE.findall(out)) == 1, out  # printed once: by the main process only
    assert "done: held_out_acc=" in out


def test_train_resnet_accelerate_single_process(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """Fast stand-in for the accelerate.sh run: the example with accelerate's single-process state."""
    accelerate = pytest.importorskip("accelerate")
    from examples import train_resnet_accelerate

    _single_process(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_resnet_accelerate.main([*TINY, "--epochs", "1"])
    finally:
        torch.set_num_threads(threads)
        # accelerate keeps its state in process-wide singletons: leave none behind for other tests.
        accelerate.state.AcceleratorState._reset_state(True)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "world_size=1 backend=none device=cpu norm=syncbn batch_per_rank=16", out
    assert len(EPOCH_LINE.findall(out)) == 1 and "done: held_out_acc=" in out, out


def test_small_batch_study_single_process(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """Fast stand-in for the 4-process study: every variant trains, the CSV and PNG are written.

    The study wraps its models in DDP, so even one process needs a group: a Gloo group of one in
    this process, as a launcher with NPROC=1 would make (port 0: its store picks a free port)."""
    import syncbn
    from examples import small_batch_study

    _single_process(monkeypatch)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(k, v)
    try:
        small_batch_study.main(["--epochs", "1", "--limit-train", "32", "--width", "4", "--hidden", "8",
                                "--gn-groups", "4", "--out-dir", str(tmp_path), "--name", "s"])
    finally:
        syncbn.cleanup()  # main() does too; a failure must not leave this process in a group
    out = capsys.readouterr().out
    assert "world_size=1 backend=gloo batch_per_rank=2" in out and "run with NPROC=4" in out, out
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["bn", "syncbn", "renorm", "gn", "reference_b8"]
    assert all(0.0 <= float(r["held_out_acc"]) <= 1.0 for r in rows)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_small_batch_study_smoke(tmp_path: Path) -> None:
    out = run(
        ["bash", "launch/torchrun.sh", "examples/small_batch_study.py", "--epochs", "1", "--limit-train", "64",
         "--width", "4", "--hidden", "8", "--gn-groups", "4", "--out-dir", str(tmp_path), "--name", "s"],
        env=base_env(NPROC="4"),
    )
    assert "world_size=4 backend=gloo batch_per_rank=2" in out
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["bn", "syncbn", "renorm", "gn", "reference_b8"]
    assert all(0.0 <= float(r["held_out_acc"]) <= 1.0 for r in rows)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "| SyncBatchNorm, 4x2 |" in out


def test_committed_small_batch_study_results() -> None:
    with open(REPO / "docs" / "small_batch_study.csv") as f:
        rows = list(csv.DictReader(f))
    variants = {r["variant"] for r in rows}
    assert variants == {"bn", "syncbn", "renorm", "gn", "reference_b8"}
    assert (REPO / "docs" / "small_batch_study.png").is_file()


def test_bn_mechanics_claims_hold(capsys: pytest.CaptureFixture) -> None:
    rows = bn_mechanics.measure()
    assert len(rows) >= 10
    failed = [f"{r.claim}: {r.measured}" for r in rows if not r.holds]
    assert not failed, failed
    assert bn_mechanics.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| claim | measured | holds |") and f"{len(rows)}/{len(rows)} claims hold" in out


def test_demo_sync_stats_single_process(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    demo_sync_stats.main([])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rank 0/1 local BN  running_mean=")
    assert out[0].split("=")[1] == out[1].split("=")[1]  # one process: local and synced agree
