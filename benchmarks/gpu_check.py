"""One GPU check for syncbn: correctness of the CUDA path, and per-layer timings against torch.

Run it on a machine with a CUDA build of torch, from a checkout::

    python benchmarks/gpu_check.py                 # installs this checkout (pip -e, no deps), then checks
    python benchmarks/gpu_check.py --out DIR       # also writes DIR/gpu_check.json and DIR/gpu_check.txt
    python benchmarks/gpu_check.py --cpu-emulated  # CPU, tiny shapes, CUDA kernels emulated (CI; alias --dry-run)

``--cpu-emulated`` runs every case on CPU tensors routed through the fused-kernel path, with
``tests/emulated_kernels.py`` standing in for torch's CUDA kernels (they check what the kernels
check, and like them have no fake implementation): so CI runs the script's own logic, each case
on the path it checks. Only a GPU run checks the kernels themselves; on CPU the timings measure
nothing.

What it checks, each case against single-process float64 torch BatchNorm on the concatenated batch
(Batch Renorm against its closed form): outputs, grad_input, the ranks' summed grad_weight and
grad_bias, running statistics after every step (identical on every rank), and eval outputs, for
float64/float32/float16/bfloat16, NCHW and channels_last, 2-D to 5-D inputs, uneven and empty ranks,
no affine, ``momentum=None`` and ``SyncBatchRenorm``. It runs them

- on the synchronized path with world size 2 on one GPU through Gloo with CUDA tensors;
- with NCCL and world size 1, the synchronized path forced (NCCL refuses two ranks on one GPU);
- with no process group, where ``SyncBatchNorm`` must equal ``nn.BatchNorm`` bit for bit;

and, inside both groups (so on the synchronized path), checks that it launches exactly torch's
four fused kernels per step, and that a converted model compiled with ``fullgraph=True`` equals
eager: with static shapes (on CUDA with NCCL through ``mode="reduce-overhead"``, CUDA graphs,
reporting whether inductor captured them) and with ``dynamic=True`` and a batch size that changes
every step (``aot_eager``: the fused kernels' fake implementations). It counts the launches of
one synchronized layer's forward and backward against torch's own ``SyncBatchNorm`` Function
(``benchmarks/launches.py``; reported, not counted).

Then it times forward+backward of one layer on ResNet-50 shapes (CUDA events, implementations
interleaved, medians and median ratios): ``nn.BatchNorm2d``; syncbn without a group; syncbn's
synchronized path with communication left out; and torch's own SyncBatchNorm kernel sequence
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``,
``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``) with communication left out. It
reports the bandwidth achieved (8 passes over the activation per step) against a device-to-device
copy of the same bytes and against the GPU's peak. It ends with one line ``N passed, M failed``
(correctness cases; the speed targets are reported, not counted) and exits non-zero on a failure.
The whole run takes a few minutes on one GPU (compilation included); ``--out`` keeps its table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["main", "CASES", "run_case", "check_kernels", "check_compiled", "emulation"]

# ResNet-50's batch-norm shapes at 32 images per GPU (224x224 input).
RESNET50_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
DRY_SHAPES = [(4, 8, 6, 6), (4, 16, 3, 3)]

_TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 2e-2, "bfloat16": 6e-2}

# One correctness case: dtype, per-sample features (C, *spatial), per-rank batch sizes (None: 3 each),
# channels_last, affine, momentum, renorm (r_max, d_max) or None.
CASES: list[dict[str, Any]] = (
    [{"dtype": dt, "features": (6, 5, 5)} for dt in ("float64", "float32", "float16", "bfloat16")]
    + [{"dtype": dt, "features": (6, 5, 5), "channels_last": True} for dt in ("float32", "float16", "bfloat16")]
    + [
        {"dtype": "float32", "features": (6,)},
        {"dtype": "float32", "features": (6, 7)},
        {"dtype": "float32", "features": (3, 4, 5, 6)},
        {"dtype": "bfloat16", "features": (3, 4, 5, 6), "channels_last": True},
        {"dtype": "float16", "features": (6,)},
        {"dtype": "float32", "features": (6, 5, 5), "sizes": (1, 6)},
        {"dtype": "float32", "features": (6, 5, 5), "sizes": (0, 4)},
        {"dtype": "float16", "features": (6, 5, 5), "sizes": (5, 0), "channels_last": True},
        {"dtype": "float32", "features": (6, 5, 5), "affine": False},
        {"dtype": "float32", "features": (6, 5, 5), "momentum": None},
        {"dtype": "float64", "features": (6, 5, 5), "renorm": (1.5, 0.7)},
        {"dtype": "float32", "features": (6, 5, 5), "renorm": (1.5, 0.7), "sizes": (2, 4)},
        {"dtype": "bfloat16", "features": (6, 5, 5), "renorm": (1.5, 0.7), "channels_last": True},
        {"dtype": "float32", "features": (6, 5, 5), "renorm": (1.5, 0.7), "affine": False, "sizes": (0, 4)},
    ]
)


def _case_name(case: dict[str, Any]) -> str:
    parts = [case["dtype"], "x".join(map(str, (case.get("sizes") or ("N",)) + tuple(case["features"])))]
    parts += [k for k in ("channels_last",) if case.get(k)]
    if case.get("affine") is False:
        parts.append("no-affine")
    if "momentum" in case and case["momentum"] is None:
        parts.append("momentum=None")
    if case.get("renorm"):
        parts.append("renorm r_max=%g d_max=%g" % case["renorm"])
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Setup


def _install(skip: bool) -> str:
    """Install this checkout into the running python (``pip install --no-deps -e``), best effort."""
    if skip:
        return "skipped (--no-install)"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ROOT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"pip install failed ({err}); using the checkout through sys.path"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return f"pip install failed ({tail[0]}); using the checkout through sys.path"
    return "pip install --no-deps -e . done"


def _describe(device: str, install_note: str) -> dict[str, Any]:
    import syncbn

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "syncbn": f"{syncbn.__version__} from {os.path.dirname(syncbn.__file__)}",
        "install": install_note,
        "device": device,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ----------------------------------------------------------------------------------------------
# Correctness: one case on one rank


def _reference(
    full: torch.Tensor, state: dict[str, Any], case: dict[str, Any], step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float64 output of the case's layer on the whole batch, and the running statistics after it."""
    c = full.shape[1]
    momentum = case.get("momentum", 0.1)
    affine = case.get("affine", True)
    rm, rv = state["running_mean"], state["running_var"]
    w = state["weight"] if affine else None
    b = state["bias"] if affine else None
    factor = momentum if momentum is not None else 1.0 / (step + 1)
    if not case.get("renorm"):
        # torch's own batch norm, single process, on the whole batch (updates rm/rv in place).
        rm, rv = rm.clone(), rv.clone()
        y = F.batch_norm(full, rm, rv, w, b, True, factor, 1e-5)
        return y, {"running_mean": rm, "running_var": rv}
    # Batch Renormalization's closed form (Ioffe 2017): r and d are constants for autograd.
    r_max, d_max = case["renorm"]
    eps = 1e-5
    dims = [0] + list(range(2, full.dim()))
    view = (1, -1) + (1,) * (full.dim() - 2)
    mu, var = full.mean(dims), full.var(dims, unbiased=False)
    sigma_b, sigma = (var + eps).sqrt(), (rv + eps).sqrt()
    r = (sigma_b.detach() / sigma).clamp(1 / r_max, r_max)
    d = ((mu.detach() - rm) / sigma).clamp(-d_max, d_max)
    y = (full - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
    if affine:
        y = y * w.view(view) + b.view(view)
    n = full.numel() // c
    with torch.no_grad():
        new_rm = rm + factor * (mu - rm)
        new_rv = rv + factor * (var * n / (n - 1) - rv)
    return y, {"running_mean": new_rm, "running_var": new_rv}


def _max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max(1, max|e|)``; NaN and shape mismatches count as infinitely wrong."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return math.inf
    if a.numel() == 0:
        return 0.0
    return (a - e).abs().max().item() / max(1.0, e.abs().max().item())


def _sum_over_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    t = t.detach().cpu().double().clone()
    if world > 1:
        dist.all_reduce(t)
    return t


def run_case(case: dict[str, Any], rank: int, world: int, device: str, steps: int = 2) -> dict[str, Any]:
    """Train ``steps`` steps of the case's syncbn layer on this rank's slice; return the errors.

    Every rank draws the same full batch from the same seed and keeps its slice; the errors are
    relative to the float64 reference (see :func:`_max_err`).
    """
    import syncbn

    dt = getattr(torch, case["dtype"])
    features = tuple(case["features"])
    c = features[0]
    sizes = list(case.get("sizes") or (3,) * world)
    if len(sizes) != world:  # world size 1: the whole batch on one rank
        sizes = [sum(sizes)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    affine = case.get("affine", True)
    momentum = case.get("momentum", 0.1)
    gen = torch.Generator().manual_seed(7)
    state = {
        "weight": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(c, generator=gen, dtype=torch.float64) * 0.1,
        "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
        "num_batches_tracked": torch.tensor(0),
    }
    if case.get("renorm"):
        layer = syncbn.SyncBatchRenorm(c, momentum=momentum, affine=affine, r_max=case["renorm"][0], d_max=case["renorm"][1])
    else:
        layer = syncbn.SyncBatchNorm(c, momentum=momentum, affine=affine)
    layer = layer.to(device=device, dtype=torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)
    layer.load_state_dict({k: v for k, v in state.items() if k in layer.state_dict()})
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(features) + 1)
    errors: dict[str, float] = {}

    def note(what: str, err: float) -> None:
        errors[what] = max(errors.get(what, 0.0), err)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        full = (torch.randn(sum(sizes), *features, generator=gen, dtype=torch.float64) * 2 + 1).to(dt).double()
        local = full[lo:hi].to(device=device, dtype=dt)
        if case.get("channels_last") and fmt is not None:
            local = local.contiguous(memory_format=fmt)
        return full, local

    for step in range(steps):
        full, local = batch()
        full.requires_grad_()
        local.requires_grad_()
        ref_state = {k: v.clone() for k, v in state.items()}
        ref_w = ref_state["weight"].requires_grad_()
        ref_b = ref_state["bias"].requires_grad_()
        y_ref, new_stats = _reference(full, ref_state, case, step)
        y = layer(local)
        grad = torch.randn(full.shape, generator=gen, dtype=torch.float64)
        y.backward(grad[lo:hi].to(device=device, dtype=dt))
        y_ref.backward(grad)
        note("output", _max_err(y, y_ref[lo:hi]))
        if y.dtype != dt or (case.get("channels_last") and fmt is not None and hi > lo and not y.is_contiguous(memory_format=fmt)):
            note("output dtype/layout", math.inf)
        note("grad_input", _max_err(local.grad, full.grad[lo:hi]))
        if affine:
            ref_gw = ref_w.grad if ref_w.grad is not None else torch.zeros_like(ref_w)
            ref_gb = ref_b.grad if ref_b.grad is not None else torch.zeros_like(ref_b)
            note("grad_weight", _max_err(_sum_over_ranks(layer.weight.grad, world), ref_gw))
            note("grad_bias", _max_err(_sum_over_ranks(layer.bias.grad, world), ref_gb))
            layer.zero_grad()
        for key in ("running_mean", "running_var"):
            note(key, _max_err(getattr(layer, key), new_stats[key]))
            state[key] = new_stats[key].detach()
            mine = getattr(layer, key).detach().cpu().double()
            if world > 1:
                gathered = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(gathered, mine)
                if not all(torch.equal(g, mine) for g in gathered):
                    note(f"{key} identical on all ranks", math.inf)
        state["num_batches_tracked"] += 1
    layer.eval()
    full, local = batch()
    with torch.no_grad():
        expected = F.batch_norm(
            full, state["running_mean"], state["running_var"],
            state["weight"] if affine else None, state["bias"] if affine else None, False, 0.0, 1e-5,
        )
        note("eval output", _max_err(layer(local), expected[lo:hi]))
    tol = _TOL[case["dtype"]]
    failed = {k: v for k, v in errors.items() if not v <= tol}
    return {"case": _case_name(case), "errors": errors, "tol": tol, "ok": not failed, "failed": sorted(failed)}


def emulation(emulated: bool) -> dict[str, Any]:
    """The ``syncbn._config.testing`` fields of a mode: CPU tensors through the emulated kernels, or nothing."""
    if not emulated:
        return {}
    from tests import emulated_kernels

    return {"fused_device_types": ("cpu",), "kernels": emulated_kernels}


class _CountingKernels:
    """Delegates to the kernels in force (torch, or the emulations) and counts the fused kernels syncbn calls."""

    def __init__(self, base: Any) -> None:
        self.base = torch if base is None else base
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.base, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return call


_FOUR = ("batch_norm_update_stats", "batch_norm_elemt", "batch_norm_backward_reduce", "batch_norm_backward_elemt")


def check_kernels(device: str) -> dict[str, Any]:
    """Two synchronized steps launch each of torch's four fused kernels exactly twice, and nothing else.

    Runs inside a phase's process group, where the layer takes the synchronized path (a group of
    two ranks, or one with the synchronized path forced).
    """
    import syncbn
    from syncbn import _config

    counting = _CountingKernels(_config.current().kernels)
    with _config.testing(kernels=counting):
        layer = syncbn.SyncBatchNorm(8).to(device)
        x = torch.randn(4, 8, 5, 5, device=device, requires_grad=True)
        for _ in range(2):
            layer(x).sum().backward()
    expected = {k: 2 for k in _FOUR}
    ok = counting.calls == expected
    return {"case": "fused kernels launched per step", "errors": {"calls": counting.calls}, "ok": ok,
            "failed": [] if ok else [f"got {counting.calls}, expected {expected}"]}


def check_no_group(device: str) -> list[dict[str, Any]]:
    """Without a process group SyncBatchNorm equals nn.BatchNorm2d bit for bit (training and eval)."""
    import syncbn

    out = []
    for dtype, cl in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True), (torch.float16, False)):
        torch.manual_seed(0)
        ref = nn.BatchNorm2d(16).to(device)
        dut = syncbn.SyncBatchNorm(16).to(device)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        dut.load_state_dict(ref.state_dict())
        x = torch.randn(8, 16, 9, 9, device=device, dtype=dtype) * 3 + 1
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        mismatches = []
        for step in range(2):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ref(xa), dut(xb)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            pairs = [("output", ya, yb), ("grad_input", xa.grad, xb.grad), ("grad_weight", ref.weight.grad, dut.weight.grad),
                     ("grad_bias", ref.bias.grad, dut.bias.grad), ("running_mean", ref.running_mean, dut.running_mean),
                     ("running_var", ref.running_var, dut.running_var)]
            mismatches += [f"step {step} {k}" for k, a, b in pairs if not torch.equal(a, b)]
        ref.eval()
        dut.eval()
        with torch.no_grad():
            if not torch.equal(ref(x), dut(x)):
                mismatches.append("eval output")
        name = f"no group equals nn.BatchNorm2d bit for bit: {str(dtype)[6:]}{' channels_last' if cl else ''}"
        out.append({"case": name, "errors": {}, "ok": not mismatches, "failed": mismatches})
    return out


def check_compiled(device: str, world: int, dynamic: bool = False) -> dict[str, Any]:
    """A converted conv net under torch.compile(fullgraph=True) equals eager, step by step.

    Static shapes: on CUDA with NCCL it compiles with ``mode="reduce-overhead"`` (inductor with
    CUDA graphs: the synchronized forward and backward have no host read, so they can be
    captured) and reports whether inductor captured or skipped the graphs; elsewhere (CPU, or
    Gloo, whose collectives cannot be captured) with ``aot_eager``. ``dynamic=True``: ``aot_eager``
    with dynamic shapes and a batch size that changes every step (and differs between ranks), which
    traces the fused kernels with symbolic shapes: only their fake implementations make that work.
    """
    import copy

    import torch._dynamo
    import syncbn

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: count this case's graphs only
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
    )
    eager = syncbn.convert_sync_bn(net).to(device)
    model = copy.deepcopy(eager)
    graphs = device == "cuda" and dist.get_backend() == "nccl" and not dynamic
    kwargs: dict[str, Any] = {"mode": "reduce-overhead"} if graphs else {"backend": "aot_eager"}
    if dynamic:
        kwargs["dynamic"] = True
    compiled = torch.compile(model, fullgraph=True, **kwargs)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(11 + rank)
    errors: dict[str, float] = {}
    # Dynamic: first batches 5 and 6, unlike the input's other sizes (dynamo's duck sizing would
    # tie a batch of 3 or 8 to the channels or the image size and specialize it).
    sizes = [5, 7, 2, 9, 4] if dynamic else [4] * 5
    for step, n in enumerate(sizes):
        x = torch.randn(n + (rank if dynamic else 0), 3, 8, 8, generator=gen).to(device)
        ye, yc = eager(x), compiled(x)
        errors["output"] = max(errors.get("output", 0.0), _max_err(yc, ye))
        ye.square().sum().backward()
        yc.square().sum().backward()
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            errors["grads"] = max(errors.get("grads", 0.0), _max_err(q.grad, p.grad))
        for (name, b), c in zip(eager.named_buffers(), model.buffers()):
            if b.is_floating_point():
                errors["running stats"] = max(errors.get("running stats", 0.0), _max_err(c, b))
            elif not torch.equal(b, c):
                errors["num_batches_tracked"] = math.inf
        eager.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    skips = dict(torch._dynamo.utils.counters["inductor"]) if graphs else {}
    failed = [k for k, v in errors.items() if not v <= 1e-4]
    how = "reduce-overhead (CUDA graphs)" if graphs else "aot_eager"
    captured = ""
    if graphs:
        skipped = {k: v for k, v in skips.items() if "skip" in k}
        captured = f", CUDA graphs {'skipped: ' + str(skipped) if skipped else 'used'}"
    if dynamic:
        how += ", dynamic shapes, batch " + "/".join(str(n) for n in sizes)
        frames = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
        captured += f", {frames} graph{'s' if frames != 1 else ''}"
        if frames != 1:
            failed.append(f"{frames} graphs: recompiled for another batch size")
    return {"case": f"compiled fullgraph, {how}, equals eager{captured}", "errors": errors, "tol": 1e-4,
            "ok": not failed, "failed": failed}


# ----------------------------------------------------------------------------------------------
# Correctness: processes


def _phase_worker(rank: int, world: int, store_path: str, args: dict[str, Any], out_path: str) -> None:
    device = args["device"]
    backend = args["backend"]
    if device == "cuda":
        torch.cuda.set_device(0)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=args["timeout"]))
    from syncbn import _config

    seam = _config.testing(always_sync=args["force_sync"], **emulation(args["emulated"]))
    seam.__enter__()
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (_case_name(case), lambda case=case: run_case(case, rank, world, device)) for case in CASES
    ]
    checks += [
        ("fused kernels launched per step", lambda: check_kernels(device)),
        ("compiled fullgraph equals eager", lambda: check_compiled(device, world)),
        ("compiled fullgraph, dynamic shapes, equals eager", lambda: check_compiled(device, world, dynamic=True)),
    ]
    results = []
    for name, check in checks:
        start = time.time()
        try:
            res = check()
        except Exception as err:  # a failing case is reported, the next one still runs
            res = {"case": name, "errors": {}, "ok": False, "failed": [f"{type(err).__name__}: {err}"],
                   "traceback": traceback.format_exc()}
        res["seconds"] = round(time.time() - start, 2)
        results.append(res)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
    else:
        gathered = [results]
    if rank == 0:
        merged = []
        for i, case_results in enumerate(zip(*gathered)):
            ok = all(r["ok"] for r in case_results)
            failed = sorted({f"rank {k}: {f}" for k, r in enumerate(case_results) for f in r["failed"]})
            errors: dict[str, Any] = {}
            for k, r in enumerate(case_results):
                for key, v in r["errors"].items():
                    if isinstance(v, (int, float)):
                        errors[key] = max(errors.get(key, 0.0), v)
                    else:
                        errors[f"rank {k} {key}"] = v
            tb = next((r["traceback"] for r in case_results if "traceback" in r), None)
            merged.append({"case": case_results[0]["case"], "ok": ok, "failed": failed, "errors": errors,
                           "tol": case_results[0].get("tol"), "seconds": max(r["seconds"] for r in case_results),
                           **({"traceback": tb} if tb else {})})
        with open(out_path, "w") as f:
            json.dump(merged, f)
    sys.stdout.flush()
    dist.barrier()
    os._exit(0)  # skip process-group teardown: results are written (see benchmarks/_spawn.py)


def _run_phase(title: str, world: int, args: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    """Every case in ``world`` fresh processes; all of them reported failed if they outlast ``limit`` seconds."""
    from benchmarks._spawn import run_processes

    try:
        results = run_processes(_phase_worker, world, args, timeout=limit)
    except Exception as err:
        return [{"case": f"{title}: all cases", "ok": False, "failed": [str(err)], "errors": {}}]
    for r in results:
        r["case"] = f"{title}: {r['case']}"
    return results


# ----------------------------------------------------------------------------------------------
# Timing


def _kernels_in_force() -> Any:
    from syncbn import _config

    return _config.current().kernels or torch


class _TorchSyncBNNoComm(torch.autograd.Function):
    """torch's nn.SyncBatchNorm kernel sequence (torch/nn/modules/_functions.py), communication left out.

    Forward: batch_norm_stats, the empty-rank mask (a host synchronization, as in torch's layer),
    batch_norm_gather_stats_with_counts over one "rank", batch_norm_elemt. Backward:
    batch_norm_backward_reduce, batch_norm_backward_elemt. The kernels are those in force (torch's,
    or their CPU emulations).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):  # type: ignore[override]
        K = _kernels_in_force()
        mean, invstd = K.batch_norm_stats(x, eps)
        count = torch.full((1,), x.numel() // x.size(1), dtype=mean.dtype, device=mean.device)
        mean_all, invstd_all, count_all = mean[None], invstd[None], count[None]
        mask = count_all.squeeze(-1) >= 1
        mean_all, invstd_all, count_all = mean_all[mask], invstd_all[mask], count_all[mask]
        mean, invstd = K.batch_norm_gather_stats_with_counts(
            x, mean_all, invstd_all, running_mean, running_var, momentum, eps, count_all.view(-1)
        )
        ctx.save_for_backward(x, weight, mean, invstd, count_all.to(torch.int32))
        return K.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        K = _kernels_in_force()
        x, weight, mean, invstd, count = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else dy.contiguous()
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = K.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, True, True, True
        )
        w = weight.to(mean.dtype) if weight.dtype != mean.dtype else weight
        dx = K.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
        return dx, grad_weight, grad_bias, None, None, None, None


class _TorchSyncBNLayer(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _TorchSyncBNNoComm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum)


class _SyncbnForcedSync(nn.Module):
    """syncbn's synchronized path, forced in one process (time_layers leaves its all_reduce out)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        import syncbn

        self.layer = syncbn.SyncBatchNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from syncbn import _config

        with _config.testing(always_sync=True):
            return self.layer(x)


def _peak_bandwidth_gbs(device: str) -> Optional[float]:
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    known = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}
    return next((v for k, v in known.items() if k in props.name), None)


def _timer(device: str) -> tuple[Callable[[], Any], Callable[[Any, Any], float]]:
    if device == "cuda":
        def mark() -> Any:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return mark, lambda a, b: a.elapsed_time(b)
    return time.perf_counter, lambda a, b: (b - a) * 1e3


def time_layers(device: str, shapes: list[tuple[int, ...]], dtypes: list[str], reps: int, warmup: int) -> list[dict[str, Any]]:
    """Median forward+backward milliseconds per implementation and shape, interleaved.

    No process group exists here; syncbn's all_gather and all_reduce are replaced by the identity
    for the duration, so its synchronized path is timed without communication.
    """
    from syncbn import comm

    saved = comm.all_reduce_sum, comm.all_gather
    comm.all_reduce_sum = lambda tensor, group=None: tensor
    comm.all_gather = lambda tensor, group=None: tensor.reshape(1, -1)
    try:
        return _time_layers(device, shapes, dtypes, reps, warmup)
    finally:
        comm.all_reduce_sum, comm.all_gather = saved


def _time_layers(device: str, shapes: list[tuple[int, ...]], dtypes: list[str], reps: int, warmup: int) -> list[dict[str, Any]]:
    import syncbn

    mark, elapsed = _timer(device)
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            dt = getattr(torch, dtype_name)
            cl = dt != torch.float32  # half precision is timed channels_last, as AMP training runs it
            x = torch.randn(*shape, device=device, dtype=dt)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            dy = torch.randn_like(x)
            impls: dict[str, nn.Module] = {
                "nn.BatchNorm2d": nn.BatchNorm2d(shape[1]),
                "syncbn, no group": syncbn.SyncBatchNorm(shape[1]),
                "syncbn sync path, no comm": _SyncbnForcedSync(shape[1]),
            }
            if device == "cuda" or _kernels_in_force() is not torch:
                impls["torch SyncBN kernels, no comm"] = _TorchSyncBNLayer(shape[1])
            impls = {k: m.to(device) for k, m in impls.items()}
            copy_src, copy_dst = x.detach().clone(), torch.empty_like(x)
            times: dict[str, list[float]] = {k: [] for k in list(impls) + ["copy"]}
            for rep in range(warmup + reps):
                for name, layer in impls.items():
                    x.grad = None
                    layer.zero_grad(set_to_none=True)
                    a = mark()
                    layer(x).backward(dy)
                    b = mark()
                    if rep >= warmup:
                        times[name].append((a, b))
                a = mark()
                copy_dst.copy_(copy_src)
                b = mark()
                if rep >= warmup:
                    times["copy"].append((a, b))
            if device == "cuda":
                torch.cuda.synchronize()
            ms = {k: [elapsed(a, b) for a, b in v] for k, v in times.items()}
            base = ms["nn.BatchNorm2d"]
            nbytes = x.numel() * x.element_size()
            row = {
                "shape": list(shape), "dtype": dtype_name, "channels_last": cl, "bytes": nbytes,
                "median_ms": {k: statistics.median(v) for k, v in ms.items()},
                "ratio_to_nn_bn": {k: statistics.median(t / u for t, u in zip(v, base)) for k, v in ms.items() if k != "copy"},
            }
            # A step moves the activation 8 times (3 passes forward, 5 backward); a copy moves it twice.
            row["gbs"] = {k: 8 * nbytes / (row["median_ms"][k] * 1e6) for k in impls}
            row["gbs"]["copy"] = 2 * nbytes / (row["median_ms"]["copy"] * 1e6)
            if "torch SyncBN kernels, no comm" in ms:
                ref = ms["torch SyncBN kernels, no comm"]
                row["ratio_to_torch_sync_kernels"] = statistics.median(
                    t / u for t, u in zip(ms["syncbn sync path, no comm"], ref)
                )
            rows.append(row)
    return rows


def _print_timings(rows: list[dict[str, Any]], peak: Optional[float]) -> list[str]:
    """Print the timing table; return the speed-target lines."""
    names = list(rows[0]["median_ms"]) if rows else []
    print("\nforward+backward per layer: median ms (median ratio to nn.BatchNorm2d) and GB/s "
          "(8 activation passes per step; copy: 2)")
    for row in rows:
        print(f"  {'x'.join(map(str, row['shape']))} {row['dtype']}{' channels_last' if row['channels_last'] else ''}")
        for k in names:
            ratio = row["ratio_to_nn_bn"].get(k)
            extra = f" ({ratio:.3f}x)" if ratio is not None else ""
            print(f"    {k:32s} {row['median_ms'][k]:9.4f} ms{extra:10s} {row['gbs'][k]:8.1f} GB/s")
    targets = []
    for row in rows:
        what = f"{'x'.join(map(str, row['shape']))} {row['dtype']}"
        r_local = row["ratio_to_nn_bn"]["syncbn, no group"]
        targets.append(f"no group vs nn.BatchNorm2d <= 1.02x: {r_local:.3f}x {'met' if r_local <= 1.02 else 'NOT met'} ({what})")
        if "ratio_to_torch_sync_kernels" in row:
            r = row["ratio_to_torch_sync_kernels"]
            targets.append(f"sync path vs torch's SyncBN kernels <= 1.05x: {r:.3f}x {'met' if r <= 1.05 else 'NOT met'} ({what})")
            share = row["gbs"]["syncbn sync path, no comm"] / row["gbs"]["copy"]
            targets.append(f"sync path bandwidth >= 80% of a copy's: {100 * share:.0f}% {'met' if share >= 0.8 else 'NOT met'} ({what})")
        if peak:
            share = row["gbs"]["syncbn sync path, no comm"] / peak
            targets.append(f"sync path bandwidth vs peak {peak:.0f} GB/s: {100 * share:.0f}% ({what})")
    return targets


# ----------------------------------------------------------------------------------------------


class _Tee(io.TextIOBase):
    """Writes to several text streams (the console and the report kept for ``--out``)."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def check_launches(device: str, emulated: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Launches of one synchronized layer's forward and backward, syncbn's and torch's (reported).

    Returns the rows and, when counting itself failed, a failed case.
    """
    from benchmarks import launches

    kernels = emulation(emulated).get("kernels")
    shape = (4, 8, 5, 5) if device == "cpu" else (32, 256, 14, 14)
    cases = [
        ("float32", {"shape": shape}),
        ("bfloat16 channels_last", {"shape": shape, "dtype": torch.bfloat16, "channels_last": True}),
        ("float16, float16 parameters", {"shape": shape, "dtype": torch.float16, "param_dtype": torch.float16}),
    ]
    rows, failed = [], []
    for name, case in cases:
        try:
            res = launches.compare(device=device, kernels=kernels, **case)
        except Exception as err:
            failed.append({"case": f"launch count: {name}", "errors": {}, "ok": False,
                           "failed": [f"{type(err).__name__}: {err}"], "traceback": traceback.format_exc()})
            continue
        rows.append({"case": name, "shape": list(shape), **res})
    return rows, failed


def _print_results(results: list[dict[str, Any]]) -> None:
    print("\ncorrectness (max error relative to max(1, |reference|), float64 references)")
    for r in results:
        worst = max((v for v in r["errors"].values() if isinstance(v, float)), default=0.0)
        status = "ok  " if r["ok"] else "FAIL"
        detail = f" worst {worst:.2e}" + (f" (tol {r['tol']:.0e})" if r.get("tol") else "") if worst else ""
        print(f"  {status} {r['case']}{detail}" + ("" if r["ok"] else f": {'; '.join(r['failed'])}"))
        if not r["ok"] and r.get("traceback"):
            print("    " + r["traceback"].strip().replace("\n", "\n    "))


def _print_launches(rows: list[dict[str, Any]]) -> None:
    print("\nlaunches per synchronized layer, one rank of two (syncbn / torch's SyncBatchNorm Function; "
          "reported, not counted)")
    for row in rows:
        s, t = row["syncbn"], row["torch"]
        print(f"  {row['case']:30s} forward {s['forward']['launches']:3d} / {t['forward']['launches']:3d}   "
              f"backward {s['backward']['launches']:3d} / {t['backward']['launches']:3d}")
        for who, r in (("syncbn", s), ("torch", t)):
            for phase in ("forward", "backward"):
                print(f"      {who:6s} {phase:8s} {' '.join(r[phase]['ops'])}")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if args.emulated else "cuda"
    # The whole run must fit the time a GPU is lent for: each phase gets what is left of the
    # budget, less a reserve for the parts after it, and the timings are skipped when none is left.
    budget = args.budget or (1500.0 if args.emulated else 450.0)
    deadline = time.time() + budget

    def left(reserve: float) -> float:
        return max(30.0, deadline - time.time() - reserve)

    info = _describe(device, _install(args.no_install or args.emulated))
    if args.emulated:
        info["mode"] = "CPU, torch's CUDA kernels emulated (tests/emulated_kernels.py): the script's logic, not the kernels"
    for k, v in info.items():
        print(f"{k:>15}: {v}")

    from syncbn import _config

    results: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}

    def timed(what: str, fn: Callable[[], Any]) -> Any:
        start = time.time()
        try:
            return fn()
        finally:
            seconds[what] = round(time.time() - start, 1)

    with _config.testing(**emulation(args.emulated)):
        results += timed("no group", lambda: check_no_group(device))
        phase = {"device": device, "timeout": args.timeout, "emulated": args.emulated}
        results += timed("W=2", lambda: _run_phase(
            "W=2 gloo", 2, {**phase, "backend": "gloo", "force_sync": False}, left(reserve=budget / 3)
        ))
        results += timed("W=1", lambda: _run_phase(
            "W=1 nccl, sync path forced" if device == "cuda" else "W=1 gloo, sync path forced",
            1, {**phase, "backend": "nccl" if device == "cuda" else "gloo", "force_sync": True}, left(reserve=60.0),
        ))
        launch_rows, launch_failures = timed("launches", lambda: check_launches(device, args.emulated))
        results += launch_failures
        _print_results(results)
        _print_launches(launch_rows)

        shapes = DRY_SHAPES if args.emulated else RESNET50_SHAPES
        reps = args.reps or (3 if args.emulated else 30)
        if deadline - time.time() > 30:
            rows = timed("timings", lambda: time_layers(
                device, shapes, ["float32", "bfloat16"], reps=reps, warmup=1 if args.emulated else 5
            ))
        else:
            rows = []
            print(f"\ntimings skipped: the {budget:.0f} s budget is spent")
    print("\nseconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    peak = _peak_bandwidth_gbs(device)
    if args.emulated:
        print("\n(CPU emulation: the timings below exercise the code; they measure nothing)")
    targets = _print_timings(rows, peak)
    print("\nspeed targets (reported, not counted)")
    for line in targets:
        print("  " + line)
    return {"info": info, "results": results, "launches": launch_rows, "timings": rows, "targets": targets,
            "peak_gbs": peak, "seconds_per_part": seconds}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-emulated", "--dry-run", dest="emulated", action="store_true",
                        help="run on CPU with tiny shapes, torch's CUDA kernels emulated (no GPU needed)")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install this checkout first")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation")
    parser.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 450 on a GPU, 1500 emulated); phases "
                             "that outlast their share are reported failed, timings skipped")
    parser.add_argument("--out", default=None, help="write gpu_check.json and gpu_check.txt into this folder")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = parser.parse_args(argv)
    t0 = time.time()
    if args.emulated:
        torch.set_num_threads(1)  # tiny shapes: threads only add contention with the spawned ranks
    elif not torch.cuda.is_available():
        print("gpu_check: expected a CUDA build of torch with a visible GPU, found none; "
              "use --cpu-emulated to exercise the script on CPU")
        return 2
    text = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, text)):
        report = _run(args)
        passed = sum(r["ok"] for r in report["results"])
        failed = len(report["results"]) - passed
        report["seconds"] = time.time() - t0
        print(f"\n(total {report['seconds']:.0f} s)")
        print(f"{passed} passed, {failed} failed")
    paths = [args.json] if args.json else []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        paths.append(os.path.join(args.out, "gpu_check.json"))
        with open(os.path.join(args.out, "gpu_check.txt"), "w") as f:
            f.write(text.getvalue())
    for path in paths:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
