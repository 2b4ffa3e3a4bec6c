"""The rank side of the differential harness: what each worker of the pool runs.

Every function here is called as ``fn(rank, world_size, config, data)`` inside an initialized Gloo
group (tests/harness.py). It runs syncbn and returns plain results (tensors, error strings); the
parent compares them with torch. Ranks agree after every call, through one small all_gather, on
whether any rank raised, and stop together, so that no rank goes on into a collective its peers
will never join. A rank that saw anything but a ``ValueError`` raises at the end, on every rank,
so that the harness starts a fresh group (the failed one may hold a half-done collective).
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import syncbn

from .configs import LayerConfig
from .reference import LayerData, dtype_of, layout_signature, set_layout

__all__ = ["ping", "run_layer", "run_model", "run_errors", "PoisonedGroup"]


def ping(rank: int, world: int) -> int:
    """Nothing: makes a fresh worker import this module (seconds on a loaded machine) before a
    timed call, so that the call's timeout measures the call."""
    return rank


class PoisonedGroup(RuntimeError):
    """Raised on every rank after an unexpected exception, so that the pool is restarted."""


def _grad_context(mode: str) -> Any:
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference":
        return torch.inference_mode()
    return contextlib.nullcontext()


def _clone(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.detach().clone()


def _agree(flag: bool, world: int) -> list[bool]:
    """Every rank's ``flag``: one all_gather (also the point where ranks wait for each other)."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, bool(flag))
    return [bool(v) for v in out]


def _finish(world: int, errors: list[Optional[str]]) -> None:
    """Raise on every rank (so the harness restarts the group) when the ranks' unexpected
    exceptions (anything but ValueError) differ, or one came from a collective: the group may
    hold a half-done collective. The same exception on every rank, away from the collectives,
    is reported by the parent like any other result."""
    mine = [e.split("\n")[0][:300] for e in errors if e is not None and not e.startswith("ValueError")]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    if not any(out):
        return
    comm_trouble = any("all_reduce" in e or "all_gather" in e or "timed out" in e.lower() for v in out for e in v)
    if comm_trouble or any(v != out[0] for v in out):
        detail = {r: v for r, v in enumerate(out) if v}
        tails = [e[-600:] for e in errors if e is not None and not e.startswith("ValueError")]
        raise PoisonedGroup(f"unexpected exceptions (group restarted): {detail}\n{tails[:1]}")


def build_layer(cfg: LayerConfig) -> torch.nn.Module:
    common = dict(
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        bias=cfg.bias,
        min_count=cfg.min_count,
        fallback=cfg.fallback,
        debias=cfg.debias,
        dtype=dtype_of(cfg.p_dtype),
    )
    if cfg.kind == "renorm":
        schedule = syncbn.RenormSchedule(*cfg.schedule) if cfg.schedule is not None else None
        return syncbn.SyncBatchRenorm(
            num_features=cfg.channels, r_max=cfg.r_max, d_max=cfg.d_max, schedule=schedule, **common
        )
    return syncbn.SyncBatchNorm(num_features=cfg.channels, track_running_stats=cfg.track, **common)


def run_layer(rank: int, world: int, cfg: LayerConfig, data: LayerData) -> dict:
    """Run the configuration's calls of one synchronized layer on this rank's slices.

    Returns ``{"build_error": str | None, "steps": [per call: dict]}``; a call's dict holds
    ``error`` (``"Type: message"`` or None), ``y``, ``xg``, ``wg``, ``bg`` (this rank's
    parameter gradients), the buffers after the call, and ``layout`` (the output's and torch's
    layout signature for this rank's input).
    """
    torch.manual_seed(cfg.seed)
    errors: list[Optional[str]] = []
    result: dict[str, Any] = {"build_error": None, "steps": []}
    try:
        layer = build_layer(cfg)
        with torch.no_grad():
            for name, t in data.init.items():
                dst = getattr(layer, name, None)
                if dst is not None:
                    dst.copy_(t)
    except Exception as err:
        result["build_error"] = f"{type(err).__name__}: {err}"
        errors.append(result["build_error"])
        _finish(world, errors)
        return result

    for k, step in enumerate(cfg.steps):
        rec: dict[str, Any] = {"error": None}
        try:
            layer.train(step.train)
            if step.track is not None:
                layer.track_running_stats = step.track
            want_x = step.grad in ("all", "input")
            want_p = step.grad in ("all", "params")
            for p in layer.parameters():
                p.requires_grad_(want_p)
                p.grad = None
            x = set_layout(data.x[k][rank], step.layout_of(rank)).requires_grad_(want_x)
            g = set_layout(data.g[k][rank], step.layout_of(rank))
            with _grad_context(step.grad):
                y = layer(x)
            rec["y"] = _clone(y)
            sd = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            local_ref = torch.nn.functional.batch_norm(
                x.detach(), torch.zeros(x.shape[1], dtype=sd), torch.ones(x.shape[1], dtype=sd), training=False
            )
            rec["layout"] = (layout_signature(y), layout_signature(local_ref))
            rec["requires_grad"] = y.requires_grad
            if y.requires_grad:
                y.backward(g)
            rec["xg"] = _clone(x.grad) if want_x else None
            rec["wg"] = _clone(layer.weight.grad) if layer.weight is not None else None
            rec["bg"] = _clone(layer.bias.grad) if layer.bias is not None else None
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
            if not isinstance(err, ValueError):
                rec["error"] += "\n" + traceback.format_exc()[-2500:]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            rec[name] = _clone(getattr(layer, name, None))
        result["steps"].append(rec)
        errors.append(rec["error"])
        if any(_agree(rec["error"] is not None, world)):
            break
    _finish(world, errors)
    return result


# ---------------------------------------------------------------------------------------------
# Model family
# ---------------------------------------------------------------------------------------------


def _model_step(run: Any, x: Tensor, t: Tensor, cfg: Any) -> tuple[Tensor, Tensor]:
    """One training step's forward and loss on this rank's slice (the same code as the reference)."""
    from torch.utils.checkpoint import checkpoint

    if cfg.checkpoint is None:
        y = run(x)
    else:
        y = checkpoint(run, x, use_reentrant=cfg.checkpoint == "reentrant")
    loss = (y * t).sum()
    if cfg.penalty:
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        loss = loss + (gx * gx).sum()
    return y, loss


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "grads": {n: _clone(p.grad) for n, p in model.named_parameters()},
        "buffers": {n: _clone(b) for n, b in model.named_buffers()},
    }


def run_model(rank: int, world: int, cfg: Any, state: dict, batches: list, eval_batch: Any) -> dict:
    """Convert a small torch model, train it on this rank's slices, then eval (and revert).

    ``batches[k]`` is ``(x, t)``, the whole group's batch and loss weights at step k. Returns
    per-step ``y``, ``xg``, parameter gradients and buffers by name (or ``error``), ``eval``, and
    with ``cfg.revert`` the reverted model's ``revert_eval`` and ``revert_train`` outputs.
    """
    from .models import add_hooks, build_model

    out: dict[str, Any] = {"setup_error": None, "steps": [], "eval": None}
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, cfg.width, cfg.momentum, cfg.seed)
        model.load_state_dict(state)
        if cfg.hooks == "before":
            add_hooks(model)
        model = syncbn.convert_sync_bn(model)
        if cfg.hooks == "after":
            add_hooks(model)
        run: Any = model
        if cfg.fx:
            run = torch.fx.symbolic_trace(model)
        if cfg.wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            run = DDP(run)
        backend = getattr(cfg, "backend", None)
        if backend is not None:
            import torch._dynamo as dynamo

            dynamo.reset()
            run = torch.compile(run, backend=backend, dynamic=cfg.dynamic)
    except Exception as err:
        out["setup_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    if _stop(out["setup_error"], world):
        return out

    sizes_lo = lambda sizes: (sum(sizes[:rank]), sum(sizes[: rank + 1]))  # noqa: E731
    for k, (x_full, t_full) in enumerate(batches):
        lo, hi = sizes_lo(cfg.sizes[k])
        rec: dict[str, Any] = {"error": None}
        try:
            run.train()
            x = x_full[lo:hi].clone().requires_grad_()
            y, loss = _model_step(run, x, t_full[lo:hi], cfg)
            loss.backward()
            rec["y"] = _clone(y)
            rec["xg"] = _clone(x.grad)
            rec.update(_snapshot(model))
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
        model.zero_grad(set_to_none=True)
        out["steps"].append(rec)
        if _stop(rec["error"], world):
            return out

    lo, hi = sizes_lo(cfg.sizes[0])
    try:
        run.eval()
        with torch.no_grad():
            out["eval"] = _clone(run(eval_batch[lo:hi]))
        if cfg.revert:
            rev = syncbn.revert_sync_bn(model)
            rev.eval()
            with torch.no_grad():
                out["revert_eval"] = _clone(rev(eval_batch[lo:hi]))
            rev.train()
            with torch.no_grad():
                # A reverted model is torch's: local statistics, no communication.
                out["revert_train"] = _clone(rev(eval_batch[lo:hi])) if hi - lo >= 2 else None
    except Exception as err:
        out["eval_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    _stop(out.get("eval_error"), world)
    return out


def _stop(error: Optional[str], world: int) -> bool:
    """Whether any rank raised; raises PoisonedGroup on every rank when only some did, or when
    their errors differ (a half-done collective may be left behind)."""
    first = None if error is None else error.split("\n")[0][:300]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, first)
    if all(v is None for v in out):
        return False
    if len(set(out)) > 1:
        raise PoisonedGroup(f"ranks disagree (group restarted): {dict(enumerate(out))}")
    return True


# ---------------------------------------------------------------------------------------------
# Error family
# ---------------------------------------------------------------------------------------------


def run_errors(rank: int, world: int, cfg: Any) -> Optional[str]:
    """One training (or eval) call with a bad input on ``cfg.bad`` ranks; returns this rank's error."""
    c = 3
    syncbn.set_debug(cfg.debug)
    try:
        layer = syncbn.SyncBatchNorm(c, eps=0.0 if cfg.kind == "eps" else 1e-5).double()
        layer.train(cfg.train)
        x = torch.randn(2, c, 4, dtype=torch.float64)
        if rank in cfg.bad:
            if cfg.kind == "channels":
                x = torch.randn(2, c + 1, 4, dtype=torch.float64)
            elif cfg.kind == "rank1":
                x = torch.randn(c, dtype=torch.float64)
            elif cfg.kind == "integer":
                x = torch.randint(0, 5, (2, c, 4))
        try:
            y = layer(x.requires_grad_() if x.is_floating_point() else x)
            y.sum().backward()
            return None
        except Exception as err:
            return f"{type(err).__name__}: {err}"
    finally:
        syncbn.set_debug(None)
