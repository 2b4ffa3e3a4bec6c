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

Under ``torch.compile`` the kernels are called through syncbn's own operators (``syncbn::fused_*``)
that have fake implementations: torch registers no Meta kernel for any of the four, so fake-tensor
tracing could only run them on real zeros with static shapes, and any dynamic batch size would
break the graph. Eagerly the kernels are called directly (no dispatch overhead).

Where the kernels come from is a testing seam (:func:`syncbn._config.testing`): tests route CPU
tensors through CPU emulations of the CUDA kernels to check how this module calls them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import _compat, _config
from ._compat import is_compiling

__all__ = [
    "uses_fused_kernels",
    "fused_layout",
    "kernel_params",
    "local_stats",
    "fused_normalize",
    "fused_grad_sums",
    "fused_grad_input",
]

_HALF = (torch.float16, torch.bfloat16)


def _source() -> Any:
    kernels = _config.current().kernels
    return torch if kernels is None else kernels


def _traced() -> bool:
    """Whether to call the fake-capable operators (inside ``torch.compile``) instead of the kernels."""
    return _compat.HAS_CUSTOM_OP and is_compiling()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def uses_fused_kernels(x: Tensor) -> bool:
    """Whether ``x`` goes through torch's fused SyncBatchNorm kernels (CUDA) or the composed path."""
    return x.device.type in _config.current().fused_device_types


def fused_layout(t: Tensor, like: Optional[Tensor] = None) -> Tensor:
    """``t`` in a layout the fused kernels take: contiguous, channels_last or channels_last_3d.

    With ``like``, in ``like``'s layout (the backward kernels want ``dy`` laid out as ``x``). A
    tensor already in such a layout is returned as is (no copy). torch's layer lays its input out
    the same way before anything reads it.
    """
    ref = t if like is None else like
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if ref.dim() == (4 if fmt is torch.channels_last else 5) and ref.is_contiguous(memory_format=fmt):
            if like is None or t.is_contiguous(memory_format=fmt):
                return t
            return t.contiguous(memory_format=fmt)
    return t.contiguous()


def kernel_params(
    weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``weight`` and ``bias`` as ``batch_norm_elemt`` and ``batch_norm_backward_reduce`` take them.

    The kernels take both in the input's dtype or both in the accumulation dtype (float32 for half
    inputs), and None for a missing one: parameters that already qualify pass unchanged (no
    launch, as torch's layer passes them); others are cast to the accumulation dtype.
    """
    acc = _acc(x.dtype)
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    if len(dtypes) <= 1 and dtypes <= {x.dtype, acc}:
        return weight, bias
    return (
        None if weight is None else weight.to(acc),
        None if bias is None else bias.to(acc),
    )


def _stats_input(x: Tensor) -> Tensor:
    """``x`` (laid out) as the statistics kernel reads it fastest.

    ``batch_norm_update_stats`` takes its channels-last Welford kernel for 4-D channels_last only
    (its 5-D channels_last_3d input would take the general reduction); torch's layer calls
    ``batch_norm_stats``, which has the channels-last kernel for 3-D too but returns ``1/sqrt(var +
    eps)`` instead of the variance. A channels_last_3d ``(N, C, D, H, W)`` tensor viewed as
    ``(N, C, D*H, W)`` is a 4-D channels_last tensor over the same memory with the same
    per-channel values, so the 4-D kernel computes exactly its statistics.
    """
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        n, c, d, h, w = x.shape
        return x.view(n, c, d * h, w)
    return x


def local_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a non-empty ``x`` with ``batch_norm_update_stats``.

    Welford in float32 (float64 for float64 input) on CUDA; half inputs give float32 statistics
    by themselves (no scratch buffers). ``x`` is laid out first (:func:`fused_layout`; no copy when
    it already is), and channels_last_3d inputs take the channels-last kernel (see
    :func:`_stats_input`).
    """
    x = _stats_input(fused_layout(x))
    if _traced():
        return _stats_op(x)
    return _source().batch_norm_update_stats(x, None, None, 0.0)


def fused_normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]
) -> Tensor:
    """``(x - mean) * invstd * scale + shift`` with torch's ``batch_norm_elemt`` kernel (CUDA).

    ``x`` in a :func:`fused_layout`; ``mean`` and ``invstd`` in the statistics dtype, ``scale`` and
    ``shift`` as :func:`kernel_params` gives them (None: 1 and 0). One read and one write of ``x``.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    if _traced():
        return _elemt_op(x, scale, shift, mean, invstd)
    return _source().batch_norm_elemt(x, scale, shift, mean, invstd, 0.0)


def fused_grad_sums(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    weight_g: bool = False, bias_g: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-channel ``sum(dy)``, ``sum(dy * (x - mean))`` and, if asked, the weight and bias gradients.

    One read of ``dy`` and ``x`` with ``batch_norm_backward_reduce`` (CUDA). ``weight`` (as
    :func:`kernel_params` gives it, or None) sets the dtype of ``grad_weight = sum(dy * (x - mean))
    * invstd`` and ``grad_bias = sum(dy)``, which the kernel writes in the same pass when
    ``weight_g``/``bias_g`` ask for them (they need a weight); otherwise they come back None. An
    empty batch gives zeros computed from ``grad_out``.
    """
    if x.numel() == 0:
        zeros = grad_out.sum([0] + list(range(2, grad_out.dim()))).to(mean.dtype)
        gw = zeros.to(weight.dtype) if weight_g and weight is not None else None
        gb = zeros.to(weight.dtype) if bias_g and weight is not None else None
        return zeros, zeros.clone(), gw, gb
    weight_g, bias_g = weight_g and weight is not None, bias_g and weight is not None
    if _traced():
        sum_dy, sum_dy_xmu, gw, gb = _grad_sums_op(grad_out, x, mean, invstd, weight, weight_g, bias_g)
    else:
        sum_dy, sum_dy_xmu, gw, gb = _source().batch_norm_backward_reduce(
            grad_out, x, mean, invstd, weight, True, weight_g, bias_g
        )
    return sum_dy, sum_dy_xmu, gw if weight_g else None, gb if bias_g else None


def fused_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    counts: Tensor,
) -> Tensor:
    """Training-mode input gradient with ``batch_norm_backward_elemt`` (CUDA).

    ``dx = weight * invstd * (dy - sum_dy / M - (x - mean) * invstd**2 * sum_dy_xmu / M)`` where the
    sums are the group's and ``M`` is the sum of ``counts``: one int32 per rank on ``x``'s device,
    which the kernel adds up in int64 (so only a single rank's count is bounded by 2**31 - 1; the
    group's total is not), reading them without a host round trip. ``weight`` in the statistics
    dtype, or None. One read of ``dy`` and ``x``, one write.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    if _traced():
        return _grad_input_op(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
    return _source().batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)


# ---------------------------------------------------------------------------------------------
# The kernels as operators with fake implementations, for torch.compile. Each runs the kernel
# itself (looked up when the graph runs); each fake returns what the kernel allocates: statistics
# of the accumulation dtype (torch: toAccumulateType(self.scalar_type(), /*is_cuda=*/true)), and
# outputs shaped and laid out like the input (torch: at::empty_like(self)), which holds for every
# input syncbn passes (laid out by fused_layout, dy laid out as x).

if _compat.HAS_CUSTOM_OP:

    @torch.library.custom_op("syncbn::fused_stats", mutates_args=())
    def _stats_op(x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = _source().batch_norm_update_stats(x, None, None, 0.0)
        return mean, var

    @_stats_op.register_fake
    def _(x: Tensor) -> tuple[Tensor, Tensor]:
        acc = _acc(x.dtype)
        return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)

    @torch.library.custom_op("syncbn::fused_normalize", mutates_args=())
    def _elemt_op(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor
    ) -> Tensor:
        return _source().batch_norm_elemt(x, weight, bias, mean, invstd, 0.0)

    @_elemt_op.register_fake
    def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
        return torch.empty_like(x)

    @torch.library.custom_op("syncbn::fused_grad_sums", mutates_args=())
    def _grad_sums_op(
        grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
        weight_g: bool, bias_g: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sum_dy, sum_dy_xmu, gw, gb = _source().batch_norm_backward_reduce(
            grad_out, x, mean, invstd, weight, True, weight_g, bias_g
        )
        # An operator returns tensors: an output not asked for (None, or the channels-last kernel's
        # placeholder) comes back empty.
        gw = gw if weight_g else mean.new_empty(0)
        gb = gb if bias_g else mean.new_empty(0)
        return sum_dy, sum_dy_xmu, gw, gb

    @_grad_sums_op.register_fake
    def _(
        grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
        weight_g: bool, bias_g: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = x.shape[1]
        gw = weight.new_empty(c) if weight_g else mean.new_empty(0)
        gb = weight.new_empty(c) if bias_g else mean.new_empty(0)
        return mean.new_empty(c), mean.new_empty(c), gw, gb

    @torch.library.custom_op("syncbn::fused_grad_input", mutates_args=())
    def _grad_input_op(
        grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
        sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor,
    ) -> Tensor:
        return _source().batch_norm_backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)

    @_grad_input_op.register_fake
    def _(
        grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
        sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor,
    ) -> Tensor:
        return torch.empty_like(x)
