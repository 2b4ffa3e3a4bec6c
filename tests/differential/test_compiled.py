"""torch.compile'd converted models against the eager torch model on the whole batch.

Per-rank batch sizes change between steps and include 0 and 1 (dynamo specializes them, so
ranks compile different graphs); models include two parallel branches of equal width (a ResNet
downsample block), where the order of the collectives across ranks matters. Each example
compiles on every rank: these tests have few examples, and inductor (whose C++ builds take
minutes on a loaded 2-core machine) runs in the deep profile only.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from .configs import CompileConfig, compile_configs
from .driver import check_model
from .profiles import DEEP, FAST


@settings(FAST, max_examples=1)
@given(cfg=compile_configs(backends=("eager", "aot_eager"), max_world=2, max_steps=2))
def test_compiled_matches_torch(cfg: CompileConfig) -> None:
    check_model(cfg)


@pytest.mark.deep
@settings(DEEP, max_examples=8)
@given(cfg=compile_configs(backends=("eager", "aot_eager"), max_world=3, max_steps=3))
def test_compiled_matches_torch_deep(cfg: CompileConfig) -> None:
    check_model(cfg)


@pytest.mark.deep
@settings(DEEP, max_examples=2)
@given(cfg=compile_configs(backends=("inductor",), max_world=2, max_steps=2))
def test_inductor_matches_torch_deep(cfg: CompileConfig) -> None:
    check_model(cfg)
