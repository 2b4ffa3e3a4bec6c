"""The statistics merge's accuracy and range, as the README states them.

Ranks' packed sums add up in the all_reduce, so summing :func:`pack_stats` of a batch's slices is
what a group computes (up to float64 summation order); no processes needed.
"""

from __future__ import annotations

import pytest
import torch

from syncbn import functional as BF


def _group_stats(x: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    packed = sum(BF.pack_stats(*BF.local_stats(part)) for part in x.chunk(world))
    return BF.unpack_stats(packed, BF.stat_dtype(x.dtype))


@pytest.mark.parametrize("shape", [(16, 64, 28, 28), (8, 6, 7, 7)], ids=["16x64x28x28", "8x6x7x7"])
@pytest.mark.parametrize("world", [2, 4])
def test_variance_error_at_large_mean(shape, world):
    """float32 input at |mean|/std = 1e4: group variance within 1e-4 relative (README: Use)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) + 1e4).float()
    dims = [0] + list(range(2, x.dim()))
    truth = x.double().var(dims, unbiased=False)
    mean, var, count = _group_stats(x, world)
    assert count == x.numel() // x.shape[1]
    assert ((mean.double() - x.double().mean(dims)).abs() <= 1e4 * 2**-23).all(), "mean beyond one float32 ULP"
    rel = ((var.double() - truth) / truth).abs().max().item()
    assert rel <= 1e-4, f"variance relative error {rel:.3g} > 1e-4"


def test_float64_range():
    """float64 values up to ~1e150 merge exactly enough; beyond ~1e154 the sum of squares overflows."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    for magnitude in (1e-150, 1.0, 1e150):
        x = base * magnitude + 3 * magnitude
        _, var, _ = _group_stats(x, 2)
        truth = x.var([0, 2], unbiased=False)
        assert torch.allclose(var, truth, rtol=1e-12, atol=0), magnitude
    _, var, _ = _group_stats(base * 1e154 + 3e154, 2)
    assert torch.isinf(var).all(), "the documented overflow limit moved: update the README"
