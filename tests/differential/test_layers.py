"""One synchronized layer against torch, over configurations hypothesis generates.

See reference.py for the contract and tolerance, configs.py for the space and KNOWN_FAILURES.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from .configs import LayerConfig, layer_configs
from .driver import check_layer
from .profiles import DEEP, FAST


@settings(FAST, max_examples=40)
@given(cfg=layer_configs(max_world=3, max_steps=3))
def test_layer_matches_torch(cfg: LayerConfig) -> None:
    check_layer(cfg)


@pytest.mark.deep
@settings(DEEP, max_examples=600)
@given(cfg=layer_configs(max_world=4, max_steps=4))
def test_layer_matches_torch_deep(cfg: LayerConfig) -> None:
    check_layer(cfg)
