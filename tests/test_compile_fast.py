"""Fast-tier stand-ins for test_compile.py's slow tests (``-m slow``), on the same helpers.

- test_converted_resnet_is_one_graph (ResNet-18): a small converted net with a residual block is
  one graph with no break, and its fullgraph compile equals eager;
- test_bf16_autocast_compiled (aot_eager and inductor): the aot_eager half;
- test_compiled_layers_equal_eager_inductor: test_compiled_layers_equal_eager_aot_eager (every
  option, the same parity through aot_eager) stays in the fast tier.

Each runs on fresh processes (``run_on_fresh_ranks``): a compiled first step must not depend on
what earlier tests left in a shared worker (an eager step that filled a module cache the compiled
step would otherwise have to fill while being traced).
"""

from __future__ import annotations

import torch
from torch import nn

import syncbn

from .harness import run_on_fresh_ranks
from .test_compile import _autocast_parity, _one_graph_equal_to_eager, _reset


class _ResidualNet(nn.Module):
    """conv-BN-ReLU, a residual block of two conv-BN, pool, linear: ResNet's shape, a few layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)))


def _small_model_no_breaks(rank: int, world_size: int) -> None:
    _reset()
    torch.manual_seed(0)
    model = syncbn.convert_sync_bn(_ResidualNet()).double().train()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64) + rank
    _one_graph_equal_to_eager(model, x)


def test_converted_residual_net_is_one_graph():
    run_on_fresh_ranks(2, _small_model_no_breaks, timeout=300)


def test_bf16_autocast_compiled_aot_eager():
    run_on_fresh_ranks(2, _autocast_parity, "aot_eager", timeout=300)


def _variance_beyond_float32(rank: int, world_size: int) -> list[str]:
    _reset()
    torch.manual_seed(rank)
    bn = syncbn.SyncBatchNorm(2)
    big = torch.randn(4, 2, 3) * 3e19  # float32 variance ~9e38 > 3.4e38
    outcomes = []
    for name, layer in (("eager", bn), ("compiled", torch.compile(bn, backend="aot_eager", fullgraph=True))):
        before = bn.running_var.clone()
        try:
            layer(big)
            outcomes.append(f"{name}: no error")
        except Exception as err:  # noqa: BLE001 - the test reports which error came
            ok = "exceeds the range of torch.float32" in str(err) or "within the range of torch.float32" in str(err)
            outcomes.append(f"{name}: {'refused' if ok else type(err).__name__ + ' ' + str(err)[:200]}")
        assert torch.equal(bn.running_var, before)  # nothing taken from the refused batch
    # The layer still works afterwards, compiled, on a batch in range.
    y = torch.compile(bn, backend="aot_eager")(torch.randn(4, 2, 3) * 5 + 3)
    outcomes.append(f"finite afterwards: {bool(y.isfinite().all())}")
    return outcomes


def test_variance_beyond_float32_range_refused_eager_and_compiled():
    # A float32 batch variance beyond float32's range would normalize every value to 0: every rank
    # refuses it, eagerly with a ValueError, compiled with torch's device-side assert.
    results = run_on_fresh_ranks(2, _variance_beyond_float32, timeout=300)
    assert results == [["eager: refused", "compiled: refused", "finite afterwards: True"]] * 2
