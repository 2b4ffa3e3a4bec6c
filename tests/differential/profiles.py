"""hypothesis settings of the two profiles (see conftest.py)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["FAST", "DEEP"]

_COMMON = dict(
    deadline=None,  # per-example time depends on the machine's load; the harness has its own timeouts
    database=None,  # nothing written into the checkout; a failure prints its config and a blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

# Seeded: the same examples on every run, so the README's suite is deterministic.
FAST = settings(derandomize=True, max_examples=20, **_COMMON)
# Seeded too by default, so that CI's deep tier checks the same configurations every run (a random
# search that finds something new would fail an unrelated change). SYNCBN_DIFF_RANDOM=1 draws new
# configurations (a failure prints @reproduce_failure): the way to search further.
DEEP = settings(derandomize=os.environ.get("SYNCBN_DIFF_RANDOM", "") != "1", max_examples=300, **_COMMON)
