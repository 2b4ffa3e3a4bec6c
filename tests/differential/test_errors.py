"""Inputs torch refuses: syncbn must raise ValueError on every rank and leave no rank waiting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from .configs import ErrorConfig, error_configs
from .driver import check_errors
from .profiles import DEEP, FAST


@settings(FAST, max_examples=6)
@given(cfg=error_configs(max_world=3))
def test_refused_inputs_raise_value_error(cfg: ErrorConfig) -> None:
    check_errors(cfg)


@pytest.mark.deep
@settings(DEEP, max_examples=40)
@given(cfg=error_configs(max_world=4))
def test_refused_inputs_raise_value_error_deep(cfg: ErrorConfig) -> None:
    check_errors(cfg)
