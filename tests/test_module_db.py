"""syncbn's layers judged on torch's own BatchNorm module inputs.

torch ships, in ``torch.testing._internal.common_modules.module_db``, one entry per module with the
constructor arguments and inputs its generic module tests use (``module_inputs_func``) and the
inputs that must fail (``module_error_inputs_func``). Every BatchNorm entry is run here through
this file's own checks, with ``syncbn.SyncBatchNorm`` (and ``SyncBatchRenorm`` with ``r_max=1,
d_max=0``, which is batch norm) in place of ``nn.BatchNorm{1,2,3}d``:

- no process group: two training steps and an eval forward, in float32 and float64, with
  contiguous, channels_last and non-contiguous inputs: outputs (values and strides), grad_input,
  weight and bias grads and every buffer bit for bit equal to torch's (close for the renorm
  layer, which computes its statistics itself); eval mode alike;
- gradcheck and gradgradcheck in float64 where torch's entry supports second order;
- pickle, deepcopy and ``state_dict`` round trips (to and from torch's layer), factory kwargs
  (dtype, meta device), the repr, and torch's error inputs;
- 2 Gloo ranks: each rank's slice of a batch (uneven, one rank empty, all empty) against torch's
  layer on the whole batch: outputs, grad_input, summed weight/bias grads, buffers, eval.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn

from .harness import run_on_ranks
from .parity import assert_close, tolerance

# torch's testing internals import expecttest (a test dependency of torch itself).
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest: pip install expecttest")
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

_BN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INFOS = [info for info in module_db if info.module_cls in _BN_CLASSES]
_DTYPES = (torch.float32, torch.float64)
_KINDS = ("SyncBatchNorm", "SyncBatchRenorm")


def _module_inputs(info: Any, dtype: torch.dtype) -> list:
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)


def _cases() -> list:
    cases = []
    for info in _INFOS:
        for dtype in _DTYPES:
            for i, mi in enumerate(_module_inputs(info, dtype)):
                name = f"{info.module_cls.__name__}-{mi.desc or 'default'}-{str(dtype)[6:]}"
                cases.append(pytest.param(info, dtype, i, id=name))
    return cases


_CASES = _cases()
_F64_CASES = [c for c in _CASES if c.values[1] is torch.float64]


def test_module_db_has_the_batch_norm_entries():
    # Guards against a torch that reorganises module_db: the checks below would silently run nothing.
    assert {info.module_cls for info in _INFOS} == set(_BN_CLASSES)
    assert len(_CASES) >= 2 * 3 * 5
    descs = {c.id.split("-")[1] for c in _CASES}
    assert {"zero_batch", "not_tracking_stats", "not_affine"} <= descs, descs
    if "bias" in inspect.signature(nn.BatchNorm2d).parameters:
        assert "affine_not_bias" in descs, descs


# ----------------------------------------------------------------------------------------------
# Building the layers


def _torch_kwargs(info: Any, args: tuple, kwargs: dict) -> dict:
    """The module_db constructor input as keywords of torch's layer, defaults filled in."""
    bound = inspect.signature(info.module_cls).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _build(kind: str, info: Any, args: tuple, kwargs: dict, **factory: Any) -> nn.Module:
    if kind == "SyncBatchNorm":
        # Positional arguments exactly as torch's tests pass them to nn.BatchNorm*d.
        return syncbn.SyncBatchNorm(*args, **kwargs, **factory)
    kw = _torch_kwargs(info, args, kwargs)
    kw.update({k: v for k, v in factory.items()})
    # Torch's defaults explicitly (renorm's own default momentum is 0.01).
    return syncbn.SyncBatchRenorm(**kw, r_max=1.0, d_max=0.0)


def _renorm_refuses(kind: str, info: Any, args: tuple, kwargs: dict) -> bool:
    """Batch Renormalization needs running statistics: the layer refuses track_running_stats=False."""
    if kind != "SyncBatchRenorm" or _torch_kwargs(info, args, kwargs)["track_running_stats"]:
        return False
    with pytest.raises(ValueError, match="expected track_running_stats=True"):
        _build(kind, info, args, kwargs)
    return True


def _randomize(ref: nn.Module, seed: int) -> None:
    """Non-trivial parameters and running statistics (and a step count) on torch's layer."""
    gen = torch.Generator().manual_seed(seed)
    c = ref.num_features
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(c, generator=gen))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(c, generator=gen))
            ref.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            ref.num_batches_tracked.fill_(3)


def _pair(kind: str, info: Any, dtype: torch.dtype, index: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    mi = _module_inputs(info, dtype)[index]
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    ref = info.module_cls(*args, **kwargs, dtype=dtype)
    _randomize(ref, index)
    dut = _build(kind, info, args, kwargs, dtype=dtype)
    dut.load_state_dict(ref.state_dict())  # strict: same keys, also without bias
    return ref, dut, mi.forward_input.args[0].detach()


# ----------------------------------------------------------------------------------------------
# No process group: syncbn equals torch


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "noncontiguous":
        buf = torch.zeros(*x.shape, 2, dtype=x.dtype)
        buf[..., 0] = x
        out = buf[..., 0]
        assert out.numel() < 2 or not out.is_contiguous()
        return out
    return x


def _layouts(x: torch.Tensor) -> list[str]:
    return ["contiguous", "noncontiguous"] + (["channels_last"] if x.dim() in (4, 5) else [])


def _check(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], exact: bool, what: str) -> None:
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual} vs {expected}"
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if exact or not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: not bit for bit equal, max diff {(actual - expected).abs().max()}"
    else:
        assert_close(actual, expected, tolerance(expected.dtype), what)


def _steps_against_torch(ref: nn.Module, dut: nn.Module, x: torch.Tensor, layout: str, exact: bool) -> None:
    """Two forward/backward steps in the current mode, then an eval forward; all compared."""
    gen = torch.Generator().manual_seed(7)
    for step, inp in enumerate((x, x * 2 - 0.5)):
        xr = _layout(inp.clone(), layout).requires_grad_()
        xd = _layout(inp.clone(), layout).requires_grad_()
        yr, yd = ref(xr), dut(xd)
        what = f"{layout} {'train' if ref.training else 'eval'} step {step}"
        _check(yd, yr, exact, f"{what} output")
        if yr.numel():
            assert yd.stride() == yr.stride(), f"{what}: output strides {yd.stride()} != {yr.stride()}"
        grad = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(yr.dtype)
        yr.backward(grad)
        yd.backward(grad)
        _check(xd.grad, xr.grad, exact, f"{what} grad_input")
        for name, p in ref.named_parameters():
            _check(getattr(dut, name).grad, p.grad, exact, f"{what} {name}.grad")
        _check(dut.bias, ref.bias, True, f"{what} bias")
        for name, b in ref.named_buffers():
            _check(getattr(dut, name), b, exact, f"{what} buffer {name}")
        ref.zero_grad()
        dut.zero_grad()
    ref.eval()
    dut.eval()
    with torch.no_grad():
        _check(dut(_layout(x, layout)), ref(_layout(x, layout)), exact, f"{layout} eval output")


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("info,dtype,index", _CASES)
def test_equals_torch_without_group(kind, info, dtype, index):
    mi = _module_inputs(info, dtype)[index]
    if _renorm_refuses(kind, info, mi.constructor_input.args, mi.constructor_input.kwargs):
        return
    # The renorm layer computes its statistics itself (float64 sums): close, not bit for bit.
    exact = kind == "SyncBatchNorm"
    for layout in _layouts(mi.forward_input.args[0]):
        for training in (True, False):
            ref, dut, x = _pair(kind, info, dtype, index)
            ref.train(training)
            dut.train(training)
            _steps_against_torch(ref, dut, x, layout, exact)


def _functional(dut: nn.Module) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    names = [n for n, _ in dut.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in dut.named_parameters())

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(dut, dict(zip(names, ps)), (x,))

    return fn, params


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info,dtype,index", _F64_CASES)
def test_gradcheck_and_gradgradcheck(info, dtype, index, training):
    _, dut, x = _pair("SyncBatchNorm", info, dtype, index)
    dut.train(training)
    fn, params = _functional(dut)
    inputs = (x.clone().requires_grad_(), *params)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    if info.supports_gradgrad:
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("info,dtype,index", _F64_CASES)
def test_renorm_gradcheck_and_gradgradcheck(info, dtype, index):
    """SyncBatchRenorm's training forward is syncbn's own autograd Function: first and second order."""
    mi = _module_inputs(info, dtype)[index]
    if _renorm_refuses("SyncBatchRenorm", info, mi.constructor_input.args, mi.constructor_input.kwargs):
        return
    _, dut, x = _pair("SyncBatchRenorm", info, dtype, index)
    fn, params = _functional(dut)
    inputs = (x.clone().requires_grad_(), *params)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    if info.supports_gradgrad:
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("info,dtype,index", _F64_CASES)
def test_serialization_factory_kwargs_and_repr(kind, info, dtype, index):
    mi = _module_inputs(info, dtype)[index]
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    if _renorm_refuses(kind, info, args, kwargs):
        return
    ref, dut, x = _pair(kind, info, dtype, index)
    dut(x.clone())  # a training step: non-default buffers
    ref(x.clone())

    # state_dict: the same keys as torch's layer, loadable in both directions (strict).
    assert list(dut.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(dut.state_dict())
    fresh = _build(kind, info, args, kwargs, dtype=dtype)
    fresh.load_state_dict(dut.state_dict())
    for copied in (fresh, pickle.loads(pickle.dumps(dut)), copy.deepcopy(dut)):
        assert type(copied) is type(dut) and repr(copied) == repr(dut)
        for (name, a), (_, b) in zip(copied.state_dict().items(), dut.state_dict().items()):
            assert torch.equal(a, b), f"{name} not carried"
        assert (copied.bias is None) == (dut.bias is None)
        copied.eval()
        dut.eval()
        with torch.no_grad():
            assert torch.equal(copied(x), dut(x))
        dut.train()

    # Factory kwargs: every parameter and buffer like torch's, also on the meta device.
    for factory in ({"dtype": dtype}, {"device": "meta", "dtype": dtype}, {"device": "cpu"}):
        r = info.module_cls(*args, **kwargs, **factory)
        d = _build(kind, info, args, kwargs, **factory)
        want = [(n, t.shape, t.dtype, t.device) for n, t in [*r.named_parameters(), *r.named_buffers()]]
        got = [(n, t.shape, t.dtype, t.device) for n, t in [*d.named_parameters(), *d.named_buffers()]]
        assert got == want, f"{factory}: {got} != {want}"

    # repr: torch's, plus the renorm limits.
    expected = repr(ref).replace(type(ref).__name__, kind, 1)
    if kind == "SyncBatchRenorm":
        expected = expected[:-1] + ", r_max=1.0, d_max=0.0)"
    assert repr(dut) == expected


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("info", _INFOS, ids=lambda i: i.module_cls.__name__)
def test_torch_error_inputs(kind, info):
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=True, training=True
    )
    assert errors
    for err in errors:
        mi = err.module_error_input
        x = mi.forward_input.args[0]
        with pytest.raises(err.error_type, match=err.error_regex):
            layer = _build(kind, info, mi.constructor_input.args, mi.constructor_input.kwargs)
            assert err.error_on == ModuleErrorEnum.FORWARD_ERROR
            layer(x)


# ----------------------------------------------------------------------------------------------
# Two Gloo ranks: each rank's slice against torch's layer on the whole batch


def _two_rank_cases() -> list[tuple]:
    """Plain data for the workers: (id, kind, torch class name, args, kwargs, full batch, rank 0's share)."""
    cases = []
    for p in _CASES:
        info, dtype, index = p.values
        mi = _module_inputs(info, dtype)[index]
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        x = mi.forward_input.args[0].detach()
        full = torch.cat([x, x.flip(0) * 0.5 + 1])
        n = full.shape[0]
        for kind in _KINDS:
            if _renorm_refuses(kind, info, args, kwargs):
                continue
            # Uneven (rank 0 holds one sample) and one empty rank; zero_batch: every rank empty.
            for share in sorted({min(1, n), 0}):
                cases.append((f"{kind}-{p.id}-share{share}", kind, info.module_cls.__name__, args, kwargs, full, share))
    return cases


def _rank_run(rank: int, kind: str, cls_name: str, args: tuple, kwargs: dict, full: torch.Tensor, share: int) -> list[str]:
    """Run one case on this rank; return the failed checks (collectives always run on every rank)."""
    cls = getattr(nn, cls_name)
    info = next(i for i in _INFOS if i.module_cls is cls)
    dtype = full.dtype
    ref = cls(*args, **kwargs, dtype=dtype)
    _randomize(ref, 1)
    dut = _build(kind, info, args, kwargs, dtype=dtype)
    dut.load_state_dict(ref.state_dict())
    lo, hi = (0, share) if rank == 0 else (share, full.shape[0])
    gen = torch.Generator().manual_seed(3)
    failures: list[str] = []

    def check(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], what: str) -> None:
        try:
            _check(actual, expected, False, what)
        except AssertionError as e:
            failures.append(str(e))

    for step, batch in enumerate((full, full * 2 - 0.5)):
        xr = batch.clone().requires_grad_()
        xd = batch[lo:hi].clone().requires_grad_()
        yr, yd = ref(xr), dut(xd)
        grad = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(dtype)
        yr.backward(grad)
        yd.backward(grad[lo:hi])
        check(yd, yr[lo:hi], f"step {step} output")
        check(xd.grad, xr.grad[lo:hi], f"step {step} grad_input")
        for name, p in ref.named_parameters():
            g = getattr(dut, name).grad
            summed = torch.zeros_like(p) if g is None else g.detach().clone()
            dist.all_reduce(summed)
            check(summed, p.grad, f"step {step} {name}.grad summed over ranks")
        for name, b in ref.named_buffers():
            check(getattr(dut, name), b, f"step {step} buffer {name}")
        ref.zero_grad()
        dut.zero_grad()
    ref.eval()
    dut.eval()
    local = full[lo:hi]
    with torch.no_grad():
        if ref.running_mean is not None:
            check(dut(local), ref(full)[lo:hi], "eval output")
        elif local.numel() and local.numel() == local.shape[1]:
            # No running statistics: eval normalizes the rank's own batch, and one value per
            # channel is an error for both.
            for layer in (ref, dut):
                try:
                    layer(local)
                    failures.append(f"eval of one sample without running stats: {type(layer).__name__} did not raise")
                except ValueError:
                    pass
        else:
            check(dut(local), ref(local) if hi > lo else local, "eval output (local batch)")
    return failures


def _rank_cases(rank: int, world_size: int, cases: list[tuple]) -> list[str]:
    assert world_size == 2
    failures = []
    for case_id, *case in cases:
        failures += [f"{case_id}: {f}" for f in _rank_run(rank, *case)]
    return failures


def test_two_ranks_equal_torch_on_the_concatenated_batch():
    cases = _two_rank_cases()
    assert len(cases) >= 2 * len(_CASES)
    results = run_on_ranks(2, _rank_cases, cases)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(results) for f in fs]
    assert not failures, f"{len(failures)} failed checks:\n" + "\n".join(failures[:40])
