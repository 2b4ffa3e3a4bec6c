"""Run one configuration on its ranks and judge it against torch (the parent side).

``check_layer(config)`` is what the hypothesis tests and the regression tests call. It raises an
``AssertionError`` whose message starts with the configuration's repr (paste it into a
regression test) and lists every difference, call by call and rank by rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..harness import DistributedTestError, run_on_ranks
from .configs import LayerConfig
from .reference import Expected, LayerReference, compare, dtype_of, layer_data
from .ranks import ping, run_layer

__all__ = ["check_layer", "layer_problems", "check_model", "model_problems", "EAGER_TIMEOUT_S"]

# A call of a few tiny tensors takes milliseconds; a configuration that has not finished after
# this long left a rank waiting in a collective (Gloo's own timeout, 60 s, would come later).
EAGER_TIMEOUT_S = 45.0
# torch.compile on a loaded 2-core machine: inductor's C++ builds take tens of seconds per graph.
COMPILE_TIMEOUT_S = 420.0


def _fail(config: Any, problems: list[str]) -> None:
    lines = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise AssertionError(f"syncbn differs from torch for\n{config!r}\n  {lines}{more}")


def run_config(fn: Any, config: Any, *args: Any, timeout: float) -> tuple[Optional[list], Optional[str]]:
    """``run_on_ranks``; a failure or hang comes back as its message (the harness restarts the pool)."""
    try:
        run_on_ranks(config.world, ping)  # the harness's default timeout covers a cold start
        return run_on_ranks(config.world, fn, config, *args, timeout=timeout), None
    except DistributedTestError as err:
        text = str(err)
        if "during start" in text or "failed to start" in text:
            return None, f"the worker pool did not start (the machine's load?), nothing was tested:\n{text[-2000:]}"
        if "timed out" in text:
            return None, f"a rank was left waiting (no result after {timeout:.0f} s):\n{text[-3000:]}"
        marker = "PoisonedGroup: "
        if marker in text:  # every rank raised it with the same summary: show it once
            start = text.index(marker) + len(marker)
            end = text.find("\n--- rank", start)
            return None, "ranks raised " + text[start : end if end > 0 else None][:3000]
        return None, f"ranks failed:\n{text[-4000:]}"


def layer_problems(cfg: LayerConfig, timeout: float = EAGER_TIMEOUT_S) -> list[str]:
    """Every difference between syncbn and torch for ``cfg`` (empty: it holds)."""
    data = layer_data(cfg)
    results, failure = run_config(run_layer, cfg, data, timeout=timeout)
    if failure is not None:
        return [failure]
    problems: list[str] = []
    build = [r["build_error"] for r in results]
    if any(build):
        return [f"constructing the layer raised where torch's layer builds: {build}"]
    ref = LayerReference(cfg, data)
    xd, pd = dtype_of(cfg.x_dtype), dtype_of(cfg.p_dtype)
    for k in range(len(cfg.steps)):
        exp = ref.step(k)
        acts = [r["steps"][k] if k < len(r["steps"]) else None for r in results]
        problems += _compare_step(cfg, k, exp, acts, xd, pd)
        if problems or exp.any_error or any(a is None or a["error"] for a in acts):
            break
    return problems


def _compare_step(cfg: LayerConfig, k: int, exp: Expected, acts: list, xd: torch.dtype, pd: torch.dtype) -> list[str]:
    out: list[str] = []
    at = f"call {k} ({'train' if cfg.steps[k].train else 'eval'})"
    for r, act in enumerate(acts):
        want = exp.errors[r]
        if act is None:
            if want is None:
                out.append(f"{at} rank {r}: stopped because a peer raised")
            continue
        got = act["error"]
        if want is not None:
            if got is None:
                out.append(f"{at} rank {r}: torch raises ({want[:150]}), syncbn returned a result")
            elif not got.startswith("ValueError"):
                out.append(f"{at} rank {r}: torch raises ({want[:150]}), syncbn raised {got[:300]}")
            continue
        if got is not None:
            out.append(f"{at} rank {r}: syncbn raised {got[:400]} where torch computes")
            continue
        y_ref, y_own, y_perm = exp.ranks[r]["y"]
        if act["y"].dtype != y_own.dtype:
            out.append(f"{at} rank {r}: output dtype {act['y'].dtype}, torch {y_own.dtype}")
        mine, torchs = act["layout"]
        if mine != torchs and act["y"].numel():
            out.append(f"{at} rank {r}: output layout (dims by stride) {mine}, torch {torchs}")
        msg = compare(
            act["y"], y_ref, y_own, y_perm, xd, f"{at} rank {r} output", extra=exp.extra_ranks[r]["y"],
            mean_ulp=exp.scales.get("y_mean", 0.0),
        )
        if msg:
            out.append(msg)
        xg_ref, xg_own, xg_perm = exp.ranks[r]["xg"]
        if (act["xg"] is None) != (xg_ref is None):
            out.append(f"{at} rank {r}: grad_input {'missing' if act['xg'] is None else 'present'}, torch's is not")
        elif xg_ref is not None:
            msg = compare(
                act["xg"], xg_ref, xg_own, xg_perm, xd, f"{at} rank {r} grad_input", exp.scales.get("xg", 0.0),
                extra=exp.extra_ranks[r]["xg"], mean_ulp=exp.scales.get("xg_mean", 0.0),
            )
            if msg:
                out.append(msg)
        for name in ("running_mean", "running_var"):
            b_ref, b_own, b_perm = exp.buffers[name]
            if (act[name] is None) != (b_ref is None):
                out.append(f"{at} rank {r}: {name} {'missing' if act[name] is None else 'present'}")
            elif b_ref is not None:
                msg = compare(act[name], b_ref, b_own, b_perm, pd, f"{at} rank {r} {name}", extra=exp.extra_buffers[name])
                if msg:
                    out.append(msg)
        nbt = exp.buffers["num_batches_tracked"][0]
        if (act["num_batches_tracked"] is None) != (nbt is None) or (
            nbt is not None and int(act["num_batches_tracked"]) != int(nbt)
        ):
            out.append(f"{at} rank {r}: num_batches_tracked {act['num_batches_tracked']}, torch {nbt}")
    if any(a is None or a["error"] for a in acts) or exp.any_error:
        return out
    for q, name in (("wg", "grad_weight"), ("bg", "grad_bias")):
        q_ref, q_own, q_perm = exp.params[q]
        mine = [a[q] for a in acts]
        if q_ref is None:
            if any(m is not None for m in mine):
                out.append(f"{at}: {name} present, torch gives none")
            continue
        if any(m is None for m in mine):
            out.append(f"{at}: {name} missing on ranks {[r for r, m in enumerate(mine) if m is None]}")
            continue
        total = torch.stack([m.double() for m in mine]).sum(0)
        msg = compare(total, q_ref, q_own, q_perm, pd, f"{at} group's {name}", exp.scales.get(q, 0.0), extra=exp.extra_params[q])
        if msg:
            out.append(msg)
    return out


def check_layer(cfg: LayerConfig, timeout: float = EAGER_TIMEOUT_S) -> None:
    problems = layer_problems(cfg, timeout)
    if problems:
        _fail(cfg, problems)


# ---------------------------------------------------------------------------------------------
# Model family: float64 models; tolerance MODEL_RTOL relative to max(1, max|expected|)
# ---------------------------------------------------------------------------------------------

MODEL_RTOL = 1e-9


def _close(actual: Any, expected: Any, what: str) -> Optional[str]:
    if actual is None or expected is None:
        if (actual is None) != (expected is None):
            return f"{what}: {'missing' if actual is None else 'present'} where torch's is {'present' if actual is None else 'missing'}"
        return None
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return f"{what}: shape {tuple(a.shape)}, torch {tuple(e.shape)}"
    if a.numel() == 0:
        return None
    if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
        return f"{what}: non-finite values differ from torch's"
    fin = torch.isfinite(e)
    err = (a[fin] - e[fin]).abs().max().item() if fin.any() else 0.0
    scale = max(1.0, e[fin].abs().max().item() if fin.any() else 0.0)
    if err > MODEL_RTOL * scale:
        return f"{what}: max error {err:.3g} (torch's max |value| {scale:.3g})"
    return None


def _model_reference(cfg: Any, state: dict, batches: list, eval_batch: Any) -> dict:
    """The same steps on the float64 torch model, single process, whole batch."""
    from .models import add_hooks, build_model
    from .ranks import _model_step

    ref = build_model(cfg.model, cfg.width, cfg.momentum, cfg.seed)
    ref.load_state_dict(state)
    if cfg.hooks is not None:
        add_hooks(ref)
    # torch's layers count a checkpointed forward twice (the recomputation updates the running
    # statistics again); syncbn's contract is once: the reference runs without checkpointing.
    plain = dataclasses.replace(cfg, checkpoint=None)
    out: dict[str, Any] = {"steps": []}
    for k, (x_full, t_full) in enumerate(batches):
        rec: dict[str, Any] = {"error": None}
        try:
            ref.train()
            x = x_full.clone().requires_grad_()
            y, loss = _model_step(ref, x, t_full, plain)
            loss.backward()
            rec.update(
                y=y.detach(),
                xg=x.grad,
                grads={n: (None if p.grad is None else p.grad.clone()) for n, p in ref.named_parameters()},
                buffers={n: b.clone() for n, b in ref.named_buffers()},
            )
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"
        ref.zero_grad(set_to_none=True)
        out["steps"].append(rec)
        if rec["error"]:
            return out
    ref.eval()
    with torch.no_grad():
        out["eval"] = ref(eval_batch)
    out["model"] = ref
    return out


def model_problems(cfg: Any, timeout: Optional[float] = None) -> list[str]:
    from .models import build_model, model_batch
    from .ranks import run_model

    state = build_model(cfg.model, cfg.width, cfg.momentum, cfg.seed).state_dict()
    batches = [model_batch(cfg.model, cfg.width, sizes, cfg.seed + 1 + k) for k, sizes in enumerate(cfg.sizes)]
    eval_batch = model_batch(cfg.model, cfg.width, cfg.sizes[0], cfg.seed + 999)[0]
    if timeout is None:
        timeout = COMPILE_TIMEOUT_S if getattr(cfg, "backend", None) else EAGER_TIMEOUT_S
    results, failure = run_config(run_model, cfg, state, batches, eval_batch, timeout=timeout)
    if failure is not None:
        return [failure]
    exp = _model_reference(cfg, state, batches, eval_batch)
    problems: list[str] = []
    setup = [r["setup_error"] for r in results]
    if any(setup):
        return [f"converting/wrapping the model raised on every rank: {setup[0][:1500]}"]
    for k, e in enumerate(exp["steps"]):
        acts = [r["steps"][k] if k < len(r["steps"]) else None for r in results]
        at = f"step {k}"
        if e["error"] is not None:
            if not all(a is not None and a["error"] for a in acts):
                problems.append(f"{at}: torch raises ({e['error'][:200]}); syncbn ranks: {[None if a is None else (a['error'] or 'ok')[:200] for a in acts]}")
            return problems
        if any(a is None for a in acts):
            problems.append(f"{at}: some ranks stopped early")
            return problems
        errs = [a["error"] for a in acts]
        if any(errs):
            if cfg.penalty and all(errs):
                # Second-order gradients: a clear error on every rank is acceptable.
                return problems
            problems.append(f"{at}: syncbn raised where torch computes: {errs[0] or errs[-1]}"[:2000])
            return problems
        sizes = cfg.sizes[k]
        for r, a in enumerate(acts):
            lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
            for q in ("y", "xg"):
                msg = _close(a[q], e[q][lo:hi], f"{at} rank {r} {'output' if q == 'y' else 'grad_input'}")
                if msg:
                    problems.append(msg)
            for name, b in e["buffers"].items():
                msg = _close(a["buffers"].get(name), b, f"{at} rank {r} buffer {name}")
                if msg:
                    problems.append(msg)
        for name, g in e["grads"].items():
            mine = [a["grads"].get(name) for a in acts]
            if g is None or all(m is None for m in mine):
                if (g is None) != all(m is None for m in mine):
                    problems.append(f"{at}: grad of {name} {'present' if g is None else 'missing'} (torch: {'none' if g is None else 'a gradient'})")
                continue
            if any(m is None for m in mine):
                problems.append(f"{at}: grad of {name} missing on some ranks")
                continue
            # Without DDP each rank holds its own contribution (sum them); DDP averages them.
            total = torch.stack([m.double() for m in mine]).sum(0)
            if cfg.wrap == "ddp":
                total = mine[0].double() * cfg.world
            msg = _close(total, g, f"{at} grad of {name}")
            if msg:
                problems.append(msg)
        if problems:
            return problems
    sizes = cfg.sizes[0]
    ref_model = exp["model"]
    for r, res in enumerate(results):
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        if res.get("eval_error"):
            problems.append(f"eval rank {r}: raised {res['eval_error'][:1500]}")
            continue
        msg = _close(res["eval"], exp["eval"][lo:hi], f"eval rank {r} output")
        if msg:
            problems.append(msg)
        if cfg.revert:
            msg = _close(res["revert_eval"], exp["eval"][lo:hi], f"reverted model, eval, rank {r}")
            if msg:
                problems.append(msg)
            if hi - lo >= 2:
                import copy

                local = copy.deepcopy(ref_model).train()
                with torch.no_grad():
                    want = local(eval_batch[lo:hi])
                msg = _close(res["revert_train"], want, f"reverted model, train (local statistics), rank {r}")
                if msg:
                    problems.append(msg)
    return problems


def check_model(cfg: Any, timeout: Optional[float] = None) -> None:
    problems = model_problems(cfg, timeout)
    if problems:
        _fail(cfg, problems)


# ---------------------------------------------------------------------------------------------
# Error family
# ---------------------------------------------------------------------------------------------

# A call that raises before its collective returns in milliseconds: no answer after this long
# means a rank was left waiting.
ERROR_TIMEOUT_S = 20.0


def error_problems(cfg: Any, timeout: float = ERROR_TIMEOUT_S) -> list[str]:
    from .ranks import run_errors

    results, failure = run_config(run_errors, cfg, timeout=timeout)
    if failure is not None:
        return [failure]
    synced = cfg.train and cfg.world > 1
    problems = []
    for r, e in enumerate(results):
        if synced:
            want = True  # the group fails together
        elif cfg.kind == "eps":
            want = cfg.train  # eval with running statistics takes eps=0 (torch does)
        else:
            want = r in cfg.bad  # eval never communicates: each rank is torch on its own input
        if want and (e is None or not e.startswith("ValueError")):
            problems.append(f"expected ValueError on rank {r}{' (every rank)' if synced else ''}; got {e or 'no error'}"[:600])
        elif not want and e is not None:
            problems.append(f"rank {r} raised {e[:400]} where torch computes")
    return problems


def check_errors(cfg: Any, timeout: float = ERROR_TIMEOUT_S) -> None:
    problems = error_problems(cfg, timeout)
    if problems:
        _fail(cfg, problems)
