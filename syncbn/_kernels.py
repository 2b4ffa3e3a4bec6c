"""torch's fused SyncBatchNorm kernels, the path CUDA tensors take.

Two implementations of the same math exist side by side:

- this *fused* path calls exactly the kernels torch's own ``nn.SyncBatchNorm`` calls (and
  CI-tests) on CUDA: ``batch_norm_update_stats``, ``batch_norm_elemt``,
  ``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt``. They exist for CUDA only:
  3 passes over activation memory forward (stats, then read and write), 5 backward (reduce dy and
  x, then read dy and x, write dx).
- the *composed* path everywhere else (CPU, and devices without those kernels, see
  :mod:`syncbn.functional`) uses only the training-mode statistics and backward and the eval-mode
  batch_norm, whose contracts every device implements because plain ``nn.BatchNorm`` needs them.

Where the kernels come from is a testing seam (:func:`syncbn._config.testing`): tests route CPU
tensors through CPU emulations of the CUDA kernels to check how this module calls them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _config

__all__ = [
    "uses_fused_kernels",
    "fused_layout",
    "local_stats",
    "fused_normalize",
    "fused_grad_sums",
    "fused_grad_input",
]


def _source() -> Any:
    kernels = _config.current().kernels
    return torch if kernels is None else kernels


def uses_fused_kernels(x: Tensor) -> bool:
    """Whether ``x`` goes through torch's fused SyncBatchNorm kernels (CUDA) or the composed path."""
    return x.device.type in _config.current().fused_device_types


def fused_layout(t: Tensor, like: Optional[Tensor] = None) -> Tensor:
    """``t`` in a layout the fused kernels take: contiguous, channels_last or channels_last_3d.

    With ``like``, in ``like``'s layout (the backward kernels want ``dy`` laid out as ``x``). A
    tensor already in such a layout is returned as is (no copy).
    """
    ref = t if like is None else like
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if ref.dim() == (4 if fmt is torch.channels_last else 5) and ref.is_contiguous(memory_format=fmt):
            if like is None or t.is_contiguous(memory_format=fmt):
                return t
            return t.contiguous(memory_format=fmt)
    return t.contiguous()


def local_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a non-empty ``x`` with ``batch_norm_update_stats``.

    Welford in float32 (float64 for float64 input) on CUDA; half inputs give float32 statistics
    by themselves (no scratch buffers).
    """
    return _source().batch_norm_update_stats(x, None, None, 0.0)


def fused_normalize(x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - mean) * invstd * scale + shift`` with torch's ``batch_norm_elemt`` kernel (CUDA).

    ``x`` in a :func:`fused_layout`; ``mean``, ``invstd``, ``scale`` and ``shift`` in the statistics
    dtype (:func:`syncbn.functional.fold_affine` with ``like``). One read and one write of ``x``.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    return _source().batch_norm_elemt(x, scale, shift, mean, invstd, 0.0)


def fused_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` with ``batch_norm_backward_reduce`` (CUDA).

    One read of ``dy`` and ``x``. The kernel is asked for its input-gradient sums only (the weight
    gradients follow from them in closed form), so it never needs an affine weight; ``scale`` only
    tells it the parameter dtype. An empty batch gives zeros computed from ``grad_out``.
    """
    if x.numel() == 0:
        zeros = grad_out.sum([0] + list(range(2, grad_out.dim()))).to(mean.dtype)
        return zeros, zeros.clone()
    sum_dy, sum_dy_xmu, _, _ = _source().batch_norm_backward_reduce(
        grad_out, x, mean, invstd, scale, True, False, False
    )
    return sum_dy, sum_dy_xmu


def fused_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: Tensor,
) -> Tensor:
    """Training-mode input gradient with ``batch_norm_backward_elemt`` (CUDA).

    ``dx = scale * invstd * (dy - sum_dy / M - (x - mean) * invstd**2 * sum_dy_xmu / M)`` where the
    sums are the group's and ``M`` is the sum of ``count`` (an int32 tensor on ``x``'s device, so
    the kernel reads it without a host round trip). One read of ``dy`` and ``x``, one write.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    return _source().batch_norm_backward_elemt(grad_out, x, mean, invstd, scale, sum_dy, sum_dy_xmu, count)
