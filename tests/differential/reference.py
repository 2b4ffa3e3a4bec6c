"""The parent side of the differential harness: data, torch's reference, the tolerance rule.

Data. :func:`layer_data` draws, from the configuration's seed, every rank's input and upstream
gradient for every call (in float64, then rounded to the input dtype, so that the reference sees
exactly the values the layer sees), and the layer's initial parameters and buffers (rounded to the
parameter dtype). It goes to the ranks with the configuration.

Reference. The contract is torch's single-process batch norm on the whole group's batch: one call
on the concatenation of all ranks' inputs (along N when every rank has the same spatial shape;
otherwise each rank's input flattened to rows of C values and the rows concatenated, which
``BatchNorm1d`` normalizes over the same values). Three copies of torch's layer run every call:

- ``ref``: float64 parameters, buffers and input: the values syncbn must give;
- ``own``: the configuration's dtypes (input dtype, parameter dtype), as a user would run torch;
- ``own`` again for each memory layout the ranks use, with the whole batch in that layout;
- ``perm``: float64 again, on the batch in reverse sample order, with every input, upstream
  gradient, parameter and buffer value multiplied by ``1 + u * 2**-52`` (``u`` uniform in
  [-1, 1]): float64's rounding noise on this problem (how much one ulp moves the result, which
  is large where the result cancels, as grad_input of a tiny batch does).

Where the contract is torch's own behaviour rather than a number (``track_running_stats``
switched at run time, ``momentum=None``, train/eval switched between calls, errors), the same
calls on torch's layer with the same attribute changes decide it: a call for which torch raises
must raise ``ValueError`` on every rank. What torch has no counterpart for follows syncbn's
documented contract, computed here independently: ``min_count``/``fallback`` (below ``min_count``
values per channel in the group: ``ValueError`` on every rank, or with ``fallback="running"`` the
eval-mode normalization with the running statistics, counted as a step without updating them),
``debias`` (rate ``m / (1 - (1 - m)**t)``; its limit ``1/t`` at ``m = 0``) and Batch
Renormalization (the closed form of ANCHORS.md in float64 on the concatenated batch, ``r`` and
``d`` constants for autograd, limits from the schedule at the step count before the call). Eval
without running statistics normalizes each rank's own batch (eval never communicates).

Tolerance rule. For every compared tensor ``q`` (output, grad_input, the group's summed
grad_weight and grad_bias, running_mean, running_var), with ``e = q_ref``:

    |q - e| <= K * torch_err + F * ulp(dtype) * scale (+ mean_ulp),   K = 4, F = 16

where ``torch_err = max(max|q_own - e|, max|q_perm - e|)`` is torch's own error on the same input
(its error in the configuration's dtypes, also with the batch in each memory layout the ranks
use, and float64's rounding noise; for outputs normalized with batch statistics also the error of
torch's eval-mode kernel applying the batch's exact statistics rounded to the statistics dtype,
which is how a synchronized layer applies the group's) and ``ulp`` is
``torch.finfo(dtype).eps`` of the compared tensor's dtype (the input's for outputs and input
gradients, the parameters' for parameter gradients and buffers). ``scale`` is ``max|e|``; for the
gradients, which are cancelling sums, it is at least the size of their terms (``max|w * invstd *
dy|`` for grad_input, ``max_c sum|dy * xhat|`` for grad_weight, ``max_c sum|dy|`` for grad_bias,
with the group's float64 statistics or the running ones, whichever is larger): a group of two
values has grad_input exactly 0 in exact arithmetic, and any implementation's rounding shows
relative to the terms, not to 0. For outputs and input gradients ``mean_ulp`` adds how far two
ulps of the mean (in the statistics dtype) move them: the mean is rounded in any
implementation, each summation order rounds it differently (``own`` equals ``ref`` in float64,
so torch's own error does not show it), and at large |mean|/std that moves ``x - mean`` by an
ulp of the mean, not of the result. Non-finite values: where syncbn
gives NaN or +-inf, torch (``ref`` or ``own``) must give the same at that position; where syncbn
gives a finite value, it must be within the tolerance of a finite ``ref``. ``num_batches_tracked``
must be equal, output dtype equal, and the output's memory layout that of torch's output for the
rank's own input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .configs import REGIONS, LayerConfig, Step

__all__ = [
    "K",
    "F",
    "LayerData",
    "layer_data",
    "dtype_of",
    "LayerReference",
    "Tolerance",
    "compare",
    "set_layout",
    "layout_signature",
]

K = 4.0
F = 16.0


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------
# Layouts (used on the ranks as well)
# ---------------------------------------------------------------------------------------------


def set_layout(t: Tensor, layout: str) -> Tensor:
    """The same values as ``t`` in the memory layout ``layout`` (see configs.LAYOUTS)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "transposed":
        return t.transpose(1, -1).contiguous().transpose(1, -1)
    if layout == "sliced_c":
        wide = torch.zeros((t.shape[0], 2 * t.shape[1]) + tuple(t.shape[2:]), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "sliced_n":
        tall = torch.zeros((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
        tall[::2] = t
        return tall[::2]
    raise ValueError(f"unknown layout {layout!r}")


def layout_signature(t: Tensor) -> tuple:
    """The order of ``t``'s dims by stride, ignoring dims of size 1 (whose stride means nothing)."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    return tuple(sorted(dims, key=lambda d: (-t.stride(d), d)))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerData:
    """Inputs ``x[k][r]`` and upstream gradients ``g[k][r]`` (input dtype, contiguous), and the
    initial state ``init`` (parameter dtype; ``num_batches_tracked`` int64)."""

    x: list[list[Tensor]]
    g: list[list[Tensor]]
    init: dict[str, Tensor]


def _scale(cfg: LayerConfig) -> float:
    return 10.0 ** cfg.log_scale


def layer_data(cfg: LayerConfig) -> LayerData:
    gen = torch.Generator().manual_seed(cfg.seed)
    xd, pd = dtype_of(cfg.x_dtype), dtype_of(cfg.p_dtype)
    c = cfg.channels
    scale = _scale(cfg)
    signs = torch.where(torch.rand(c, generator=gen) < 0.5, -1.0, 1.0).double()
    centre = signs * (cfg.offset * scale) * (1.0 + 0.25 * torch.arange(c, dtype=torch.float64))

    def shaped(v: Tensor, ndim: int) -> Tensor:
        return v.reshape((-1,) + (1,) * (ndim - 2))

    xs, gs = [], []
    for step in cfg.steps:
        xk, gk = [], []
        for r in range(cfg.world):
            shape = (step.sizes[r], c) + step.spatial_of(r)
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shaped(centre, len(shape))
            x = x.to(xd)
            if step.nonfinite is not None and step.nonfinite[0] == r and x.numel():
                x.view(-1)[0] = float(step.nonfinite[1])
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(xd)
            xk.append(x)
            gk.append(g)
        xs.append(xk)
        gs.append(gk)
    init = {
        "weight": (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(pd),
        "bias": torch.randn(c, generator=gen, dtype=torch.float64).to(pd),
        "running_mean": (centre + 0.3 * scale * torch.randn(c, generator=gen, dtype=torch.float64)).to(pd),
        "running_var": ((0.5 + torch.rand(c, generator=gen, dtype=torch.float64)) * scale * scale).to(pd),
        "num_batches_tracked": torch.tensor(cfg.initial_steps, dtype=torch.long),
    }
    return LayerData(xs, gs, init)


# ---------------------------------------------------------------------------------------------
# torch's layers
# ---------------------------------------------------------------------------------------------


class AnyBatchNorm(_BatchNorm):
    """torch's ``_BatchNorm`` (the forward of BatchNorm1d/2d/3d) for inputs of any rank >= 2."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _rows(x: Tensor) -> Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _unrows(rows: Tensor, like_shape: tuple[int, ...]) -> Tensor:
    n, c, *sp = like_shape
    return rows.reshape((n, *sp, c)).movedim(-1, 1)


class _Engine:
    """One copy of the reference: torch's layer (or the renorm closed form) in given dtypes."""

    def __init__(self, cfg: LayerConfig, init: dict[str, Tensor], x_dtype: torch.dtype, p_dtype: torch.dtype, reverse: bool):
        self.cfg = cfg
        self.xd, self.pd = x_dtype, p_dtype
        self.reverse = reverse
        self.layout = "contiguous"  # memory layout the whole batch is given in
        kwargs: dict[str, Any] = {}
        if cfg.affine and not cfg.bias:
            kwargs["bias"] = False
        self.bn = AnyBatchNorm(
            cfg.channels, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine,
            track_running_stats=cfg.track, dtype=p_dtype, **kwargs,
        )
        with torch.no_grad():
            for name, t in init.items():
                dst = getattr(self.bn, name, None)
                if dst is not None:
                    dst.copy_(t)

    # -- one call ------------------------------------------------------------------------------

    def call(self, step: Step, xs: list[Tensor], gs: list[Tensor]) -> list[dict]:
        """Run one call; returns per-rank dicts (y, xg, wg, bg) or raises what torch raises."""
        bn = self.bn
        bn.train(step.train)
        if step.track is not None:
            bn.track_running_stats = step.track
        xs = [x.to(self.xd) for x in xs]
        gs = [g.to(self.xd) for g in gs]
        buffers = bn.running_mean is not None and (not step.train or bn.track_running_stats)
        if not step.train and bn.running_mean is None:
            # Eval without running statistics: each rank normalizes its own batch (no
            # communication), and each rank raises where torch (or min_count) refuses its batch.
            out: list = []
            for x, g in zip(xs, gs):
                try:
                    n = x.numel() // max(x.shape[1], 1)
                    if 0 < n < self.cfg.min_count:
                        raise ValueError(f"reference: {n} values per channel, below min_count={self.cfg.min_count}")
                    out.append(self._run(step, [x], [g])[0])
                except Exception as err:
                    out.append(err)
            return out
        count = sum(x.numel() // max(x.shape[1], 1) for x in xs)
        if step.train and not self.cfg.eps > 0:
            # torch checks eps in every training forward; so does syncbn, also where a fallback
            # would normalize with the running statistics.
            raise ValueError(f"reference: eps must be positive during training, got {self.cfg.eps}")
        if step.train and 0 < count < self.cfg.min_count:
            if self.cfg.fallback == "running" and buffers:
                tracked = bn.track_running_stats and bn.num_batches_tracked is not None
                bn.eval()
                try:
                    out = self._run(step, xs, gs)
                finally:
                    bn.train()
                if tracked:
                    bn.num_batches_tracked.add_(1)
                return out
            raise ValueError(
                f"reference: {count} values per channel in the group, below min_count={self.cfg.min_count}"
            )
        if self.cfg.kind == "renorm" and step.train and buffers:
            return self._renorm(step, xs, gs)
        return self._run(step, xs, gs)

    def _momentum_for_step(self) -> Optional[float]:
        bn, m = self.bn, self.cfg.momentum
        if not self.cfg.debias or m is None or not (bn.training and bn.track_running_stats):
            return m
        t = int(bn.num_batches_tracked) + 1
        if m == 0.0:
            return 1.0 / t  # the rate's limit as momentum -> 0: the cumulative average
        return m / (1.0 - (1.0 - m) ** t)

    def _concat(self, xs: list[Tensor]) -> tuple[Tensor, bool]:
        same = len({tuple(x.shape[2:]) for x in xs}) == 1
        if same:
            parts = xs
        else:
            parts = [_rows(x) for x in xs]
        full = torch.cat(parts)
        if self.layout != "contiguous" and (self.layout != "channels_last" or full.dim() in (4, 5)):
            full = set_layout(full, self.layout)
        return full, same

    def _split(self, full: Tensor, xs: list[Tensor], same: bool) -> list[Tensor]:
        out, lo = [], 0
        for x in xs:
            n = x.shape[0] if same else x.numel() // max(x.shape[1], 1)
            part = full[lo : lo + n]
            lo += n
            out.append(part if same else _unrows(part, tuple(x.shape)))
        return out

    def _inputs(self, step: Step, xs: list[Tensor], gs: list[Tensor]) -> tuple[Tensor, Tensor, bool]:
        """The concatenated batch and upstream gradient (reversed if asked), gradients switched
        on as ``step.grad`` wants them and cleared."""
        full, same = self._concat(xs)
        gfull, _ = self._concat(gs)
        if self.reverse:
            full, gfull = full.flip(0), gfull.flip(0)
        want_x, want_p = _wants(step.grad)
        full = full.detach().requires_grad_(want_x)
        for p in self.bn.parameters():
            p.requires_grad_(want_p)
            p.grad = None
        return full, gfull, same

    def _run(self, step: Step, xs: list[Tensor], gs: list[Tensor]) -> list[dict]:
        bn = self.bn
        full, gfull, same = self._inputs(step, xs, gs)
        m = bn.momentum
        bn.momentum = self._momentum_for_step()
        try:
            with _grad_context(step.grad):
                y = bn(full)
        finally:
            bn.momentum = m
        xg = wg = bg = None
        if y.requires_grad:
            y.backward(gfull)
            xg = full.grad
            wg = bn.weight.grad if bn.weight is not None else None
            bg = bn.bias.grad if bn.bias is not None else None
        if self.reverse:
            y = y.flip(0)
            xg = xg.flip(0) if xg is not None else None
        ys = self._split(y.detach(), xs, same)
        xgs = self._split(xg, xs, same) if xg is not None else [None] * len(xs)
        applied = self._applied(bn, full, y, xs, same)
        return [{"y": yr, "xg": xgr, "wg": wg, "bg": bg, "y_applied": ya_r} for yr, xgr, ya_r in zip(ys, xgs, applied)]

    def _applied(self, bn: nn.Module, full: Tensor, y: Tensor, xs: list[Tensor], same: bool) -> list:
        """torch's error in applying the batch's exact statistics (rounded to the statistics dtype)
        with its eval-mode kernel, as a synchronized layer must: its folded ``x * a + b`` form
        cancels at large |mean|/std, where the training kernel on the whole batch may not. Per rank,
        None where the output does not come from batch statistics (or is float64)."""
        if not (self.xd != torch.float64 and (bn.training or bn.running_mean is None) and y.numel()):
            return [None] * len(xs)
        with torch.no_grad():
            cd = stat_dtype(self.xd)
            f64 = full.detach().double()
            dims = [0] + list(range(2, f64.dim()))
            mean, var = f64.mean(dims), f64.var(dims, unbiased=False)
            w = bn.weight.detach().to(cd) if bn.weight is not None else None
            b = bn.bias.detach().to(cd) if bn.bias is not None else None
            ya = torch.batch_norm(full.detach(), w, b, mean.to(cd), var.to(cd), False, 0.0, bn.eps, False)
            if self.reverse:
                ya = ya.flip(0)
        return self._split(ya, xs, same)

    def _renorm(self, step: Step, xs: list[Tensor], gs: list[Tensor]) -> list[dict]:
        """Batch Renormalization's closed form (ANCHORS.md) in the statistics dtype."""
        bn, cfg = self.bn, self.cfg
        cd = stat_dtype(self.xd)
        full, gfull, same = self._inputs(step, xs, gs)
        want_p = _wants(step.grad)[1]
        t_before = int(bn.num_batches_tracked)
        r_max, d_max = _limits(cfg, t_before)
        bn.num_batches_tracked.add_(1)
        factor = self._momentum_for_step_after_count()
        c = cfg.channels
        dims = [0] + list(range(2, full.dim()))
        view = (-1,) + (1,) * (full.dim() - 2)
        n = full.numel() // c
        with _grad_context(step.grad):
            xc = full.to(cd)
            if n == 0:
                # Empty: as torch's layer, an output that depends on the weight and bias (their
                # gradients are zeros, not None) and the input.
                y = full.to(cd)
                if bn.weight is not None:
                    y = y * bn.weight.to(cd).reshape(view)
                if bn.bias is not None:
                    y = y + bn.bias.to(cd).reshape(view)
                y = y.to(self.xd) if y.requires_grad else full.clone()
                mean = var = None
            else:
                mean = xc.mean(dims)
                var = (xc - mean.reshape(view)).pow(2).mean(dims)
                rm = bn.running_mean.detach().to(cd)
                rv = bn.running_var.detach().to(cd)
                sigma_b = (var + cfg.eps).sqrt()
                sigma = (rv + cfg.eps).sqrt()
                r = (sigma_b.detach() / sigma).clamp(1.0 / r_max, r_max)
                d = ((mean.detach() - rm) / sigma).clamp(-d_max, d_max)
                xhat = (xc - mean.reshape(view)) / sigma_b.reshape(view) * r.reshape(view) + d.reshape(view)
                if bn.weight is not None:
                    xhat = xhat * bn.weight.to(cd).reshape(view)
                if bn.bias is not None:
                    xhat = xhat + bn.bias.to(cd).reshape(view)
                y = xhat.to(self.xd)
                if self.xd != torch.float64 or self.reverse:
                    # torch's own error: the values of torch's batch-norm kernel applying these
                    # statistics and r/d (its folded x * a + b form cancels at large |mean|/std),
                    # the closed form's gradients.
                    with torch.no_grad():
                        w = bn.weight.detach().to(cd) if bn.weight is not None else torch.ones_like(r)
                        b = bn.bias.detach().to(cd) if bn.bias is not None else torch.zeros_like(r)
                        kernel = torch.batch_norm(
                            full.detach(), w * r, b + w * d, mean.detach(), var.detach(), False, 0.0, cfg.eps, False
                        )
                    y = y + (kernel.to(y.dtype) - y).detach()
        if mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                bn.running_mean.copy_((1 - factor) * bn.running_mean.to(cd) + factor * mean.detach())
                bn.running_var.copy_((1 - factor) * bn.running_var.to(cd) + factor * unbiased)
        xg = wg = bg = None
        if y.requires_grad:
            y.backward(gfull)
            xg = full.grad
            wg = bn.weight.grad if bn.weight is not None else None
            bg = bn.bias.grad if bn.bias is not None else None
            if wg is None and bn.weight is not None and want_p:
                wg = torch.zeros_like(bn.weight)
            if bg is None and bn.bias is not None and want_p:
                bg = torch.zeros_like(bn.bias)
        if self.reverse:
            y = y.flip(0)
            xg = xg.flip(0) if xg is not None else None
        ys = self._split(y.detach(), xs, same)
        xgs = self._split(xg, xs, same) if xg is not None else [None] * len(xs)
        applied = [None] * len(xs)  # the kernel form is already the output here (r and d folded in)
        return [{"y": yr, "xg": xgr, "wg": wg, "bg": bg, "y_applied": ya_r} for yr, xgr, ya_r in zip(ys, xgs, applied)]

    def _momentum_for_step_after_count(self) -> float:
        m, t = self.cfg.momentum, int(self.bn.num_batches_tracked)
        if m is None:
            return 1.0 / t
        if self.cfg.debias:
            return 1.0 / t if m == 0.0 else m / (1.0 - (1.0 - m) ** t)
        return m

    def buffers(self) -> dict[str, Optional[Tensor]]:
        bn = self.bn
        return {
            "running_mean": None if bn.running_mean is None else bn.running_mean.detach().clone(),
            "running_var": None if bn.running_var is None else bn.running_var.detach().clone(),
            "num_batches_tracked": None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone(),
        }


def _limits(cfg: LayerConfig, t: int) -> tuple[float, float]:
    """Renorm limits at step ``t`` (steps already taken), from RenormSchedule's documented formula."""
    if cfg.schedule is None:
        return cfg.r_max, cfg.d_max
    warmup, r_at, d_at = cfg.schedule

    def progress(at: int) -> float:
        if t < warmup:
            return 0.0
        if t >= at:
            return 1.0
        return (t - warmup) / (at - warmup)

    return 1.0 + (cfg.r_max - 1.0) * progress(r_at), cfg.d_max * progress(d_at)


def _wants(mode: str) -> tuple[bool, bool]:
    """(input requires grad, parameters require grad) for an autograd mode."""
    return {
        "all": (True, True),
        "input": (True, False),
        "params": (False, True),
    }.get(mode, (False, False))


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _grad_context(mode: str) -> Any:
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference":
        return torch.inference_mode()
    return _Null()


# ---------------------------------------------------------------------------------------------
# The reference for a whole configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What one call must give: per rank an error (torch's, as "Type: message") or tensors.

    ``ranks[r]`` maps "y" and "xg" to (ref, own, perm); ``params`` maps "wg"/"bg" to the group's
    (ref, own, perm) parameter gradients; ``buffers`` maps each buffer name to (ref, own, perm).
    """

    errors: list = field(default_factory=list)
    scales: dict = field(default_factory=dict)  # natural scales of "xg", "wg", "bg" (see _natural_scales)
    ranks: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    buffers: dict = field(default_factory=dict)
    # torch's own results in the ranks' other memory layouts (more "own" values for torch_err)
    extra_ranks: list = field(default_factory=list)
    extra_params: dict = field(default_factory=dict)
    extra_buffers: dict = field(default_factory=dict)

    @property
    def any_error(self) -> bool:
        return any(e is not None for e in self.errors)


def _finite(t: Tensor) -> Tensor:
    t = t.double()
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=torch.float64))


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class LayerReference:
    """Steps torch's three reference layers through a configuration's calls."""

    def __init__(self, cfg: LayerConfig, data: LayerData):
        self.cfg, self.data = cfg, data
        xd, pd = dtype_of(cfg.x_dtype), dtype_of(cfg.p_dtype)
        init64 = {k: (v.double() if v.is_floating_point() else v) for k, v in data.init.items()}
        self.ref = _Engine(cfg, init64, torch.float64, torch.float64, reverse=False)
        self.own = _Engine(cfg, data.init, xd, pd, reverse=False)
        self.perm = _Engine(cfg, _jitter(init64, cfg.seed), torch.float64, torch.float64, reverse=True)
        # torch in the configuration's dtypes with the whole batch in each other layout that any
        # rank uses in any call, for the whole sequence of calls (buffers carry their history).
        self.twins = []
        for layout in sorted({s.layout_of(r) for s in cfg.steps for r in range(cfg.world)} - {"contiguous"}):
            twin = _Engine(cfg, data.init, xd, pd, reverse=False)
            twin.layout = layout
            self.twins.append(twin)
        self.jitter_seed = cfg.seed

    def _variance_overflows(self, step: Step, xs: list[Tensor]) -> bool:
        """A synchronized training call whose group variance float32 statistics cannot hold."""
        cfg = self.cfg
        # float32 statistics: float32, bfloat16 and float16 inputs (float16's values cannot reach it).
        if not step.train or cfg.x_dtype == "float64" or (cfg.world == 1 and cfg.kind == "bn"):
            return False
        stats = _group_stats(xs)
        if stats is None or stats[2] < cfg.min_count:
            return False
        mean, var, _ = stats
        return bool((mean.isfinite() & (var > torch.finfo(torch.float32).max)).any())

    def _natural_scales(self, step: Step, xs: list[Tensor], gs: list[Tensor]) -> dict[str, float]:
        """The size of the terms that the gradients are sums of, before they cancel.

        grad_input is ``a * (dy - mean(dy) - xhat * mean(dy * xhat))`` with ``a = w * invstd``:
        its rounding error scales with ``max|a * dy|`` even where the result is ~0 (a group of
        two values gives exactly 0 in exact arithmetic); grad_weight and grad_bias are sums of
        ``dy * xhat`` and ``dy``. The floor of the tolerance uses these scales (with the float64
        statistics of the group's batch, or the running ones, whichever is larger).
        """
        c = self.cfg.channels
        rows = torch.cat([_finite(_rows(x)) for x in xs]) if xs else torch.zeros(0, c)
        grows = torch.cat([_finite(_rows(g)) for g in gs]) if gs else torch.zeros(0, c)
        eps = max(self.cfg.eps, 0.0)
        bn = self.ref.bn
        w = _finite(bn.weight.detach()).abs() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
        invstds, xhats = [], []
        if rows.shape[0]:
            mean = rows.mean(0)
            var = (rows - mean).pow(2).mean(0)
            inv = (var + eps).rsqrt()
            invstds.append(inv)
            xhats.append(((rows - mean) * inv).abs())
        if bn.running_var is not None:
            inv = (_finite(bn.running_var.detach()).clamp(min=0) + eps).rsqrt()
            invstds.append(inv)
            xhats.append(((rows - _finite(bn.running_mean.detach())) * inv).abs())
        if not invstds:
            return {"xg": 0.0, "wg": 0.0, "bg": 0.0, "y_mean": 0.0, "xg_mean": 0.0}
        inv = _finite(torch.stack(invstds).max(0).values)
        # The mean itself, in the statistics dtype, is uncertain by an ulp of |mean| for any
        # implementation (torch's is one rounding order of the sum, syncbn's the merge's): the
        # output moves by up to ulp(|mean|) * |w| * invstd, grad_input by 2 |a dy| |xhat| of that.
        means = [rows.mean(0).abs()] if rows.shape[0] else []
        if bn.running_mean is not None:
            means.append(_finite(bn.running_mean.detach()).abs())
        mu = _finite(torch.stack(means).max(0).values)
        ulp = 2.0 * torch.finfo(stat_dtype(dtype_of(self.cfg.x_dtype))).eps  # a unit in the last place, at most
        r_max = max(self.cfg.r_max, 1.0) if self.cfg.kind == "renorm" else 1.0  # Batch Renorm's scale w * r
        y_mean = ulp * r_max * (mu * w * inv).max().item()
        if not grows.numel():
            return {"xg": 0.0, "wg": 0.0, "bg": 0.0, "y_mean": y_mean, "xg_mean": 0.0}
        xhat = _finite(torch.stack(xhats).max(0).values)
        g = grows.abs()
        xg = (g * w * inv).max().item()
        return {
            "xg": xg,
            "wg": (g * xhat).sum(0).max().item(),
            "bg": g.sum(0).max().item(),
            "y_mean": y_mean,
            "xg_mean": 2.0 * xg * xhat.max().item() * ulp * (mu * inv).max().item() if xhat.numel() else 0.0,
        }

    def step(self, k: int) -> Expected:
        step = self.cfg.steps[k]
        w = self.cfg.world
        xs, gs = self.data.x[k], self.data.g[k]
        outs = {}
        scales = self._natural_scales(step, xs, gs)
        # track_running_stats as this call sees it (a step's switch stays for the calls after it).
        track_now = self.cfg.track
        for earlier in self.cfg.steps[: k + 1]:
            if earlier.track is not None:
                track_now = self.cfg.track and earlier.track
        # Tensors of the parameter dtype reach the kernel: weight and bias, and the buffers (in
        # training while tracking, in eval whenever they exist).
        passes_params = self.cfg.affine or (track_now if step.train else self.cfg.track)
        # Batch Renormalization's reference is its closed form (no torch kernel to refuse): its
        # layer refuses like the others, on any non-empty batch in a group of one.
        renorm_refuses = self.cfg.kind == "renorm" and any(x.numel() for x in xs)
        if (w > 1 or renorm_refuses) and passes_params and REGIONS["torch_refused_dtypes"](self.cfg):
            # Dtypes torch's kernel refuses, in a group of several ranks: ValueError on every rank
            # (in training before any collective), also where the whole group's batch is empty
            # (torch, looking at no value, would pass; no rank can know that before the
            # collective, and in eval each rank sees its own batch only).
            return Expected(errors=["ValueError: parameter dtypes torch refuses for this input"] * w)
        if self._variance_overflows(step, xs):
            # A batch variance beyond float32's range (values ~1e19, float32 or bfloat16 inputs,
            # whose statistics are float32): torch's training
            # kernel still normalizes (its variance never leaves double); a synchronized layer
            # keeps the group's statistics in float32 (as torch's CUDA kernels do) and refuses the
            # batch with ValueError on every rank rather than normalize every value to 0.
            return Expected(errors=["ValueError: batch variance beyond float32's range"] * w)
        try:
            outs["own"] = self.own.call(step, xs, gs)
        except Exception as err:  # torch refuses this call: syncbn must raise ValueError on every rank
            return Expected(errors=[_err(err)] * w)
        errors = [_err(o) if isinstance(o, Exception) else None for o in outs["own"]]
        # torch's own error also in each memory layout the ranks use (torch's CPU kernels lose
        # precision on some: bfloat16 parameter gradients of a channel-sliced input, the
        # bfloat16 running variance of a channels-innermost input).
        extra = []
        for twin in self.twins:
            try:
                res = twin.call(step, xs, gs)
            except Exception:
                continue
            if not any(isinstance(o, Exception) for o in res):
                extra.append((res, twin.buffers()))
        outs["ref"] = self.ref.call(step, xs, gs)
        jx = _jitter({f"x{r}": x.double() for r, x in enumerate(xs)}, self.cfg.seed + 1 + k)
        jg = _jitter({f"g{r}": g.double() for r, g in enumerate(gs)}, self.cfg.seed + 1001 + k)
        outs["perm"] = self.perm.call(step, [jx[f"x{r}"] for r in range(w)], [jg[f"g{r}"] for r in range(w)])
        exp = Expected(errors=errors, scales=scales)
        for r in range(w):
            if errors[r] is not None:
                exp.ranks.append({})
                exp.extra_ranks.append({})
                continue
            exp.ranks.append({q: tuple(outs[e][r][q] for e in ("ref", "own", "perm")) for q in ("y", "xg")})
            exp.extra_ranks.append({q: [res[r][q] for res, _ in extra] for q in ("y", "xg")})
            applied = outs["own"][r].get("y_applied")
            if applied is not None:
                exp.extra_ranks[r]["y"].append(applied)
        # Parameter gradients are the group's (one call on the whole batch, or the sum of the local calls).
        for q in ("wg", "bg"):
            exp.params[q] = tuple(
                _sum_local([o for o in outs[e] if not isinstance(o, Exception)], q) for e in ("ref", "own", "perm")
            )
            exp.extra_params[q] = [_sum_local(res, q) for res, _ in extra]
        bufs = [self.ref.buffers(), self.own.buffers(), self.perm.buffers()]
        exp.buffers = {name: tuple(b[name] for b in bufs) for name in bufs[0]}
        exp.extra_buffers = {name: [b[name] for _, b in extra] for name in bufs[0]}
        return exp


def _group_stats(xs: list[Tensor]) -> Optional[tuple[Tensor, Tensor, int]]:
    """float64 per-channel mean and biased variance of the ranks' concatenated batch, and its count."""
    rows = torch.cat([_rows(x.double()) for x in xs])
    if rows.shape[0] == 0:
        return None
    mean = rows.mean(0)
    return mean, (rows - mean).pow(2).mean(0), rows.shape[0]


def _jitter(tensors: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """float64 tensors times (1 + u * 2**-52), u uniform in [-1, 1]: one ulp of rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            u = torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1
            t = t * (1 + u * 2.0**-52)
        out[name] = t
    return out


def _sum_local(per_rank: list[dict], q: str) -> Optional[Tensor]:
    """The group's parameter gradient: shared (one group call) or summed over local calls."""
    vals = [d[q] for d in per_rank]
    if not vals or all(v is None for v in vals):
        return None
    if all(v is vals[0] for v in vals):
        return vals[0]
    # Local calls (eval without running statistics): each call's gradient is its own tensor.
    return torch.stack([v.double() for v in vals if v is not None]).sum(0).to(vals[0].dtype)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class Tolerance:
    bound: float
    torch_err: float
    scale: float


def _classes(t: Tensor) -> Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    out = torch.zeros(t.shape, dtype=torch.int8)
    out[torch.isnan(t)] = 1
    out[torch.isposinf(t)] = 2
    out[torch.isneginf(t)] = 3
    return out


def compare(
    actual: Tensor,
    ref: Tensor,
    own: Optional[Tensor],
    perm: Optional[Tensor],
    dtype: torch.dtype,
    what: str,
    natural_scale: float = 0.0,
    extra: Optional[list] = None,
    mean_ulp: float = 0.0,
) -> Optional[str]:
    """Apply the tolerance rule; return a one-line description of the violation, or None.

    ``natural_scale`` (gradients): the size of the terms the result is a cancelling sum of; the
    ulp floor uses it where it exceeds ``max|ref|``. ``mean_ulp``: how far one ulp of the
    statistics' mean moves the result (outputs and input gradients), added to the bound.
    """
    a = actual.detach().to(torch.float64)
    e = ref.detach().to(torch.float64)
    if tuple(a.shape) != tuple(e.shape):
        return f"{what}: shape {tuple(a.shape)}, torch {tuple(e.shape)}"
    if a.numel() == 0:
        return None
    others = [t.detach().to(torch.float64) for t in [own, perm, *(extra or [])] if t is not None]
    finite_e = torch.isfinite(e)
    torch_err = 0.0
    for o in others:
        both = finite_e & torch.isfinite(o)
        if both.any():
            torch_err = max(torch_err, (o[both] - e[both]).abs().max().item())
    scale = e[finite_e].abs().max().item() if finite_e.any() else 0.0
    scale = max(scale, natural_scale if math.isfinite(natural_scale) else 0.0)
    bound = K * torch_err + F * torch.finfo(dtype).eps * scale + (mean_ulp if math.isfinite(mean_ulp) else 0.0)
    ca = _classes(a)
    # Non-finite in syncbn: torch (ref or own) must be non-finite alike there.
    bad_nf = ca != 0
    if bad_nf.any():
        ok = ca == _classes(e)
        if own is not None:
            ok |= ca == _classes(own.detach().to(torch.float64))
        wrong = bad_nf & ~ok
        if wrong.any():
            i = int(wrong.nonzero()[0].tolist()[0]) if wrong.dim() == 1 else tuple(wrong.nonzero()[0].tolist())
            return (
                f"{what}: non-finite {a[wrong][0].item()} at {i} where torch gives {e[wrong][0].item()}"
                f" (own dtype {own.detach().double()[wrong][0].item() if own is not None else None}),"
                f" {int(wrong.sum())} such values"
            )
    fin = ca == 0
    # Finite in syncbn where the float64 reference is non-finite: only if torch's own is finite too.
    mismatch = fin & ~finite_e
    if mismatch.any():
        own_f = torch.isfinite(own.detach().double()) if own is not None else torch.zeros_like(fin)
        if (mismatch & ~own_f).any():
            return f"{what}: finite values where torch gives non-finite ({int((mismatch & ~own_f).sum())} values)"
    check = fin & finite_e
    if not check.any():
        return None
    err = (a[check] - e[check]).abs()
    worst = err.max().item()
    if worst <= bound:
        return None
    rel = worst / scale if scale else float("inf")
    return (
        f"{what}: max error {worst:.3g} (relative {rel:.3g}) > bound {bound:.3g} "
        f"[torch's own error {torch_err:.3g}, scale {scale:.3g}, {dtype}]"
    )


def describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor{tuple(x.shape)} {x.dtype}"
    return repr(x)


def fmt_float(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3g}"
