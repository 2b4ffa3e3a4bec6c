"""Every finding of the differential harness, as a named test with its minimal configuration.

Each test states the promise for one configuration the harness found broken (shrunk by
hypothesis, or reduced by hand from its example); each comment says what was measured before the
fix. A new finding that cannot be fixed at once is added here marked ``xfail(strict=True)`` with a
one-line reason, and its region's name goes into ``configs.KNOWN_FAILURES`` (which keeps the
hypothesis search out of the region meanwhile); the mark turns into a failure the moment a fix
lands.

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


@pytest.mark.parametrize("world", [1, 2])
def test_track_running_stats_switched_off(world: int) -> None:
    # Region track_running_stats_toggle (configs.REGIONS). What the harness measured before the fix: torch stops updating running_mean/var and
    # num_batches_tracked; syncbn moves them (0.09 / 0.08 here) and counts the step.
    sizes = (5,) if world == 1 else (2, 3)
    check_layer(LayerConfig(world=world, steps=(Step(sizes=sizes, track=False), Step(train=False, sizes=sizes))))


@pytest.mark.parametrize(
    "x_dtype, offset", [("float64", 10.0), ("float64", 1e3), ("float32", 1e4)], ids=["float64-1e1", "float64-1e3", "float32-1e4"]
)
def test_large_mean_variance(x_dtype: str, offset: float) -> None:
    # Region large_mean_variance (configs.REGIONS). What the harness measured before the fix: float64: output error 4.5e-14 at |mean|/std = 10
    # (torch's own, float64 noise: 9e-15), 5.6e-10 at 1e3 (torch 6e-13); float32 at 1e4:
    # running_var relative error 3.2e-6 (torch 5e-8).
    check_layer(
        LayerConfig(
            world=2, x_dtype=x_dtype, p_dtype=x_dtype, offset=offset, seed=1,
            steps=(Step(sizes=(3, 5), spatial=((4,), (4,))),),
        )
    )


def test_large_mean_variance_float16() -> None:
    # Region large_mean_variance (configs.REGIONS). What the harness measured before the fix: The search's example (3 ranks, uneven): running_var
    # relative error 2.9e-6 where torch's float16 layer has 2e-7 (bound 3.35e-6 absolute).
    check_layer(
        LayerConfig(
            world=3, x_dtype="float16", p_dtype="float32", offset=1e3, channels=3, momentum=None, eps=1e-3, seed=485,
            steps=(Step(sizes=(4, 1, 2), spatial=((3, 3), (1, 1), (2, 3))),),
        )
    )


def test_float64_huge_values_overflow() -> None:
    # Region huge_scale_overflow (configs.REGIONS). What the harness measured before the fix: Outputs off by 1.7 and running_var inf (torch 7.9e307).
    check_layer(LayerConfig(world=2, log_scale=154.0, steps=(Step(sizes=(2, 2)),)))


def test_double_backward_bn_frozen_head() -> None:
    # Region double_backward (configs.REGIONS). What the harness measured before the fix: Gradient penalty on the input gradient: grad_input off by
    # 3e-4, conv weight grad by 0.012, BN weight grad by 0.017; no error raised.
    check_model(ModelConfig(world=2, model="bn_head", sizes=((2, 3),), penalty=True))


def test_fx_symbolic_trace_converted_model() -> None:
    # Region fx_trace (configs.REGIONS). What the harness measured before the fix:
    check_model(ModelConfig(world=2, model="mlp", sizes=((2, 3),), fx=True))


def test_hooks_lost_in_conversion() -> None:
    # Region hooks_lost_in_conversion (configs.REGIONS). What the harness measured before the fix: Output off by 0.36, running stats by 0.08.
    check_model(ModelConfig(world=2, model="convnet", sizes=((2, 3),), hooks="before"))


def test_hooks_lost_in_revert() -> None:
    # Region hooks_lost_in_conversion (configs.REGIONS). What the harness measured before the fix: Hooks registered after convert_sync_bn work in
    # training; after revert_sync_bn the eval output is off by 0.16 (one process already).
    check_model(ModelConfig(world=1, model="convnet", sizes=((1,),), width=2, hooks="after", revert=True))


# ------------------------------------------------------------------------------------------------
# Found by the harness
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_parameters_synchronized(dtype: str) -> None:
    # Region half_parameters_synced (configs.REGIONS). What the harness measured before the fix: A model cast with .to(torch.bfloat16) (parameters
    # and input bf16) trains with torch's BatchNorm; syncbn's synchronized forward raises
    # "RuntimeError: expected scalar type BFloat16 but found Float" in torch.batch_norm
    # (syncbn/functional.py normalize: float32 statistics with bf16 weight), after the collective.
    check_layer(LayerConfig(world=2, x_dtype=dtype, p_dtype=dtype, steps=(Step(sizes=(2, 2)),)))


def test_refused_dtypes_raise_value_error() -> None:
    # Region torch_refused_dtypes (configs.REGIONS). What the harness measured before the fix: float64 input into float32 parameters: torch raises
    # RuntimeError "mixed dtype (CPU)"; syncbn raises torch's RuntimeError from its normalize,
    # after the forward all_reduce, not a ValueError naming the layer before any collective.
    check_layer(LayerConfig(world=2, x_dtype="float64", p_dtype="float32", steps=(Step(sizes=(2, 2)),)))


@pytest.mark.deep
def test_refused_dtypes_empty_rank_hangs() -> None:
    # Region torch_refused_dtypes (configs.REGIONS). What the harness measured before the fix: Rank 1 raises RuntimeError in normalize; rank 0
    # (empty batch: its normalize of an empty tensor does not check dtypes) returns, runs the
    # backward and waits in its all_reduce for a peer that never comes.
    check_layer(LayerConfig(world=2, x_dtype="float64", p_dtype="float32", steps=(Step(sizes=(0, 2)),)), timeout=20)


def test_half_input_strided_grad_sums() -> None:
    # Region half_grad_sums_strided (configs.REGIONS). What the harness measured before the fix: A channel-sliced bf16 input: the group's
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


def test_debias_zero_momentum() -> None:
    # Region debias_zero_momentum (configs.REGIONS). What the harness measured before the fix: The rate m / (1 - (1 - m)**t) is 0/0 at m = 0;
    # running_mean/var turn NaN after the first step (one process already). Expected: the
    # rate's limit 1/t (the cumulative average), or a ValueError at construction.
    check_layer(LayerConfig(world=1, momentum=0.0, debias=True, steps=(Step(sizes=(2,)),)))


@pytest.mark.deep
def test_consistency_mode_rank_local_input_error() -> None:
    # Region rank_local_input_error (configs.REGIONS). What the harness measured before the fix: SYNCBN_DEBUG's documented purpose is a ValueError on
    # every rank when ranks disagree on the channel count; but SyncBatchNorm.forward's input
    # check (_check_input) raises on the bad rank before comm.check_consistency runs, so rank 0
    # waits in the all_gather until the group's timeout.
    from .configs import ErrorConfig
    from .driver import check_errors

    check_errors(ErrorConfig(world=2, bad=(1,), kind="channels", debug=True))


@pytest.mark.deep
def test_compile_parallel_branches_different_graphs() -> None:
    # Region compile_collective_order (configs.REGIONS). What the harness measured before the fix: A ResNet downsample block (two BNs of width 4 in
    # parallel branches) under torch.compile(backend="inductor"): rank 1's one-sample batch is
    # specialized, the ranks' graphs issue the branches' all_reduces in different orders, no
    # error: output off by 0.038, grad_input by 0.079, bn1.running_var by 0.10. Minutes of
    # inductor compilation on a 2-core machine: deep profile only.
    from .configs import CompileConfig

    check_model(CompileConfig(world=2, backend="inductor", model="downsample", sizes=((3, 1),)))


@pytest.mark.deep
def test_compile_empty_rank_collective_order() -> None:
    # Region compile_collective_order (configs.REGIONS). What the harness measured before the fix: The downsample block compiled with aot_eager, rank
    # 0's batch empty: "the ranks of the group passed vectors of different sizes [8, 9] to the
    # same all_reduce" (a backward sum of 2C paired with a forward vector of 2C + 1) on every
    # rank. With eager DDP the same data matches torch.
    from .configs import CompileConfig

    check_model(CompileConfig(world=2, backend="aot_eager", model="downsample", sizes=((0, 3),)))


def test_infinite_running_mean_propagates() -> None:
    # Region inf_running_stats_nan (configs.REGIONS). What the harness measured before the fix: An inf input makes the group's mean and torch's
    # running_mean inf; at the next training step torch computes (1 - m) * inf + m * mean = inf,
    # syncbn's running_mean.lerp_(mean, m) gives inf + m * (mean - inf) = NaN
    # (syncbn/functional.py update_running_stats). Search's example: 3 ranks, 1 channel.
    check_layer(
        LayerConfig(
            world=2, channels=1,
            steps=(Step(sizes=(1, 1), nonfinite=(0, "inf")), Step(sizes=(1, 1)), Step(train=False, sizes=(1, 1))),
        )
    )


def test_overflowed_running_var_propagates() -> None:
    # Region inf_running_stats_nan (configs.REGIONS). What the harness measured before the fix: float32 values ~1e19: the unbiased batch variance
    # (9.8e37) overflows the float32 running_var to inf in torch's layer and in syncbn alike;
    # at the next step torch keeps inf, syncbn's lerp_ gives NaN.
    check_layer(
        LayerConfig(
            world=2, channels=1, x_dtype="float32", p_dtype="float32", log_scale=19.0, offset=1.0, seed=2,
            steps=(Step(sizes=(4, 4), spatial=((3, 2), (3, 2))), Step(sizes=(4, 4), spatial=((3, 2), (3, 2)))),
        )
    )


def test_fx_trace_with_hooks_applies_them_once() -> None:
    # Region fx_trace with hooks (deep profile's example). What the harness measured before the
    # fix: a forward hook registered before conversion, the converted model traced with FX: the
    # tracer ran the hook around the traced forward and the graph's call of the layer ran it again
    # (output off by 0.41, running_var by 0.046).
    check_model(ModelConfig(world=1, model="convnet", sizes=((1,),), width=2, hooks="before", fx=True))


def test_refused_dtypes_whole_group_empty() -> None:
    # Region torch_refused_dtypes (deep profile's example): every rank's batch empty. torch looks
    # at no value and passes; no rank can know the group is empty before the collective, so the
    # synchronized layer refuses the dtypes on every rank (ValueError), as for any other batch.
    check_layer(
        LayerConfig(world=2, x_dtype="float64", p_dtype="float32", channels=1, affine=False,
                    steps=(Step(sizes=(0, 0), spatial=((), ())),))
    )


def test_grad_input_at_large_mean_float64() -> None:
    # Region large_mean_variance, backward (deep profile's example): float64, one sample per rank,
    # |mean|/std = 1e7. What the harness measured before the fix: grad_input off by 3.5e-12
    # relative (torch 1.5e-16): the folded eval kernel that applies the input-gradient terms
    # computes x * alpha + beta, which cancels at large |mean|/std.
    check_layer(
        LayerConfig(world=2, channels=1, affine=False, offset=1e7,
                    steps=(Step(sizes=(1, 1), spatial=((), ())), Step(train=False, sizes=(0, 0), spatial=((), ()))))
    )


def test_refused_dtypes_in_eval_on_an_empty_rank() -> None:
    # Region torch_refused_dtypes (deep profile's example): eval, rank 0's batch empty, rank 1's
    # not. What the harness measured before the fix: rank 0 returned an empty result while torch
    # (and rank 1) refuse the dtypes; every rank of a group of several now raises ValueError.
    check_layer(
        LayerConfig(world=2, x_dtype="float64", p_dtype="float32", channels=1,
                    steps=(Step(train=False, sizes=(0, 1), spatial=((1,), (1,))),))
    )


def test_renorm_refuses_dtypes_in_a_group_of_one() -> None:
    # Region torch_refused_dtypes with SyncBatchRenorm on one rank (deep profile's example):
    # float64 input, float32 buffers. Its reference is the closed form, so nothing refused there;
    # the layer (whose kernel would raise RuntimeError) raises ValueError, as for plain batch norm.
    check_layer(
        LayerConfig(world=1, kind="renorm", x_dtype="float64", p_dtype="float32", channels=1, affine=False,
                    r_max=1.0, d_max=0.0, steps=(Step(sizes=(2,), spatial=((),)),))
    )


def test_float32_variance_beyond_float32_range() -> None:
    # Region float32_variance_overflow (deep profile's example, SyncBatchRenorm at r_max=1, d_max=0,
    # which is plain batch norm). float32 values ~1e19: the variance (~1e38) overflows float32 in
    # torch's statistics kernel, which syncbn uses per rank; torch's training kernel computes
    # invstd without storing the variance and normalizes. What the harness measured before the
    # fix: output 0 where torch gives 1.23. Now every rank raises ValueError (the reference
    # expects it wherever the group's float64 variance exceeds float32's range).
    check_layer(
        LayerConfig(world=3, kind="renorm", x_dtype="float32", p_dtype="float32", channels=1, affine=False,
                    r_max=1.0, d_max=0.0, log_scale=19.0, seed=57,
                    steps=(Step(sizes=(0, 1, 3), spatial=((3,), (3,), (3,))),
                           Step(sizes=(0, 0, 1), spatial=((3,), (3,), (3,))),))
    )


def test_float32_group_variance_beyond_float32_range() -> None:
    # Region float32_variance_overflow: spread ~2e19 on every rank, so the group's variance
    # (~4e38) exceeds float32's range: every rank raises ValueError before anything changes.
    check_layer(
        LayerConfig(world=2, x_dtype="float32", p_dtype="float32", channels=2, log_scale=19.3, seed=3,
                    steps=(Step(sizes=(3, 2), spatial=((4,), (4,))),))
    )


def test_float32_squared_deviations_beyond_float32_range() -> None:
    # Region float32_variance_overflow: the variance (~6e37) fits float32, but single squared
    # deviations (~4e38) do not; torch's CPU statistics kernel squares them in float32 and gets
    # inf, and its single-process layer outputs 0. A synchronized rank recomputes its statistics
    # in float64 there and normalizes (the harness's float64 reference).
    check_layer(
        LayerConfig(world=2, x_dtype="float32", p_dtype="float32", channels=1, affine=False,
                    log_scale=18.9, offset=1.4, seed=3,
                    steps=(Step(sizes=(3, 3), spatial=((4,), (4,))),))
    )


def test_float32_mean_rounded_on_a_rank() -> None:
    # Region large_mean_variance (random deep run's example): float32 values ~1e7 (integers),
    # ranks of 0, 0, 1 and 2 values. torch's CPU statistics kernel rounds a rank's mean to float32
    # (10000000.5 -> 1e7) and returns the second moment around that rounded mean (2.5), not the
    # variance (2.25). What the harness measured before the fix: running_var 1.65% off, grad_input
    # 3.6% (torch 9.5e-8). A refined rank now sends the variance around its float64 mean.
    check_layer(
        LayerConfig(world=4, x_dtype="float32", p_dtype="float32", offset=1e7, channels=1, affine=False, seed=2,
                    steps=(Step(sizes=(0, 0, 1, 2)), Step(train=False, sizes=(0, 0, 0, 0))))
    )


def test_bfloat16_running_mean_rounded_once() -> None:
    # Region large_mean_variance, eval after training (deep profile's example): bfloat16 input and
    # buffers, values ~1e-18 with spread 1e-20. What the harness measured before the fix: eval
    # output 34% off (bound 26%): running_mean one bfloat16 unit off torch's, which computes
    # (1 - m) * running + m * mean in double and rounds once, where the in-place update rounded
    # twice; the eval output (x - running_mean) * invstd magnifies that unit.
    check_layer(
        LayerConfig(world=1, kind="renorm", channels=4, x_dtype="bfloat16", p_dtype="bfloat16", affine=False,
                    r_max=1.0, d_max=0.0, log_scale=-20.0, offset=100.0,
                    steps=(Step(sizes=(2,), spatial=((),)), Step(train=False, sizes=(1,), spatial=((),))))
    )


def test_float64_one_value_per_rank_at_large_mean() -> None:
    # Region large_mean_variance (deep profile's example): float64, one value per rank,
    # |mean|/std = 1e4. Measured: output 1.82e-12 off (one ulp of the mean, 1.82e-12 at 1e4,
    # times invstd ~1), grad_input 8.1e-13, where the bound from torch's own error was 8.6e-13
    # and 8.5e-15: the float64 reference is torch's layer itself, so its own error hides the
    # rounding of the mean, which the merge rounds differently. The harness admits two ulps of the
    # mean's effect (reference.py's tolerance rule); syncbn is within one.
    check_layer(
        LayerConfig(world=3, x_dtype="float64", p_dtype="float64", offset=1e4, channels=1, affine=False, seed=169,
                    steps=(Step(sizes=(1, 1, 1), spatial=((1,), (1,), (1,))),))
    )


def test_nan_in_one_channel_does_not_hide_another_large_mean() -> None:
    # Region large_mean_variance with a NaN input (deep profile's example): float64, |mean|/std
    # = 1e3, a NaN in channel 0 of rank 2. What the harness measured before the fix: channel 1's
    # running_var 8.6e-15 relative off (bound 5e-15): the NaN made the rank's check over its
    # channels NaN, so channel 1's mean went unrefined.
    check_layer(
        LayerConfig(world=4, x_dtype="float64", p_dtype="float64", offset=1e3, channels=2, affine=False, seed=61,
                    r_max=1.0, d_max=0.0,
                    steps=(Step(sizes=(1, 1, 3, 0), spatial=((1, 1),) * 4, nonfinite=(2, "nan")),
                           Step(train=False, sizes=(0, 0, 0, 0), spatial=((1, 1),) * 4)))
    )


def test_inf_in_one_channel_while_another_refines() -> None:
    # Region inf_running_stats_nan (deep profile's example): an inf in channel 0 of rank 0 whose
    # channel 1 (one value) refines its mean. What the harness measured before the fix: the
    # correction of the inf channel was inf - inf = NaN, so the group's mean was NaN where torch's
    # is inf.
    check_layer(
        LayerConfig(world=2, x_dtype="float64", p_dtype="float64", channels=2, affine=False,
                    steps=(Step(sizes=(1, 1), spatial=((1, 1),) * 2, nonfinite=(0, "inf")),
                           Step(train=False, sizes=(0, 0), spatial=((1, 1),) * 2)))
    )


def test_renorm_empty_batch_parameter_gradients() -> None:
    # Harness (random deep run's example): SyncBatchRenorm on one rank, an empty batch, only the
    # parameters require grad. The closed-form reference returned no parameter gradients; torch's
    # layers (and syncbn) give zeros for an empty batch. The reference now does too.
    check_layer(
        LayerConfig(world=1, kind="renorm", channels=1, r_max=1.0, d_max=0.0,
                    steps=(Step(sizes=(0,), spatial=((1, 1, 1),), grad="params"),
                           Step(train=False, sizes=(0,), spatial=((1, 1, 1),))))
    )
