"""Every finding of the differential harness, as a named test with its minimal configuration.

Each test states the promise for one configuration the harness found broken (shrunk by
hypothesis, or reduced by hand from its example). While the library is broken there, the test is
marked ``xfail(strict=True)`` with a one-line reason, so the suite stays green and the mark turns
into a failure the moment a fix lands: then remove the mark here and the finding's name from
``configs.KNOWN_FAILURES`` (which keeps the hypothesis search out of the region meanwhile).

Tests that need a rank to be left waiting cost a timeout and a new worker pool; they carry the
``deep`` mark and run in the deep profile only.
"""

from __future__ import annotations

import pytest

from .configs import LayerConfig, ModelConfig, Step
from .driver import check_layer, check_model

# ------------------------------------------------------------------------------------------------
# The list (issue 16), confirmed by the harness
# ------------------------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="track_running_stats switched off at run time: syncbn keeps updating and counting the buffers")
@pytest.mark.parametrize("world", [1, 2])
def test_track_running_stats_switched_off(world: int) -> None:
    # KNOWN_FAILURES: track_running_stats_toggle. torch stops updating running_mean/var and
    # num_batches_tracked; syncbn moves them (0.09 / 0.08 here) and counts the step.
    sizes = (5,) if world == 1 else (2, 3)
    check_layer(LayerConfig(world=world, steps=(Step(sizes=sizes, track=False), Step(train=False, sizes=sizes))))


@pytest.mark.xfail(strict=True, reason="E[x^2]-E[x]^2 merge: variance loses precision when |mean|/std is large")
@pytest.mark.parametrize(
    "x_dtype, offset", [("float64", 10.0), ("float64", 1e3), ("float32", 1e4)], ids=["float64-1e1", "float64-1e3", "float32-1e4"]
)
def test_large_mean_variance(x_dtype: str, offset: float) -> None:
    # KNOWN_FAILURES: large_mean_variance. float64: output error 4.5e-14 at |mean|/std = 10
    # (torch's own, float64 noise: 9e-15), 5.6e-10 at 1e3 (torch 6e-13); float32 at 1e4:
    # running_var relative error 3.2e-6 (torch 5e-8).
    check_layer(
        LayerConfig(
            world=2, x_dtype=x_dtype, p_dtype=x_dtype, offset=offset, seed=1,
            steps=(Step(sizes=(3, 5), spatial=((4,), (4,))),),
        )
    )


@pytest.mark.xfail(strict=True, reason="E[x^2]-E[x]^2 merge with float32 statistics: float16 input at |mean|/std = 1e3")
def test_large_mean_variance_float16() -> None:
    # KNOWN_FAILURES: large_mean_variance. The search's example (3 ranks, uneven): running_var
    # relative error 2.9e-6 where torch's float16 layer has 2e-7 (bound 3.35e-6 absolute).
    check_layer(
        LayerConfig(
            world=3, x_dtype="float16", p_dtype="float32", offset=1e3, channels=3, momentum=None, eps=1e-3, seed=485,
            steps=(Step(sizes=(4, 1, 2), spatial=((3, 3), (1, 1), (2, 3))),),
        )
    )


@pytest.mark.xfail(strict=True, reason="float64 sums of squares overflow for |x| ~ 1e154 where torch still normalizes")
def test_float64_huge_values_overflow() -> None:
    # KNOWN_FAILURES: huge_scale_overflow. Outputs off by 1.7 and running_var inf (torch 7.9e307).
    check_layer(LayerConfig(world=2, log_scale=154.0, steps=(Step(sizes=(2, 2)),)))


@pytest.mark.xfail(strict=True, reason="double backward through BN + frozen linear head gives silently wrong gradients on 2 ranks")
def test_double_backward_bn_frozen_head() -> None:
    # KNOWN_FAILURES: double_backward. Gradient penalty on the input gradient: grad_input off by
    # 3e-4, conv weight grad by 0.012, BN weight grad by 0.017; no error raised.
    check_model(ModelConfig(world=2, model="bn_head", sizes=((2, 3),), penalty=True))


@pytest.mark.xfail(strict=True, reason="torch.fx.symbolic_trace of a converted model: TraceError (control flow on a traced value)")
def test_fx_symbolic_trace_converted_model() -> None:
    # KNOWN_FAILURES: fx_trace.
    check_model(ModelConfig(world=2, model="mlp", sizes=((2, 3),), fx=True))


@pytest.mark.xfail(strict=True, reason="convert_sync_bn drops forward and forward-pre hooks registered on the batch norms")
def test_hooks_lost_in_conversion() -> None:
    # KNOWN_FAILURES: hooks_lost_in_conversion. Output off by 0.36, running stats by 0.08.
    check_model(ModelConfig(world=2, model="convnet", sizes=((2, 3),), hooks="before"))


@pytest.mark.xfail(strict=True, reason="revert_sync_bn drops the hooks registered on the synchronized layers")
def test_hooks_lost_in_revert() -> None:
    # KNOWN_FAILURES: hooks_lost_in_conversion. Hooks registered after convert_sync_bn work in
    # training; after revert_sync_bn the eval output is off by 0.16 (one process already).
    check_model(ModelConfig(world=1, model="convnet", sizes=((1,),), width=2, hooks="after", revert=True))


# ------------------------------------------------------------------------------------------------
# Found by the harness
# ------------------------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="bf16/fp16 parameters with inputs of the same dtype: RuntimeError 'expected scalar type' on 2+ ranks")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_parameters_synchronized(dtype: str) -> None:
    # KNOWN_FAILURES: half_parameters_synced. A model cast with .to(torch.bfloat16) (parameters
    # and input bf16) trains with torch's BatchNorm; syncbn's synchronized forward raises
    # "RuntimeError: expected scalar type BFloat16 but found Float" in torch.batch_norm
    # (syncbn/functional.py normalize: float32 statistics with bf16 weight), after the collective.
    check_layer(LayerConfig(world=2, x_dtype=dtype, p_dtype=dtype, steps=(Step(sizes=(2, 2)),)))


@pytest.mark.xfail(strict=True, reason="input/parameter dtypes torch refuses: RuntimeError after the collective, not ValueError")
def test_refused_dtypes_raise_value_error() -> None:
    # KNOWN_FAILURES: torch_refused_dtypes. float64 input into float32 parameters: torch raises
    # RuntimeError "mixed dtype (CPU)"; syncbn raises torch's RuntimeError from its normalize,
    # after the forward all_reduce, not a ValueError naming the layer before any collective.
    check_layer(LayerConfig(world=2, x_dtype="float64", p_dtype="float32", steps=(Step(sizes=(2, 2)),)))


@pytest.mark.deep
@pytest.mark.xfail(strict=True, reason="refused dtypes with an empty rank: the empty rank passes the forward and waits forever in backward")
def test_refused_dtypes_empty_rank_hangs() -> None:
    # KNOWN_FAILURES: torch_refused_dtypes. Rank 1 raises RuntimeError in normalize; rank 0
    # (empty batch: its normalize of an empty tensor does not check dtypes) returns, runs the
    # backward and waits in its all_reduce for a peer that never comes.
    check_layer(LayerConfig(world=2, x_dtype="float64", p_dtype="float32", steps=(Step(sizes=(0, 2)),)), timeout=20)


@pytest.mark.xfail(strict=True, reason="bf16 input with float32 parameters, strided input: parameter-gradient sums rounded to bf16 per rank")
def test_half_input_strided_grad_sums() -> None:
    # KNOWN_FAILURES: half_grad_sums_strided. A channel-sliced bf16 input: the group's
    # grad_bias is off by 3.9e-3 (one bf16 ulp of the local sums, 2.3e-4 relative); torch on the
    # whole batch in that layout 4.9e-4, contiguous 0. syncbn/functional.py grad_sums calls
    # native_batch_norm_backward with weight=None, which on a non-contiguous half input returns
    # sums in the input's precision.
    check_layer(
        LayerConfig(
            world=2, x_dtype="bfloat16", p_dtype="float32", channels=1,
            steps=(Step(sizes=(3, 3), spatial=((3,), (3,)), layouts=("sliced_c", "contiguous")),),
        )
    )


@pytest.mark.xfail(strict=True, reason="debias=True with momentum=0: 0/0 rate, running statistics become NaN")
def test_debias_zero_momentum() -> None:
    # KNOWN_FAILURES: debias_zero_momentum. The rate m / (1 - (1 - m)**t) is 0/0 at m = 0;
    # running_mean/var turn NaN after the first step (one process already). Expected: the
    # rate's limit 1/t (the cumulative average), or a ValueError at construction.
    check_layer(LayerConfig(world=1, momentum=0.0, debias=True, steps=(Step(sizes=(2,)),)))


@pytest.mark.deep
@pytest.mark.xfail(strict=True, reason="consistency mode: a rank with a wrong channel count raises alone, before the check; its peers wait")
def test_consistency_mode_rank_local_input_error() -> None:
    # KNOWN_FAILURES: rank_local_input_error. SYNCBN_DEBUG's documented purpose is a ValueError on
    # every rank when ranks disagree on the channel count; but SyncBatchNorm.forward's input
    # check (_check_input) raises on the bad rank before comm.check_consistency runs, so rank 0
    # waits in the all_gather until the group's timeout.
    from .configs import ErrorConfig
    from .driver import check_errors

    check_errors(ErrorConfig(world=2, bad=(1,), kind="channels", debug=True))


@pytest.mark.deep
@pytest.mark.xfail(strict=True, reason="inductor, rank batches 3 and 1: ranks compile different graphs, parallel branches' collectives paired wrongly")
def test_compile_parallel_branches_different_graphs() -> None:
    # KNOWN_FAILURES: compile_collective_order. A ResNet downsample block (two BNs of width 4 in
    # parallel branches) under torch.compile(backend="inductor"): rank 1's one-sample batch is
    # specialized, the ranks' graphs issue the branches' all_reduces in different orders, no
    # error: output off by 0.038, grad_input by 0.079, bn1.running_var by 0.10. Minutes of
    # inductor compilation on a 2-core machine: deep profile only.
    from .configs import CompileConfig

    check_model(CompileConfig(world=2, backend="inductor", model="downsample", sizes=((3, 1),)))


@pytest.mark.deep
@pytest.mark.xfail(strict=True, reason="aot_eager, an empty rank: ranks' compiled graphs run the collectives in different orders (sizes [8, 9])")
def test_compile_empty_rank_collective_order() -> None:
    # KNOWN_FAILURES: compile_collective_order. The downsample block compiled with aot_eager, rank
    # 0's batch empty: "the ranks of the group passed vectors of different sizes [8, 9] to the
    # same all_reduce" (a backward sum of 2C paired with a forward vector of 2C + 1) on every
    # rank. With eager DDP the same data matches torch.
    from .configs import CompileConfig

    check_model(CompileConfig(world=2, backend="aot_eager", model="downsample", sizes=((0, 3),)))


@pytest.mark.xfail(strict=True, reason="an infinite running_mean turns NaN at the next update (lerp_), torch keeps inf")
def test_infinite_running_mean_propagates() -> None:
    # KNOWN_FAILURES: inf_running_stats_nan. An inf input makes the group's mean and torch's
    # running_mean inf; at the next training step torch computes (1 - m) * inf + m * mean = inf,
    # syncbn's running_mean.lerp_(mean, m) gives inf + m * (mean - inf) = NaN
    # (syncbn/functional.py update_running_stats). Search's example: 3 ranks, 1 channel.
    check_layer(
        LayerConfig(
            world=2, channels=1,
            steps=(Step(sizes=(1, 1), nonfinite=(0, "inf")), Step(sizes=(1, 1)), Step(train=False, sizes=(1, 1))),
        )
    )


@pytest.mark.xfail(strict=True, reason="a running_var that overflowed to inf (as torch's does) turns NaN at the next update (lerp_)")
def test_overflowed_running_var_propagates() -> None:
    # KNOWN_FAILURES: inf_running_stats_nan. float32 values ~1e19: the unbiased batch variance
    # (9.8e37) overflows the float32 running_var to inf in torch's layer and in syncbn alike;
    # at the next step torch keeps inf, syncbn's lerp_ gives NaN.
    check_layer(
        LayerConfig(
            world=2, channels=1, x_dtype="float32", p_dtype="float32", log_scale=19.0, offset=1.0, seed=2,
            steps=(Step(sizes=(4, 4), spatial=((3, 2), (3, 2))), Step(sizes=(4, 4), spatial=((3, 2), (3, 2)))),
        )
    )
