"""The edges of the promise on real timm and torchvision models: feature hooks, frozen statistics,
FX feature extraction, and torch.compile with DDP when the ranks' last batches differ.

Runs in .venv-eco; skipped where timm or torchvision is missing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="ecosystem tier: needs timm (bash scripts/setup_env.sh --ecosystem)")
torchvision = pytest.importorskip("torchvision", reason="ecosystem tier: needs torchvision (.venv-eco)")

import syncbn  # noqa: E402

from ..harness import run_on_ranks  # noqa: E402
from ..parity import assert_close  # noqa: E402
from .models import INPUT, build  # noqa: E402


def test_timm_hook_features_survive_conversion():
    """features_only with feature_cls='hook' collects maps through forward hooks on batch norms."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True, feature_cls="hook").double()
    x = torch.randn(2, *INPUT, dtype=torch.float64)
    expected = [f.detach() for f in copy.deepcopy(model).eval()(x)]
    converted = syncbn.convert_sync_bn(model).eval()
    got = converted(x)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    reverted = syncbn.revert_sync_bn(converted)
    assert len(reverted(x)) == 5


def test_frozen_statistics_on_a_converted_timm_model_follow_timm():
    """track_running_stats switched off on BatchNormAct2d layers (fine-tuning): buffers stay, as timm's do."""
    x = torch.randn(4, *INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = build("mobilenetv3_small_050")
    ours = syncbn.convert_sync_bn(copy.deepcopy(ref))
    for model in (ref, ours):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
        model.train()
        for _ in range(3):
            model(x)
    assert_close(ours.eval()(x), ref.eval()(x), 1e-12, "eval logits")
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", [True, False])
def test_torchvision_feature_extractor_traces_a_converted_model(training):
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = build("resnet18")
    ours = syncbn.convert_sync_bn(copy.deepcopy(ref))
    nodes = {"layer1": "l1", "layer3": "l3", "fc": "out"}
    ref_fx = create_feature_extractor(ref.train(training), nodes)
    our_fx = create_feature_extractor(ours.train(training), nodes)
    x = torch.randn(3, *INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, expected = our_fx(x), ref_fx(x)
    assert list(got) == ["l1", "l3", "out"]
    for k in expected:
        assert_close(got[k], expected[k], 1e-12, k)


def _compiled_ddp_uneven_last_batch(rank: int, world_size: int) -> None:
    """torch.compile(DDP(converted resnet18)), 3 images per rank, then a last batch of 3 and 2."""
    import torch._dynamo

    import datetime

    import torch.distributed as dist

    torch._dynamo.reset()
    torch.set_num_threads(1)
    # At the last batch rank 1 recompiles (a new batch size) while rank 0 waits for it in the
    # first collective: on a loaded 2-core machine inductor takes minutes, longer than the pool's
    # 60 s group timeout. A group with a timeout that covers a compilation, as a user would set.
    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=600))
    ref = build("resnet18")
    model = nn.parallel.DistributedDataParallel(
        syncbn.convert_sync_bn(copy.deepcopy(ref), process_group=group), process_group=group
    )
    compiled = torch.compile(model)
    gen = torch.Generator().manual_seed(3)
    for step, sizes in enumerate([[3, 3], [3, 3], [3, 2]]):
        full = torch.randn(sum(sizes), *INPUT, generator=gen, dtype=torch.float64)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        y = compiled.train()(full[lo:hi])
        with torch.no_grad():
            y_ref = ref.train()(full)
        assert_close(y, y_ref[lo:hi], 1e-9, f"step {step} {sizes} logits")
        y.square().mean().backward()  # the backward's collectives pair up too (else: a hang or an error)
        model.zero_grad()
        for (name, b), c in zip(ref.named_buffers(), model.module.buffers()):
            if b.is_floating_point():
                assert_close(c, b, 1e-9, f"step {step} {name}")
    dist.destroy_process_group(group)


def test_compiled_ddp_with_an_uneven_last_batch_equals_one_process():
    run_on_ranks(2, _compiled_ddp_uneven_last_batch, timeout=900)
