"""CPU stand-ins for the four CUDA kernels torch's own SyncBatchNorm calls, for machines without a GPU.

:mod:`syncbn.functional` calls ``batch_norm_update_stats``, ``batch_norm_elemt``,
``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt`` on CUDA tensors; torch has no CPU
kernels for them. These functions compute what the CUDA kernels compute (in float64, rounded to the
dtypes the kernels return) and enforce the argument contract read from torch's CUDA source
(aten/src/ATen/native/cuda/Normalization.cu): statistics in the accumulation dtype, parameters
either in the input's dtype or all in the accumulation dtype, an int32 count tensor, no empty input.
A test that routes CPU tensors through them checks how syncbn *calls* the kernels (argument order,
folding, dtypes, layouts, counts); only a GPU run checks the kernels themselves
(``benchmarks/gpu_check.py``).

``calls`` counts each kernel's calls, so tests can check the number of passes over activations.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "calls",
    "batch_norm_update_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]

calls: Counter = Counter()

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return _ACC.get(dtype, dtype)


def _view(v: Tensor, ndim: int) -> Tensor:
    return v.to(torch.float64).reshape((-1,) + (1,) * (ndim - 2))


def _dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _check_stats(name: str, x: Tensor, *stats: Tensor) -> None:
    for s in stats:
        assert s.dtype == _acc(x.dtype), f"{name}: statistics must be {_acc(x.dtype)}, got {s.dtype}"
        assert s.shape == (x.shape[1],), f"{name}: statistics of shape {tuple(s.shape)}"


def _check_params(name: str, x: Tensor, *params: Optional[Tensor]) -> None:
    defined = [p for p in params if p is not None]
    for p in defined:
        assert p.dtype in (x.dtype, _acc(x.dtype)), f"{name}: parameter dtype {p.dtype} for {x.dtype} input"
    if any(p.dtype != x.dtype for p in defined):
        # Mixed types: the kernel reads every parameter as the accumulation type.
        assert all(p.dtype == _acc(x.dtype) for p in defined), f"{name}: parameters of mixed dtypes"


def _like(x: Tensor, value: Tensor) -> Tensor:
    out = torch.empty_like(x)  # same layout as x, as the CUDA kernels write
    out.copy_(value)
    return out


def batch_norm_update_stats(
    x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float
) -> tuple[Tensor, Tensor]:
    calls["update_stats"] += 1
    assert x.numel() != 0, "batch_norm_update_stats: input tensor must have at least one element"
    assert running_mean is None and running_var is None, "syncbn passes no running buffers"
    xd = x.to(torch.float64)
    acc = _acc(x.dtype)
    return xd.mean(_dims(x)).to(acc), xd.var(_dims(x), unbiased=False).to(acc)


def batch_norm_elemt(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor, eps: float
) -> Tensor:
    calls["elemt"] += 1
    _check_stats("batch_norm_elemt", x, mean, invstd)
    _check_params("batch_norm_elemt", x, weight, bias)
    n = x.dim()
    y = (x.to(torch.float64) - _view(mean, n)) * _view(invstd, n)
    if weight is not None:
        y = y * _view(weight, n)
    if bias is not None:
        y = y + _view(bias, n)
    return _like(x, y)


def batch_norm_backward_reduce(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    input_g: bool,
    weight_g: bool,
    bias_g: bool,
) -> tuple[Optional[Tensor], ...]:
    calls["backward_reduce"] += 1
    assert dy.shape == x.shape and dy.stride() == x.stride(), "batch_norm_backward_reduce: dy laid out as x"
    _check_stats("batch_norm_backward_reduce", x, mean, invstd)
    _check_params("batch_norm_backward_reduce", x, weight)
    assert not weight_g or weight is not None, "batch_norm_backward_reduce: weight_g needs a weight"
    dyd = dy.to(torch.float64)
    sum_dy = dyd.sum(_dims(x))
    sum_dy_xmu = (dyd * (x.to(torch.float64) - _view(mean, x.dim()))).sum(_dims(x))
    acc = mean.dtype
    return (
        sum_dy.to(acc) if input_g else None,
        sum_dy_xmu.to(acc) if input_g else None,
        (sum_dy_xmu * invstd.double()).to(weight.dtype) if weight_g else None,
        sum_dy.to(weight.dtype) if bias_g else None,
    )


def batch_norm_backward_elemt(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: Tensor,
) -> Tensor:
    calls["backward_elemt"] += 1
    assert dy.shape == x.shape and dy.stride() == x.stride(), "batch_norm_backward_elemt: dy laid out as x"
    _check_stats("batch_norm_backward_elemt", x, mean, invstd, sum_dy, sum_dy_xmu)
    _check_params("batch_norm_backward_elemt", x, weight)
    assert count.dtype == torch.int32, f"batch_norm_backward_elemt: count must be int32, got {count.dtype}"
    n = x.dim()
    norm = 1.0 / count.to(torch.float64).sum()
    istd = _view(invstd, n)
    scale = istd if weight is None else istd * _view(weight, n)
    xmu = x.to(torch.float64) - _view(mean, n)
    dx = (dy.to(torch.float64) - _view(sum_dy, n) * norm - xmu * istd * istd * _view(sum_dy_xmu, n) * norm) * scale
    return _like(x, dx)
