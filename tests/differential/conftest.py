"""Profiles of the differential harness.

fast (default): seeded (derandomized), a few dozen examples in all, part of the README's suite.
deep: the tests marked ``deep``; skipped unless selected with ``-m deep`` (or
``SYNCBN_DIFF_PROFILE=deep``). Seeded like the fast profile unless ``SYNCBN_DIFF_RANDOM=1``
(new configurations every run); several minutes (bounded by their max_examples).

    .venv/bin/python -m pytest -n 2 tests/differential              # fast profile
    .venv/bin/python -m pytest -n 2 -m deep tests/differential      # deep profile (by hand)
"""

from __future__ import annotations

import os

import pytest

DEEP_SELECTED_ENV = "SYNCBN_DIFF_PROFILE"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deep: the differential harness's deep profile (minutes; run with -m deep or SYNCBN_DIFF_PROFILE=deep)",
    )


def _deep_selected(config: pytest.Config) -> bool:
    if os.environ.get(DEEP_SELECTED_ENV, "").strip().lower() == "deep":
        return True
    expr = config.getoption("markexpr", default="") or ""
    return "deep" in expr and "not deep" not in expr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _deep_selected(config):
        return
    skip = pytest.mark.skip(reason="deep profile of the differential harness: run with -m deep")
    for item in items:
        if "deep" in item.keywords:
            item.add_marker(skip)
