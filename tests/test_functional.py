"""The statistics merge's accuracy and range, as the docs state them.

A group merges every rank's :func:`local_row` with :func:`merge_rows`; stacking the rows of a
batch's slices is exactly what the ranks compute after their all_gather (same rows, same order),
so no processes are needed here. References: a two-pass float64 variance of the whole batch, and
torch's own single-process statistics kernel on the same input.
"""

from __future__ import annotations

import pytest
import torch

from syncbn import _stats as ST


def _group_stats(x: torch.Tensor, sizes: list[int]) -> ST.GroupStats:
    rows = torch.stack([ST.local_row(part) for part in x.split(sizes)])
    return ST.merge_rows(rows)


def _two_pass(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-enough reference: float64 two-pass mean and biased variance (double-double free)."""
    dims = ST.reduce_dims(x)
    xd = x.double()
    mean = xd.mean(dims)
    mean = mean + (xd - ST.channel_view(mean, x.dim())).mean(dims)  # one refinement step
    dev = xd - ST.channel_view(mean, x.dim())
    return mean, (dev * dev).mean(dims)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


def _torch_kernel_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """torch's single-process error: its statistics kernel on the whole (concatenated) batch."""
    _, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return _rel(var, truth)


@pytest.mark.parametrize("ratio", [0.0, 1e3, 1e5, 6.4e6, 1.7e9])
@pytest.mark.parametrize("sizes", [[3, 3], [1, 4, 2], [5, 0, 1, 2]], ids=["2ranks", "3ranks", "4ranks-empty"])
def test_float64_variance_at_any_mean(ratio, sizes):
    """float64, |mean|/std up to 1.7e9: the group variance is as accurate as torch's kernel on the whole batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(sizes), 5, 7, generator=gen, dtype=torch.float64) + ratio
    _, truth = _two_pass(x)
    st = _group_stats(x, sizes)
    err = _rel(st.var, truth)
    ref = _torch_kernel_error(x, truth)
    assert err <= max(4 * ref, 1e-14), f"variance error {err:.3g} vs torch's {ref:.3g}"
    assert int(st.count) == x.numel() // x.shape[1]


@pytest.mark.parametrize("ratio", [0.0, 1e2, 1e4, 1e5])
@pytest.mark.parametrize("shape", [(16, 64, 28, 28), (8, 6, 7, 7)], ids=["16x64x28x28", "8x6x7x7"])
def test_float32_variance_at_large_mean(shape, ratio):
    """float32 input: the group variance within a few float32 ulps of the truth, as torch's kernel."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) + ratio).float()
    _, truth = _two_pass(x)
    half = shape[0] // 2
    st = _group_stats(x, [half, shape[0] - half])
    err = _rel(st.var, truth)
    ref = _torch_kernel_error(x, truth)
    assert err <= max(4 * ref, 4 * 2**-24), f"variance error {err:.3g} vs torch's {ref:.3g}"


@pytest.mark.parametrize("magnitude", [1e-150, 1e-20, 1.0, 1e20, 1e150])
def test_float64_range(magnitude):
    """float64 values from 1e-150 to 1e150 (mean 3x the spread): full precision, no overflow (the variance is below 1e308)."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 3, 5, generator=gen, dtype=torch.float64) + 3) * magnitude
    _, truth = _two_pass(x)
    st = _group_stats(x, [2, 4])
    assert torch.isfinite(st.var).all()
    assert _rel(st.var, truth) <= 1e-13, magnitude


@pytest.mark.parametrize("mean,std", [(1e154, 1e146), (1e160, 1e150)])
def test_large_mean_near_float64_limit(mean, std):
    """Means up to 1e160 (where sums of squares overflow): the exact variance, and torch's accuracy."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64) * std + mean
    _, truth = _two_pass(x)
    st = _group_stats(x, [3, 3])
    assert torch.isfinite(st.var).all() and torch.isfinite(st.mean).all()
    assert _rel(st.var, truth) <= max(4 * _torch_kernel_error(x, truth), 1e-14)


def test_rows_merge_identically_whatever_order_of_arrival():
    """Every rank merges the same rows in group-rank order: bit-identical results."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, 3, generator=gen, dtype=torch.float32) * 3 + 1e4
    rows = torch.stack([ST.local_row(p) for p in x.split([2, 0, 5])])
    a, b = ST.merge_rows(rows.clone()), ST.merge_rows(rows.clone())
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_non_finite_values_propagate():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x[1, 0, 2] = float("nan")
    x[2, 1, 0] = float("inf")
    st = _group_stats(x, [2, 2])
    assert torch.isnan(st.var[0]) and not torch.isfinite(st.var[1]) and torch.isfinite(st.var[2])


def test_masked_row_counts_valid_values_only():
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    garbage = x.clone()
    garbage[~mask.unsqueeze(1).expand_as(x)] = float("nan")
    row = ST.local_row(garbage, mask)
    valid = x.permute(1, 0, 2)[:, mask]
    st = ST.merge_rows(row.unsqueeze(0))
    assert int(st.count) == 9
    torch.testing.assert_close(st.mean, valid.mean(1))
    torch.testing.assert_close(st.var, valid.var(1, unbiased=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_merge_when_no_rank_refined(dtype):
    """Rows without corrections (|mean| <= 4 std everywhere) merge alike with the short formula."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(9, 6, 5, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    rows = torch.stack([ST.local_row(p) for p in x.split([4, 0, 5])])
    assert not rows[:, -1].any(), "these rows should need no correction"
    fast, full = ST.merge_rows(rows, refined=False), ST.merge_rows(rows)
    _, truth = _two_pass(x)
    assert _rel(fast.var, truth) <= max(4 * _torch_kernel_error(x, truth), 1e-14)
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fast.var, full.var, rtol=1e-13, atol=0)
