"""CPU stand-ins for torch's CUDA SyncBatchNorm kernels, as strict as the kernels, for machines without a GPU.

On CUDA tensors :mod:`syncbn._kernels` calls ``batch_norm_update_stats``, ``batch_norm_elemt``,
``batch_norm_backward_reduce`` and ``batch_norm_backward_elemt``; torch has no CPU kernels for the
last three. This module defines them as operators of their own (``torch.ops.syncbn_emulated.*``,
with the schemas of the ``aten`` ones) with a CPU implementation and nothing else, so that

- they check what the CUDA kernels check, and raise ``RuntimeError`` with the kernel's message
  where the kernel raises. Each check quotes the line of torch's CUDA source it mirrors:
  ``aten/src/ATen/native/cuda/Normalization.cu`` (``.cu``) and ``Normalization.cuh`` (``.cuh``),
  read at pytorch/pytorch 18162424 and 3f55db3a;
- they pick the same implementation as the kernels (channels-last, contiguous or general, see
  :func:`_choose_impl`), record it in :data:`paths`, and return outputs in the layout that
  implementation returns;
- they compute in the dtype the kernels accumulate in (float32 for float32, float16 and bfloat16
  inputs, float64 for float64), so results carry the kernels' rounding, not float64's;
- like the CUDA kernels, they have no Meta (fake) implementation: ``torch.compile`` cannot trace
  them, so a compiled step only works if syncbn wraps them in operators that have one. (Stricter
  than CUDA in one respect: for ``aten`` operators fake tensors fall back to running the real
  kernel when every shape is static, and for these they never do.)

A test that routes CPU tensors through them checks how syncbn *calls* the kernels (argument
order, folding, dtypes, layouts, counts); only a GPU run checks the kernels themselves
(``benchmarks/gpu_check.py``). Where CPU cannot show a CUDA failure it says so (the count's device).

``batch_norm_stats`` and ``batch_norm_gather_stats_with_counts`` are emulated too, so that torch's
own ``nn.SyncBatchNorm`` Function can be replayed on CPU (launch counts, timings of the CPU mode).

:data:`calls` counts each kernel's calls, :data:`paths` each ``(kernel, implementation)``.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "calls",
    "paths",
    "batch_norm_update_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "batch_norm_stats",
    "batch_norm_gather_stats_with_counts",
    "KERNELS",
]

calls: Counter = Counter()
paths: Counter = Counter()

_INT32_MAX = 2**31 - 1
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    # at::acc_type<scalar_t, /*is_cuda=*/true>: float for Half and BFloat16, the type itself otherwise.
    return torch.float32 if dtype in _HALF else dtype


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _check_dtype(t: Tensor, expected: torch.dtype, name: str) -> None:
    # .cuh get_packed_accessor: TORCH_CHECK(actual_type == expect_type, "Expected ", var_name,
    #   " to have type ", expect_type, " but got ", actual_type); data_ptr<T>() checks the same.
    if t.dtype != expected:
        _fail(f"Expected {name} to have type {expected} but got {t.dtype}")


def _dispatch(name: str, t: Tensor) -> None:
    # AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...): double, float, half, bfloat16 only.
    if t.dtype not in _FLOATING:
        _fail(f'"{name}" not implemented for \'{t.dtype}\'')


def _can_use_32bit_index_math(t: Tensor) -> bool:
    # aten/src/ATen/cuda/detail/IndexUtils.cu canUse32BitIndexMath(t, max_elem = INT32_MAX):
    # "if (elements >= max_elem) return false;" ... "return offset < max_elem" (largest offset).
    if t.numel() >= _INT32_MAX:
        return False
    offset, linear = 0, t.numel() - 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        offset += (linear % size) * stride
        linear //= size
    return offset < _INT32_MAX


def _use_channels_last_kernels(t: Tensor) -> bool:
    # .cu batch_norm_use_channels_last_kernels: is_contiguous(ChannelsLast) ||
    #   is_contiguous(ChannelsLast3d) || (is_contiguous() && strides()[1] == 1)
    return (
        (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
        or (t.is_contiguous() and t.dim() > 1 and t.stride(1) == 1)
    )


def _choose_impl(t: Tensor) -> str:
    # .cu batch_norm_choose_impl: General without 32-bit indexing; contiguous: strides()[1] == 1 ?
    # ChannelsLast : Contiguous; is_contiguous(ChannelsLast) (4-D only): ChannelsLast; else General.
    if not _can_use_32bit_index_math(t):
        return "general"
    if t.is_contiguous():
        return "channels_last" if t.dim() > 1 and t.stride(1) == 1 else "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "general"


def _is_mixed_type(x: Tensor, *params: Optional[Tensor]) -> bool:
    # .cu is_mixed_type: the first defined parameter's type differs from the input's.
    first = next((p for p in params if p is not None), None)
    return first is not None and first.dtype != x.dtype


def _dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _view(v: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).reshape((-1,) + (1,) * (ndim - 2))


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    # .cuh: grad_out_.reshape(input_reshaped.sizes()) and packed accessors of input_scalar_t for
    # both: a dy of another shape or dtype cannot be read as the input's.
    if a.shape != b.shape:
        _fail(f"{what}: grad_out of shape {tuple(a.shape)} for input of shape {tuple(b.shape)}")


def _mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per channel, accumulated in the kernels' accumulation dtype."""
    acc = _acc(x.dtype)
    n = x.numel() // x.shape[1]
    xa = x.to(acc)
    mean = xa.sum(_dims(x)) / n
    dev = xa - mean.reshape((-1,) + (1,) * (x.dim() - 2))
    return mean, (dev * dev).sum(_dims(x)) / n


# ---------------------------------------------------------------------------------------------
# The CPU implementations


def _update_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float):
    calls["update_stats"] += 1
    _dispatch("batch_norm_update_stats_cuda", x)
    # .cu batch_norm_update_stats_cuda: TORCH_CHECK(running_mean->defined() == running_var->defined());
    if (running_mean is None) != (running_var is None):
        _fail("Expected running_mean and running_var to be both defined or both undefined")
    if running_mean is not None:
        raise NotImplementedError("emulation: syncbn passes no running buffers to batch_norm_update_stats")
    if x.numel() == 0:
        # The kernel divides by a count of 0 (NaN statistics); syncbn never calls it on an empty batch.
        _fail("emulation: batch_norm_update_stats on an empty batch (the kernel returns NaN statistics)")
    # .cu batch_norm_mean_var: switch (batch_norm_choose_impl(self)): channels_last_3d is General
    # (var_mean_out), channels_last 4-D and (N, C) take the channels-last Welford kernel.
    paths[("update_stats", _choose_impl(x))] += 1
    # .cu: options = self.options().dtype(at::toAccumulateType(self.scalar_type(), /*is_cuda=*/true))
    return _mean_var(x)


def _stats(x: Tensor, eps: float):
    calls["stats"] += 1
    _dispatch("batch_norm_stats_cuda", x)
    # .cu batch_norm_stats_cuda: use_channels_last_kernel = batch_norm_use_channels_last_kernels(self)
    impl = "channels_last" if _can_use_32bit_index_math(x) and _use_channels_last_kernels(x) else "contiguous"
    paths[("stats", impl)] += 1
    mean, var = _mean_var(x)
    # .cuh InvStd: invstd = 0 if var == 0 and epsilon == 0, else 1 / sqrt(var + epsilon)
    invstd = torch.where((var == 0) & (eps == 0), 0.0, (var + eps).rsqrt()).to(mean.dtype)
    return mean, invstd


def _gather_stats_with_counts(
    x: Tensor, mean: Tensor, invstd: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    momentum: float, eps: float, counts: Tensor,
):
    calls["gather_stats_with_counts"] += 1
    # .cu batch_norm_gather_stats_with_counts_cuda: scalar_type = running_mean.defined() ?
    # running_mean.scalar_type() : self.scalar_type(); .cuh gather template: mean/invstd accessors of
    # accscalar_t, running stats and counts of scalar_t.
    scalar = running_mean.dtype if running_mean is not None else x.dtype
    acc = _acc(scalar)
    _check_dtype(mean, acc, "mean")
    _check_dtype(invstd, acc, "invstd")
    _check_dtype(counts, scalar, "counts")
    if running_mean is not None:
        _check_dtype(running_mean, scalar, "running_mean")
        _check_dtype(running_var, scalar, "running_mean")  # (sic: the .cuh names it running_mean too)
    # .cuh batch_norm_reduce_statistics_kernel: a running Chan merge over the ranks, in accscalar_t.
    avg = torch.zeros(mean.shape[1], dtype=acc)
    var_n = torch.zeros(mean.shape[1], dtype=acc)
    n = torch.zeros((), dtype=acc)
    for j in range(mean.shape[0]):
        count = counts[j].to(acc)
        m = mean[j]
        v = 1.0 / invstd[j]
        v = (v * v - eps) * count
        factor = 1.0 / (n + count)
        var_n = var_n + v + (avg - m) * (avg - m) * n * count * factor
        avg = n * factor * avg + count * factor * m
        n = n + count
    out_invstd = 1.0 / torch.sqrt(var_n / n + eps)
    if running_mean is not None:
        running_mean.copy_(((1 - momentum) * running_mean.to(acc) + momentum * avg).to(scalar))
        running_var.copy_(((1 - momentum) * running_var.to(acc) + momentum * (var_n / (n - 1))).to(scalar))
    return avg, out_invstd


def _elemt(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor, eps: float):
    calls["elemt"] += 1
    _dispatch("batch_norm_elementwise_cuda", x)
    acc = _acc(x.dtype)
    impl = _choose_impl(x)
    if impl == "channels_last" and not all(
        # .cu batch_norm_elementwise, case ChannelsLast: (!weight->defined() || weight->is_contiguous())
        # && ... bias, mean_, invstd_ contiguous; else C10_FALLTHROUGH to General.
        t is None or t.is_contiguous() for t in (weight, bias, mean, invstd)
    ):
        impl = "general"
    paths[("elemt", impl)] += 1
    if impl == "contiguous":
        # .cu: mixed_type = is_mixed_type(self, *weight, *bias) ? <scalar_t, accscalar_t> : <scalar_t,
        # scalar_t>; .cuh batch_norm_elemt_cuda_template: weight and bias accessors of stat_scalar_t,
        # mean and invstd of stat_accscalar_t.
        param = acc if _is_mixed_type(x, weight, bias) else x.dtype
        for t, name in ((weight, "weight"), (bias, "bias")):
            if t is not None:
                _check_dtype(t, param, name)
        _check_dtype(mean, acc, "mean")
        _check_dtype(invstd, acc, "invstd")
    elif impl == "channels_last":
        # .cuh batch_norm_elemt_channels_last_cuda_template: second_dtype = weight's, else shift's,
        # else the input's; if it differs from the input's, weight and shift are read as accscalar_t;
        # else TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "batchnorm_forward: ...").
        second = weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
        if second != x.dtype:
            for t, name in ((weight, "weight"), (bias, "shift")):
                if t is not None:
                    _check_dtype(t, acc, name)
        else:
            if weight is not None and weight.dtype != x.dtype:
                _fail(f"batchnorm_forward: input.scalar_type() {x.dtype} is not supported with weight.scalar_type() {weight.dtype}")
            if bias is not None:
                _check_dtype(bias, x.dtype, "shift")
        _check_dtype(mean, acc, "mean")
        _check_dtype(invstd, acc, "inv_std")
    # General: a TensorIterator with check_all_same_dtype(false) casts every operand to acc_t.
    n = x.dim()
    y = (x.to(acc) - _view(mean, n, acc)) * _view(invstd, n, acc)
    if weight is not None:
        y = y * _view(weight, n, acc)
    if bias is not None:
        y = y + _view(bias, n, acc)
    # .cu batch_norm_elemt_cuda: auto output = at::empty_like(self);
    out = torch.empty_like(x)
    out.copy_(y)
    return out


def _backward_reduce(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    input_g: bool, weight_g: bool, bias_g: bool,
):
    calls["backward_reduce"] += 1
    _dispatch("batch_norm_backward_reduce", dy)
    _same_shape(dy, x, "batch_norm_backward_reduce")
    _check_dtype(dy, x.dtype, "grad_output")
    acc = _acc(x.dtype)
    channels_last = (
        # .cu batch_norm_backward_reduce_cuda: canUse32BitIndexMath(grad_output) &&
        # batch_norm_use_channels_last_kernels(grad_output) && ...(input) && (!weight.defined() ||
        # weight.is_contiguous()) && mean.is_contiguous() && invstd.is_contiguous()
        _can_use_32bit_index_math(dy) and _use_channels_last_kernels(dy) and _use_channels_last_kernels(x)
        and (weight is None or weight.is_contiguous()) and mean.is_contiguous() and invstd.is_contiguous()
    )
    paths[("backward_reduce", "channels_last" if channels_last else "contiguous")] += 1
    c = x.shape[1]
    if channels_last:
        # .cuh ..._channels_last_template: if (weight.defined() && input.scalar_type() !=
        # weight.scalar_type()) grad_weight is written as accscalar_t, else TORCH_CHECK(input.scalar_type()
        # == weight.scalar_type(), "batchnorm_backward_reduce: ..."); mean, inv_std read as accscalar_t.
        if weight is not None:
            if weight.dtype != x.dtype:
                _check_dtype(weight, acc, "grad_weight")
        _check_dtype(mean, acc, "mean")
        _check_dtype(invstd, acc, "inv_std")
    else:
        # .cu: TORCH_CHECK(mean_st == invstd_st, "mean and invstd need to have the same data types");
        if mean.dtype != invstd.dtype:
            _fail("mean and invstd need to have the same data types")
        # .cu: mixed_type = is_mixed_type(input, weight) picks stat_scalar_t = accscalar_t, else
        # scalar_t; .cuh: grad_weight/grad_bias (at::empty({n_input}, weight_.options())) accessors of
        # stat_scalar_t, mean/invstd/sum_dy of stat_accscalar_t.
        if weight_g or bias_g:
            if weight is None:
                # at::empty({n_input}, weight_.options()) on an undefined weight.
                _fail("batch_norm_backward_reduce: weight_g or bias_g needs a defined weight")
            _check_dtype(weight, acc if _is_mixed_type(x, weight) else x.dtype, "grad_weight")
        _check_dtype(mean, acc, "mean")
        _check_dtype(invstd, acc, "invstd")
    n = x.dim()
    dya = dy.to(acc)
    sum_dy = dya.sum(_dims(x))
    sum_dy_xmu = (dya * (x.to(acc) - _view(mean, n, acc))).sum(_dims(x))
    # Fresh tensors, as the kernel allocates them (never a view of another output).
    grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
    grad_bias = sum_dy.to(weight.dtype, copy=True) if weight is not None else None
    if channels_last:
        # .cuh: with a weight both are computed; without, "at::empty({0}, mean.options())" each.
        if weight is None:
            grad_weight, grad_bias = mean.new_empty(0), mean.new_empty(0)
        return sum_dy, sum_dy_xmu, grad_weight, grad_bias
    # .cuh batch_norm_backward_reduce_cuda_template: each output only when asked for (undefined: None).
    return (
        sum_dy if input_g else None,
        sum_dy_xmu if input_g else None,
        grad_weight if weight_g else None,
        grad_bias if bias_g else None,
    )


def _backward_elemt(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
    sum_dy: Tensor, sum_dy_xmu: Tensor, count: Tensor,
):
    calls["backward_elemt"] += 1
    _dispatch("batch_norm_backward_elemt", dy)
    _same_shape(dy, x, "batch_norm_backward_elemt")
    _check_dtype(dy, x.dtype, "grad_output")
    acc = _acc(x.dtype)
    # .cu batch_norm_backward_elemt_cuda: canUse32BitIndexMath(self) &&
    # batch_norm_use_channels_last_kernels(self) && batch_norm_use_channels_last_kernels(input)
    channels_last = _can_use_32bit_index_math(dy) and _use_channels_last_kernels(dy) and _use_channels_last_kernels(x)
    paths[("backward_elemt", "channels_last" if channels_last else "contiguous")] += 1
    if channels_last:
        # .cuh ..._channels_last_cuda_template: if (weight.defined() && weight.scalar_type() !=
        # input.scalar_type()) weight.const_data_ptr<accscalar_t>(); else TORCH_CHECK(input.scalar_type()
        # == weight.scalar_type(), "batchnorm_backward_element: ..."); mean, inv_std, sum_dy,
        # sum_dy_xmu as accscalar_t.
        if weight is not None and weight.dtype != x.dtype:
            _check_dtype(weight, acc, "weight")
        names = ("mean", "inv_std", "sum_dy", "sum_dy_xmu")
        for t, name in zip((mean, invstd, sum_dy, sum_dy_xmu), names):
            _check_dtype(t, acc, name)
        stat_acc = acc
    else:
        # .cu: TORCH_CHECK(mean_st == invstd_st, "mean and invstd need to have the same data types");
        if mean.dtype != invstd.dtype:
            _fail("mean and invstd need to have the same data types")
        # .cu: is_half_float || is_bfloat16_float (half input, float mean) ? <scalar_t, accscalar_t>
        # : <scalar_t, scalar_t>; .cuh: weight accessor of stat_scalar_t, mean/invstd/sum_dy/sum_dy_xmu
        # of stat_accscalar_t. So weight must have the mean's dtype (float for half inputs).
        stat = acc if (x.dtype in _HALF and mean.dtype == torch.float32) else x.dtype
        stat_acc = _acc(stat)
        if weight is not None:
            _check_dtype(weight, stat, "weight")
        for t, name in zip((mean, invstd, sum_dy, sum_dy_xmu), ("mean", "invstd", "sum_dy", "sum_dy_xmu")):
            _check_dtype(t, stat_acc, name)
    # .cuh (both layouts): count.const_data_ptr<int>() read by the kernel as world_size int32 values:
    # an int32 tensor, on the device (a host pointer would be read on the GPU: an illegal address;
    # on CPU this can only catch a count on another device type).
    _check_dtype(count, torch.int32, "count")
    if count.device != x.device:
        _fail(f"emulation: count on {count.device}, read by a kernel on {x.device} (illegal memory access on CUDA)")
    # .cuh batch_norm_backward_elemt_kernel: int64_t total_numel = 0; for (...) total_numel += numel[i];
    # norm_fct = static_cast<stat_accscalar_t>(1) / static_cast<stat_accscalar_t>(total_numel);
    total = int(count.to(torch.int64).sum())
    norm = torch.tensor(1.0, dtype=stat_acc) / torch.tensor(float(total), dtype=stat_acc)
    n = x.dim()
    istd = _view(invstd, n, stat_acc)
    factor_2 = istd if weight is None else _view(weight, n, stat_acc) * istd
    factor_1 = istd * istd * _view(sum_dy_xmu, n, stat_acc) * norm
    m_dy = _view(sum_dy, n, stat_acc) * norm
    dx = (dy.to(stat_acc) - m_dy - (x.to(stat_acc) - _view(mean, n, stat_acc)) * factor_1) * factor_2
    # .cuh: channels last: at::empty_like(input); else at::empty_like(input_reshaped,
    # LEGACY_CONTIGUOUS_MEMORY_FORMAT).view(input_.sizes()): contiguous.
    out = torch.empty_like(x) if channels_last else torch.empty(x.shape, dtype=x.dtype)
    out.copy_(dx)
    return out


# ---------------------------------------------------------------------------------------------
# Registration: operators with aten's schemas and a CPU implementation only (no Meta, no fake).

_LIB = torch.library.Library("syncbn_emulated", "DEF")
_SCHEMAS = {
    "batch_norm_update_stats": ("(Tensor input, Tensor? running_mean, Tensor? running_var, float momentum) -> (Tensor, Tensor)", _update_stats),
    "batch_norm_elemt": ("(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, float eps) -> Tensor", _elemt),
    "batch_norm_backward_reduce": (
        "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, bool input_g, bool weight_g, "
        "bool bias_g) -> (Tensor, Tensor, Tensor, Tensor)",
        _backward_reduce,
    ),
    "batch_norm_backward_elemt": (
        "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor sum_dy, "
        "Tensor sum_dy_xmu, Tensor count) -> Tensor",
        _backward_elemt,
    ),
    "batch_norm_stats": ("(Tensor input, float eps) -> (Tensor, Tensor)", _stats),
    "batch_norm_gather_stats_with_counts": (
        "(Tensor input, Tensor mean, Tensor invstd, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float momentum, float eps, Tensor counts) -> (Tensor, Tensor)",
        _gather_stats_with_counts,
    ),
}
for _name, (_schema, _impl) in _SCHEMAS.items():
    _LIB.define(_name + _schema)
    _LIB.impl(_name, _impl, "CPU")

_ops = torch.ops.syncbn_emulated
batch_norm_update_stats = _ops.batch_norm_update_stats.default
batch_norm_elemt = _ops.batch_norm_elemt.default
batch_norm_backward_reduce = _ops.batch_norm_backward_reduce.default
batch_norm_backward_elemt = _ops.batch_norm_backward_elemt.default
batch_norm_stats = _ops.batch_norm_stats.default
batch_norm_gather_stats_with_counts = _ops.batch_norm_gather_stats_with_counts.default

# The four kernels syncbn calls (the names it looks up on the kernels object).
KERNELS = ("batch_norm_update_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")
