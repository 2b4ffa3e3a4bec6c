"""benchmarks/bench_mask.py runs end to end at tiny sizes, and its masks have the padding asked for."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_mask


@pytest.mark.parametrize("shape", [(16, 8, 200), (5, 3, 7), (1, 2, 10), (4, 2, 6, 5)])
@pytest.mark.parametrize("padding", [0.0, 0.25, 0.4])
def test_lengths_mask_has_the_padding_asked_for(shape, padding):
    mask = bench_mask.lengths_mask(shape, padding)
    assert mask.dtype == torch.bool and mask.shape == (shape[0],) + shape[2:]
    assert mask.flatten(1).any(1).all(), "every sample keeps at least one position"
    positions = mask[0].numel()
    # Lengths are rounded to whole positions: the fraction is off by at most half a position.
    assert abs((1 - mask.float().mean().item()) - padding) <= 0.5 / positions + 1e-6
    # Valid positions come first in every sample (row-major), as in a padded batch.
    flat = mask.flatten(1).int()
    assert torch.equal(flat.sort(dim=1, descending=True, stable=True).values, flat)


def test_bench_mask_smoke(tmp_path):
    out = tmp_path / "mask.json"
    rows = bench_mask.main(["--world-sizes", "2", "--shapes", "4x8x20", "3x4x5x6", "--reps", "2", "--warmup", "1",
                            "--json", str(out), "--timeout", "120"])
    assert json.loads(out.read_text())["rows"] == rows
    assert [r["shape"] for r in rows] == [[4, 8, 20], [3, 4, 5, 6]]
    for row in rows:
        assert row["world_size"] == 2 and 0.2 < row["padding"] < 0.3
        assert list(row["impls"]) == list(bench_mask.IMPLS)
        for name, e in row["impls"].items():
            assert e["fwd_ms"] > 0 and e["fwd_bwd_ms"] > 0 and e["fwd_ratio"] > 0 and e["fwd_bwd_ratio"] > 0
        assert row["impls"]["unmasked"]["fwd_ratio"] == row["impls"]["unmasked"]["fwd_bwd_ratio"] == 1.0
        # mask= and the context compute what gathering the valid positions by hand computes.
        for name in ("mask=", "masked()"):
            assert row["impls"][name]["max_diff_to_pack"] < 1e-5, (name, row)
