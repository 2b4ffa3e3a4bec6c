"""Test tiers, and what the worker pools of tests/harness.py cost.

Tiers by marker (registered in pyproject.toml):

- the fast tier is the default: ``pytest -n 2 tests`` (the README's command) leaves out every test
  marked ``slow``;
- ``pytest -n 2 -m slow tests`` runs the slow tier: end-to-end launcher trainings, multi-host
  namespaces, elastic restarts, inductor, benchmark runs that compile (``.ci/run`` runs it after
  the fast tier);
- any ``-m`` expression replaces the default (``-m "slow or not slow"`` runs both), and a slow test
  named by its node id (``tests/test_elastic.py::test_...``) runs too.

Every slow test has a cheaper stand-in in the fast tier for the behaviour it checks.

Order: tests that run on worker pools of 3 or more ranks (by their ``world_size`` parameter, or a
literal ``run_on_ranks(N, ...)`` in their body) run after the others, by world size, so that the
harness's pool cap closes and restarts pools a few times per run instead of at every change of
world size (a restart costs under a second; importing the test module in the new ranks can cost
more).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections import Counter

import pytest

_SLOW_HINT = "run them with -m slow"
_pool_stats: Counter = Counter()


def _named(config: pytest.Config) -> set[str]:
    """Node ids given on the command line (``path::name``), relative to the rootdir."""
    named = set()
    for arg in config.args:
        if "::" not in arg:
            continue
        path, rest = arg.split("::", 1)
        try:
            path = os.path.relpath(os.path.abspath(path), str(config.rootpath))
        except ValueError:
            pass
        named.add(f"{path.replace(os.sep, '/')}::{rest}")
    return named


_RUN_ON_RANKS = re.compile(r"run_on_ranks\(\s*(\d+)\s*,")


def _world_size(item: pytest.Item) -> int:
    """The world size of the pool a test uses, as far as collection can tell (2 when unknown)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and isinstance(callspec.params.get("world_size"), int):
        return callspec.params["world_size"]
    fn = getattr(item, "function", None)
    try:
        sizes = [int(n) for n in _RUN_ON_RANKS.findall(inspect.getsource(fn))] if fn else []
    except (OSError, TypeError):
        sizes = []
    return max(sizes, default=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Stable: within one world size the collection order stays.
    items.sort(key=lambda item: max(_world_size(item), 2))
    if config.option.markexpr:  # the user chose the tier
        return
    named = _named(config)
    keep, slow = [], []
    for item in items:
        explicit = any(item.nodeid == n or item.nodeid.startswith(n + "[") for n in named)
        (slow if item.get_closest_marker("slow") and not explicit else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> str:
    if config.option.markexpr:
        return f"tier: -m {config.option.markexpr!r}"
    return f"tier: fast (tests marked slow are deselected; {_SLOW_HINT})"


@pytest.fixture
def forked_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' worker processes (benchmarks/_spawn.py) forked from the harness's fork server,
    which has imported torch, instead of spawned: a smoke run checks what they compute, not how
    fast a process starts (saves a torch import per rank)."""
    import types

    from benchmarks import _spawn

    from .harness import mp_context

    monkeypatch.setattr(_spawn, "mp", types.SimpleNamespace(get_context=lambda method: mp_context()))


def _harness_stats() -> dict[str, int]:
    harness = sys.modules.get("tests.harness")
    return harness.pool_stats() if harness is not None else {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["syncbn_pool_stats"] = _harness_stats()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # xdist controller
    _pool_stats.update(getattr(node, "workeroutput", {}).get("syncbn_pool_stats", {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    stats = Counter(_pool_stats)
    if getattr(config, "workerinput", None) is None and not stats:
        stats.update(_harness_stats())  # no xdist
    if stats:
        started = sum(v for k, v in stats.items() if k.startswith("started"))
        parts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()))
        terminalreporter.write_line(f"worker pools: {started} started ({parts})")
