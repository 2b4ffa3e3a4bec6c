"""The ecosystem tier runs next to other jobs on 2 cores: one intra-op thread per test."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # A fixture, not an import-time call: the main suite collects this folder too (and skips it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
