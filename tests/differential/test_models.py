"""Converted torch models against the torch model, over configurations hypothesis generates:
conversion (before training, revert after), hooks, DDP, activation checkpointing, gradient
penalties (double backward), FX tracing.

Reference and tolerance: driver.model_problems (float64, MODEL_RTOL relative).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from .configs import ModelConfig, model_configs
from .driver import check_model
from .profiles import DEEP, FAST


@settings(FAST, max_examples=8)
@given(cfg=model_configs(max_world=3, max_steps=2))
def test_model_matches_torch(cfg: ModelConfig) -> None:
    check_model(cfg)


@pytest.mark.deep
@settings(DEEP, max_examples=120)
@given(cfg=model_configs(max_world=4, max_steps=3))
def test_model_matches_torch_deep(cfg: ModelConfig) -> None:
    check_model(cfg)
