"""Configurations of the differential harness and the hypothesis strategies that generate them.

A configuration is a small frozen dataclass (picklable, printable, hashable): it is sent as is to
the worker ranks and printed in every failure message, so that a shrunk failure can be pasted
into ``test_regressions.py``. The data (inputs, upstream gradients, initial state) is not part of
it: :mod:`.reference` draws it from ``seed``, in the parent, and sends it with the configuration.

Known failures: every finding already pinned by a regression test has a name in
:data:`KNOWN_FAILURES` and a predicate in :data:`REGIONS` that says which configurations touch it.
The strategies leave those configurations out while the name is listed; removing the name (when
the library is fixed) makes the search cover that region again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from hypothesis import strategies as st

__all__ = [
    "Step",
    "LayerConfig",
    "ModelConfig",
    "CompileConfig",
    "ErrorConfig",
    "error_configs",
    "KNOWN_FAILURES",
    "REGIONS",
    "TORCH_FAILURES",
    "known_failure",
    "layer_configs",
    "model_configs",
    "compile_configs",
    "LAYOUTS",
]

# Regions that a regression test in test_regressions.py pins as a known failure. The strategies
# skip a configuration for which REGIONS[name](config) holds while name is listed here. Remove a
# name once the library is fixed (the regression test's xfail mark goes at the same time).
KNOWN_FAILURES: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# How a rank lays out its input (and its upstream gradient) in memory.
#   contiguous
#   channels_last   torch.channels_last (4-D) or channels_last_3d (5-D)
#   transposed      channels innermost by a transpose of a contiguous copy (dims 1 and -1 swapped)
#   sliced_c        every other channel of a tensor twice as wide (non-contiguous in dim 1)
#   sliced_n        every other sample of a batch twice as large (non-contiguous in dim 0)
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced_c", "sliced_n")

# Autograd modes of one call:
#   all        input and parameters require grad; y.backward(g)
#   input      only the input requires grad (parameters' requires_grad switched off)
#   params     only the parameters require grad
#   none       nothing requires grad; plain forward
#   no_grad    forward under torch.no_grad()
#   inference  forward under torch.inference_mode()
GRAD_MODES = ("all", "input", "params", "none", "no_grad", "inference")


@dataclass(frozen=True)
class Step:
    """One call of the layer on every rank.

    ``sizes[r]`` is rank r's batch size, ``spatial[r]`` its spatial shape (the dims after C),
    ``layouts[r]`` its memory layout. ``track`` (when not None) is assigned to the layer's
    ``track_running_stats`` before the call, as fine-tuning code does. ``nonfinite`` is
    ``(rank, value)``: that rank's first input element is replaced by ``value`` ("nan", "inf", "-inf").
    """

    train: bool = True
    sizes: tuple[int, ...] = (2, 2)
    spatial: Optional[tuple[tuple[int, ...], ...]] = None  # None: () on every rank (2-D input)
    layouts: Optional[tuple[str, ...]] = None  # None: contiguous on every rank
    grad: str = "all"
    track: Optional[bool] = None
    nonfinite: Optional[tuple[int, str]] = None

    def spatial_of(self, rank: int) -> tuple[int, ...]:
        return () if self.spatial is None else tuple(self.spatial[rank])

    def layout_of(self, rank: int) -> str:
        return "contiguous" if self.layouts is None else self.layouts[rank]


@dataclass(frozen=True)
class LayerConfig:
    """One synchronized layer on ``world`` ranks, called ``len(steps)`` times.

    ``kind`` is ``"bn"`` (SyncBatchNorm) or ``"renorm"`` (SyncBatchRenorm with ``r_max``, ``d_max``
    and, when ``schedule`` is given, ``RenormSchedule(*schedule)``). Inputs are
    ``randn * 10**log_scale + offset * 10**log_scale * sign_c``: ``offset`` is |mean|/std.
    """

    world: int = 2
    steps: tuple[Step, ...] = (Step(),)
    kind: str = "bn"
    channels: int = 3
    x_dtype: str = "float64"
    p_dtype: str = "float64"
    affine: bool = True
    bias: bool = True
    track: bool = True
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    min_count: int = 2
    fallback: str = "raise"
    debias: bool = False
    r_max: float = 3.0
    d_max: float = 5.0
    schedule: Optional[tuple[int, int, int]] = None
    log_scale: float = 0.0
    offset: float = 0.0
    initial_steps: int = 0
    seed: int = 0

    @property
    def ndim(self) -> int:
        return len(self.steps[0].spatial_of(0)) + 2


@dataclass(frozen=True)
class ModelConfig:
    """A small torch model converted with ``convert_sync_bn`` and trained ``len(sizes)`` steps.

    ``model``: ``"convnet"`` (conv, BN, ReLU, pool, linear), ``"bn_head"`` (conv, BN, pool,
    frozen linear: no nonlinearity after the BN), ``"downsample"`` (a ResNet downsample block: two
    parallel branches with BNs of equal width), ``"mlp"`` (linear, BatchNorm1d, ReLU, linear).
    ``sizes[k][r]`` is rank r's batch size at step k. ``hooks``: forward hooks / forward-pre hooks
    registered on the BN layers before conversion (``"before"``) or after (``"after"``).
    ``wrap``: ``"none"`` or ``"ddp"``. ``checkpoint``: ``None``, ``"reentrant"`` or
    ``"non_reentrant"`` (torch.utils.checkpoint around the body). ``penalty``: a gradient penalty on
    the input gradient (``create_graph=True`` double backward). ``fx``: run the converted model
    through ``torch.fx.symbolic_trace``. ``revert``: ``revert_sync_bn`` after training and check the
    reverted model (eval output, local training output).
    """

    world: int = 2
    model: str = "convnet"
    sizes: tuple[tuple[int, ...], ...] = ((2, 2),)
    width: int = 4
    hooks: Optional[str] = None
    wrap: str = "none"
    checkpoint: Optional[str] = None
    penalty: bool = False
    fx: bool = False
    revert: bool = False
    momentum: Optional[float] = 0.1
    seed: int = 0


@dataclass(frozen=True)
class CompileConfig:
    """A layer or small model under ``torch.compile(backend=...)`` for ``len(sizes)`` steps.

    ``model``: ``"layer"`` (one SyncBatchNorm on (N, C, L)), ``"downsample"`` (a ResNet downsample
    block: two parallel BNs of equal width) or ``"convnet"``. ``sizes[k][r]`` is rank r's batch size
    at step k (shapes change between steps; 0 and 1 make dynamo specialize, so ranks compile
    different graphs). ``dynamic``: torch.compile's ``dynamic`` argument. ``wrap="ddp"``:
    ``torch.compile(DDP(model))``.
    """

    world: int = 2
    backend: str = "aot_eager"
    model: str = "layer"
    sizes: tuple[tuple[int, ...], ...] = ((2, 2), (2, 2))
    dynamic: Optional[bool] = None
    wrap: str = "none"
    seed: int = 0
    # The model family's switches, fixed here (the compiled run shares its runner and reference).
    width: int = 4
    hooks: Optional[str] = None
    checkpoint: Optional[str] = None
    penalty: bool = False
    fx: bool = False
    revert: bool = False
    momentum: Optional[float] = 0.1


@dataclass(frozen=True)
class ErrorConfig:
    """Inputs that torch's layer refuses, on ``bad`` ranks (the others get a good (2, C, 4) input).

    ``kind``: ``"channels"`` (C + 1 channels), ``"rank1"`` (a 1-D input), ``"integer"`` (an int64
    input), ``"eps"`` (the layer built with eps=0, every rank). ``debug``: consistency mode
    (``syncbn.set_debug(True)``), whose purpose is to turn rank-dependent mismatches into a
    ValueError on every rank. The promise: ValueError on every rank, no rank left waiting.
    """

    world: int = 2
    bad: tuple[int, ...] = (0, 1)
    kind: str = "channels"
    debug: bool = False
    train: bool = True


# ---------------------------------------------------------------------------------------------
# Known-failure regions
# ---------------------------------------------------------------------------------------------


def _layer_steps_before_eval_toggle_off(c: LayerConfig) -> bool:
    """A training call while ``track_running_stats`` was switched off at run time on a layer with buffers."""
    if not isinstance(c, LayerConfig) or not c.track:
        return False
    tracking = True
    for s in c.steps:
        if s.track is not None:
            tracking = s.track
        if s.train and not tracking:
            return True
    return False


def _large_mean(c: object) -> bool:
    """|mean|/std large enough that the E[x^2] - E[x]^2 merge loses the variance (measured:
    float64 from 10 on, errors ~1e-16 * (mean/std)**2; float32 statistics (float32, bfloat16 and
    float16 inputs) from 1e3 on)."""
    if not isinstance(c, LayerConfig) or c.world < 2:
        return False
    return c.offset >= (10.0 if c.x_dtype == "float64" else 1e3)


def _huge_scale(c: object) -> bool:
    """float64 values whose squares overflow the float64 sums (|x| >= ~1e152) where torch still normalizes."""
    if not isinstance(c, LayerConfig) or c.world < 2 or c.x_dtype != "float64":
        return False
    return c.log_scale + math.log10(max(c.offset, 1.0)) >= 153


def _syncs(c: LayerConfig) -> bool:
    """The layer takes syncbn's own path (statistics merge, SyncNormFunction), not torch's kernel."""
    return c.world > 1 or c.kind == "renorm"


def _refused_dtypes(c: object) -> bool:
    """An input/parameter dtype pair that torch's CPU batch norm refuses (RuntimeError)."""
    return isinstance(c, LayerConfig) and (c.x_dtype, c.p_dtype) not in _SUPPORTED


def _half_parameters(c: object) -> bool:
    """bfloat16/float16 parameters with an input of the same dtype, synchronized (2+ ranks)."""
    return (
        isinstance(c, LayerConfig)
        and c.x_dtype == c.p_dtype
        and c.x_dtype in ("bfloat16", "float16")
        and c.world > 1
    )


def _penalty(c: object) -> bool:
    return isinstance(c, ModelConfig) and c.penalty and c.world > 1


def _fx(c: object) -> bool:
    return isinstance(c, ModelConfig) and c.fx


def _hooks(c: object) -> bool:
    """Hooks on batch norms that a converter replaces: before convert_sync_bn, or before a
    revert_sync_bn (the issue's list: every converter drops them)."""
    return isinstance(c, ModelConfig) and (c.hooks == "before" or (c.hooks is not None and c.revert))


def _compile_order(c: object) -> bool:
    """Ranks that compile different graphs of a model with parallel branches (the downsample
    block): with inductor, whenever the ranks' batch sizes specialize differently (0 or 1 on
    some ranks only, or a recompile on some ranks); with eager/aot_eager (measured), whenever
    some rank is empty while another is not."""
    if not isinstance(c, CompileConfig) or c.world < 2 or c.model != "downsample":
        return False
    if c.backend == "inductor":
        special = [tuple(n if n in (0, 1) else 2 for n in step) for step in c.sizes]
        return any(len(set(s)) > 1 for s in special) or len(set(special)) > 1
    return any(0 in step and any(step) for step in c.sizes)


def _half_strided(c: object) -> bool:
    """bfloat16/float16 input, float32 parameters, a non-contiguous layout on some rank, syncbn's path."""
    if not isinstance(c, LayerConfig) or c.x_dtype not in ("bfloat16", "float16") or c.p_dtype != "float32":
        return False
    strided = {"sliced_c", "sliced_n", "transposed"}
    return _syncs(c) and any(s.layout_of(r) in strided for s in c.steps for r in range(c.world))


def _debias_zero(c: object) -> bool:
    return isinstance(c, LayerConfig) and c.debias and c.momentum == 0.0 and c.track


def _partial_errors(c: object) -> bool:
    """An input error on some ranks only, in training with 2+ ranks, in consistency mode: the
    bad rank raises its own ValueError before the consistency check, the others wait."""
    return isinstance(c, ErrorConfig) and c.train and c.world > 1 and len(set(c.bad)) < c.world


def _inf_input(c: object) -> bool:
    """An infinite running statistic on syncbn's path: from an infinite input value, or from
    values whose variance overflows the buffers' dtype (float32: |x| beyond ~1e19)."""
    if not isinstance(c, LayerConfig) or not c.track or not _syncs(c):
        return False
    if any(s.nonfinite is not None and s.nonfinite[1] != "nan" for s in c.steps):
        return True
    if c.x_dtype == "float64" and c.p_dtype == "float64":
        return False
    top = 4.8 if "float16" in (c.x_dtype, c.p_dtype) else 38.5  # log10 of the dtype's largest value
    return 2 * (c.log_scale + math.log10(max(c.offset, 1.0)) + 0.7) >= top


def _float32_variance_overflow(c: object) -> bool:
    """float32 input whose spread makes the batch variance exceed float32's range (~3.4e38)."""
    return (
        isinstance(c, LayerConfig)
        and c.x_dtype == "float32"
        and c.log_scale + math.log10(max(c.offset, 1.0)) >= 18.5
    )


REGIONS: dict[str, Callable[[object], bool]] = {
    "track_running_stats_toggle": _layer_steps_before_eval_toggle_off,
    "large_mean_variance": _large_mean,
    "huge_scale_overflow": _huge_scale,
    "double_backward": _penalty,
    "fx_trace": _fx,
    "hooks_lost_in_conversion": _hooks,
    "compile_collective_order": _compile_order,
    "torch_refused_dtypes": _refused_dtypes,
    "half_parameters_synced": _half_parameters,
    "half_grad_sums_strided": _half_strided,
    "debias_zero_momentum": _debias_zero,
    "rank_local_input_error": _partial_errors,
    "inf_running_stats_nan": _inf_input,
    "float32_variance_overflow": _float32_variance_overflow,
}


def known_failure(config: object) -> Optional[str]:
    """The name of the first listed known failure whose region holds ``config``, else None."""
    for name in sorted(KNOWN_FAILURES):
        pred = REGIONS.get(name)
        if pred is not None and pred(config):
            return name
    return None


def _inductor_empty_rank(c: object) -> bool:
    """inductor with an empty batch on some rank, in a model with a convolution before its norms."""
    return (
        isinstance(c, CompileConfig)
        and c.backend == "inductor"
        and c.model != "layer"
        and any(0 in sizes for sizes in c.sizes)
    )


# Regions where torch itself fails, so there is nothing to compare with: left out of the search
# for good, each pinned by a test that asserts torch's failure (it fails the day torch is fixed;
# then remove the region here).
#   inductor_empty_rank: torch 2.13's inductor cannot run the backward of a convolution whose
#   batch is empty (an AssertionError on the gradient's strides, torch's own BatchNorm2d alike);
#   pinned by tests/test_compile.py::test_torch_inductor_fails_on_an_empty_batch.
TORCH_FAILURES: dict[str, Callable[[object], bool]] = {"inductor_empty_rank": _inductor_empty_rank}


def _unknown(config: object) -> bool:
    return known_failure(config) is None and not any(pred(config) for pred in TORCH_FAILURES.values())


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

_DTYPE_PAIRS = [
    # (input, parameters): what torch's CPU batch norm supports, and a few it refuses.
    ("float64", "float64"),
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float32"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
    ("float64", "float32"),  # torch: RuntimeError "mixed dtype (CPU)"
    ("float32", "float64"),  # torch: RuntimeError
]
_SUPPORTED = _DTYPE_PAIRS[:6]

# log10 of the input's spread, per input dtype: ordinary, tiny and huge, up to the dtype's range.
_LOG_SCALES = {
    "float64": [0.0, 0.0, -20.0, -3.0, 3.0, 20.0, 100.0, 150.0, 152.0, 154.0, 155.0],
    "float32": [0.0, 0.0, -20.0, -3.0, 3.0, 10.0, 18.0, 19.0],
    "bfloat16": [0.0, 0.0, -20.0, -3.0, 3.0, 20.0],
    "float16": [0.0, 0.0, -3.0, -1.0, 1.0, 2.0],
}
_OFFSETS = [0.0, 0.0, 0.0, 0.5, 1.0, 3.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e7, 1e9]


def _layouts_for(ndim: int) -> list[str]:
    out = ["contiguous", "contiguous", "transposed", "sliced_c", "sliced_n"]
    if ndim in (4, 5):
        out += ["channels_last", "channels_last"]
    return out


_BATCH = st.sampled_from([0, 1, 1, 2, 2, 3, 4, 5])


@st.composite
def _step(draw: st.DrawFn, world: int, ndim: int, *, train: bool, track_toggle: bool, nonfinite: bool) -> Step:
    sizes = tuple(draw(_BATCH) for _ in range(world))
    dims = st.integers(1, 3)
    if ndim == 2:
        spatial = tuple(() for _ in range(world))
    elif draw(st.integers(0, 2)) == 0:  # a third of the calls: a spatial shape per rank
        spatial = tuple(tuple(draw(dims) for _ in range(ndim - 2)) for _ in range(world))
    else:
        shape = tuple(draw(dims) for _ in range(ndim - 2))
        spatial = tuple(shape for _ in range(world))
    layouts = tuple(draw(st.sampled_from(_layouts_for(ndim))) for _ in range(world))
    grad = draw(st.sampled_from(["all", "all", "all", "input", "params", "none", "no_grad", "inference"]))
    track = draw(st.sampled_from([None, None, None, False, True])) if track_toggle else None
    bad = None
    if nonfinite and draw(st.integers(0, 9)) == 0:
        bad = (draw(st.integers(0, world - 1)), draw(st.sampled_from(["nan", "inf", "-inf"])))
    return Step(train=train, sizes=sizes, spatial=spatial, layouts=layouts, grad=grad, track=track, nonfinite=bad)


@st.composite
def _layer_config(draw: st.DrawFn, max_world: int, max_steps: int, unsupported_dtypes: bool) -> LayerConfig:
    world = draw(st.integers(1, max_world))
    kind = draw(st.sampled_from(["bn", "bn", "bn", "renorm"]))
    ndim = draw(st.integers(2, 5))
    x_dtype, p_dtype = draw(st.sampled_from(_DTYPE_PAIRS if unsupported_dtypes else _SUPPORTED))
    affine = draw(st.booleans())
    bias = draw(st.sampled_from([True, True, False])) if affine else True
    track = True if kind == "renorm" else draw(st.sampled_from([True, True, False]))
    momentum = draw(st.sampled_from([0.1, 0.1, None, 0.0, 0.5, 1.0]))
    eps = draw(st.sampled_from([1e-5, 1e-5, 1e-3, 1.0, 0.0]))
    min_count = draw(st.sampled_from([2, 2, 2, 3, 8]))
    fallback = draw(st.sampled_from(["raise", "running"]))
    debias = draw(st.sampled_from([False, False, True]))
    r_max = draw(st.sampled_from([1.0, 1.5, 3.0]))
    d_max = draw(st.sampled_from([0.0, 0.5, 5.0]))
    schedule = None
    if kind == "renorm" and draw(st.booleans()):
        warmup = draw(st.integers(0, 2))
        schedule = (warmup, warmup + draw(st.integers(0, 3)), warmup + draw(st.integers(0, 3)))
    log_scale = draw(st.sampled_from(_LOG_SCALES[x_dtype]))
    offset = draw(st.sampled_from(_OFFSETS))
    n_steps = draw(st.integers(1, max_steps))
    steps = []
    for i in range(n_steps):
        train = draw(st.sampled_from([True, True, True, False])) if i > 0 else True
        steps.append(draw(_step(world, ndim, train=train, track_toggle=track, nonfinite=True)))
    # Always end with an eval call (ordinary data), and so check the buffers' effect on outputs.
    steps.append(draw(_step(world, ndim, train=False, track_toggle=False, nonfinite=False)))
    return LayerConfig(
        world=world,
        steps=tuple(steps),
        kind=kind,
        channels=draw(st.integers(1, 4)),
        x_dtype=x_dtype,
        p_dtype=p_dtype,
        affine=affine,
        bias=bias,
        track=track,
        momentum=momentum,
        eps=eps,
        min_count=min_count,
        fallback=fallback,
        debias=debias,
        r_max=r_max,
        d_max=d_max,
        schedule=schedule,
        log_scale=log_scale,
        offset=offset,
        initial_steps=draw(st.sampled_from([0, 0, 3])),
        seed=draw(st.integers(0, 2**16)),
    )


def layer_configs(max_world: int = 4, max_steps: int = 3, unsupported_dtypes: bool = True) -> st.SearchStrategy[LayerConfig]:
    """Layer configurations outside every listed known-failure region."""
    return _layer_config(max_world, max_steps, unsupported_dtypes).filter(_unknown)


@st.composite
def _model_config(draw: st.DrawFn, max_world: int, max_steps: int) -> ModelConfig:
    world = draw(st.integers(1, max_world))
    n_steps = draw(st.integers(1, max_steps))
    sizes = tuple(tuple(draw(st.sampled_from([0, 1, 2, 2, 3])) for _ in range(world)) for _ in range(n_steps))
    return ModelConfig(
        world=world,
        model=draw(st.sampled_from(["convnet", "bn_head", "downsample", "mlp"])),
        sizes=sizes,
        width=draw(st.sampled_from([2, 4])),
        hooks=draw(st.sampled_from([None, None, "before", "after"])),
        wrap=draw(st.sampled_from(["none", "none", "ddp"])),
        checkpoint=draw(st.sampled_from([None, None, "reentrant", "non_reentrant"])),
        penalty=draw(st.sampled_from([False, False, False, True])),
        fx=draw(st.sampled_from([False, False, False, True])),
        revert=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, None])),
        seed=draw(st.integers(0, 2**16)),
    )


def model_configs(max_world: int = 3, max_steps: int = 3) -> st.SearchStrategy[ModelConfig]:
    return _model_config(max_world, max_steps).filter(_unknown)


@st.composite
def _compile_config(draw: st.DrawFn, backends: tuple[str, ...], max_world: int, max_steps: int) -> CompileConfig:
    world = draw(st.integers(2, max_world))
    n_steps = draw(st.integers(2, max_steps))
    sizes = tuple(tuple(draw(st.sampled_from([0, 1, 2, 3, 3, 4])) for _ in range(world)) for _ in range(n_steps))
    return CompileConfig(
        world=world,
        backend=draw(st.sampled_from(backends)),
        model=draw(st.sampled_from(["layer", "downsample", "convnet"])),
        sizes=sizes,
        dynamic=draw(st.sampled_from([None, None, False])),
        wrap=draw(st.sampled_from(["none", "none", "ddp"])),
        seed=draw(st.integers(0, 2**16)),
    )


def compile_configs(
    backends: tuple[str, ...] = ("eager", "aot_eager", "inductor"), max_world: int = 3, max_steps: int = 3
) -> st.SearchStrategy[CompileConfig]:
    return _compile_config(backends, max_world, max_steps).filter(_unknown)


@st.composite
def _error_config(draw: st.DrawFn, max_world: int) -> ErrorConfig:
    world = draw(st.integers(1, max_world))
    kind = draw(st.sampled_from(["channels", "rank1", "integer", "eps"]))
    if kind == "eps":
        bad = tuple(range(world))
    else:
        bad = tuple(sorted(draw(st.sets(st.integers(0, world - 1), min_size=1))))
    train = draw(st.sampled_from([True, True, False]))
    # An input error on some ranks only, in training, can only fail on every rank in consistency
    # mode (without it nothing tells the good ranks): generated with debug=True only.
    partial = train and world > 1 and len(bad) < world
    debug = True if partial else draw(st.booleans())
    return ErrorConfig(world=world, bad=bad, kind=kind, debug=debug, train=train)


def error_configs(max_world: int = 4) -> st.SearchStrategy[ErrorConfig]:
    return _error_config(max_world).filter(_unknown)
