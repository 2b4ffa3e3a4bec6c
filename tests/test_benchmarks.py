"""The benchmarks run end to end at tiny sizes, and what they count is what the design promises.

Runs that compile are the slow tier (``-m slow``), with fast stand-ins: the compiled ResNet rows by
tests/test_compile_fast.py's one-graph residual net, gpu_check's compiled cases here.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_layer, bench_resnet, bench_revision
from examples.models import resnet18

from .harness import run_on_fresh_ranks


def test_bench_layer_smoke(tmp_path, forked_benchmarks):
    out = tmp_path / "layer.json"
    rows = bench_layer.main(
        ["--world-sizes", "2", "--shapes", "4x8x5x5", "128x16", "--reps", "2", "--warmup", "1", "--json", str(out), "--timeout", "120"]
    )
    assert json.loads(out.read_text())["rows"] == rows
    assert [r["shape"] for r in rows] == [[4, 8, 5, 5], [128, 16]]
    for row in rows:
        ours = row["impls"]["syncbn"]
        assert ours["median_ms"] > 0 and row["allreduce_latency_ms"] > 0
        assert ours["saved_bytes_ratio"] <= 1.05, "saved for backward must stay <= 1.05x the input"
        torch_err = row["impls"]["local BN"]["error_at_mean_1e4"]
        assert ours["error_at_mean_1e4"] <= 2 * torch_err + 1e-6, (ours, torch_err)


def test_bench_revision_smoke(tmp_path, forked_benchmarks):
    """The committed package (HEAD), unpacked as syncbn_rev beside the working tree's, runs
    interleaved with it; both compute the same function."""
    out = tmp_path / "revision.json"
    rows = bench_revision.main(
        ["--rev", "HEAD", "--shapes", "4x8x5x5", "64x16", "--reps", "2", "--warmup", "0", "--steps-per-block", "2",
         "--timeout", "120", "--json", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == rows
    assert [r["shape"] for r in rows] == [[4, 8, 5, 5], [64, 16]]
    for row in rows:
        assert all(ms > 0 for ms in row["median_ms"].values()) and row["current_over_revision"] > 0
        assert row["max_output_difference"] <= 1e-5, row


def test_bench_revision_names_a_missing_revision(tmp_path):
    with pytest.raises(RuntimeError, match="expected a git revision"):
        bench_revision.materialize("no-such-revision-xyz", str(tmp_path))


def test_bench_resnet_counts_two_collectives_per_bn_layer(tmp_path, forked_benchmarks):
    result = bench_resnet.main(["--width", "8", "--batch", "2", "--image", "8", "--steps", "2", "--warmup", "1", "--timeout", "120"])
    ours, local = result["impls"]["syncbn"], result["impls"]["local BN"]
    layers = result["bn_layers"]
    assert layers == 20
    # One forward all_gather of each rank's 3C+3 float64 values and one backward all_reduce of 2C
    # gradient sums and the create_graph flag per layer.
    assert ours["syncbn_collectives"] == 2 * layers
    channels = [m.num_features for m in resnet18(width=8).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert ours["syncbn_bytes"] == sum(8 * ((3 * c + 3) + (2 * c + 1)) for c in channels)
    assert local["syncbn_collectives"] == 0
    assert ours["ddp_bytes"] == local["ddp_bytes"] and ours["ddp_allreduces"] == local["ddp_allreduces"]


@pytest.mark.slow
def test_bench_resnet_compiled_rows_are_one_graph(forked_benchmarks):
    result = bench_resnet.main(
        ["--width", "8", "--batch", "2", "--image", "8", "--steps", "2", "--warmup", "1", "--timeout", "240",
         "--compile", "aot_eager"]
    )
    assert result["graphs"]["syncbn compiled"] == {"graphs": 1, "graph_breaks": 0, "break_reasons": []}
    ours = result["impls"]["syncbn compiled"]
    # Compiled, syncbn still makes its two collectives per layer (through its custom operator).
    assert ours["syncbn_collectives"] == 2 * result["bn_layers"] and ours["median_step_ms"] > 0


def _gpu_check_compiled(rank, world_size):
    from benchmarks import gpu_check

    return [gpu_check.check_compiled("cpu", world_size, dynamic=dynamic) for dynamic in (False, True)]


def test_gpu_check_compiled_cases_on_two_ranks():
    """Fast stand-in for the compiled part of test_gpu_check's end-to-end run (its cases run fast
    in test_gpu_check): the converted net compiled fullgraph, static and dynamic shapes, equals
    eager; on fresh ranks, as the script's own processes are. Without a group (this process),
    syncbn equals torch bit for bit."""
    from benchmarks import gpu_check

    for rank, results in enumerate(run_on_fresh_ranks(2, _gpu_check_compiled, timeout=300)):
        failed = [(r["case"], r["failed"]) for r in results if not r["ok"]]
        assert not failed, f"rank {rank}: {failed}"
    for res in gpu_check.check_no_group("cpu"):
        assert res["ok"], res
