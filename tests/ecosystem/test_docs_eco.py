"""The docs' code blocks that need timm, torchvision or Lightning, run against the real libraries.

The main suite's tests/test_docs.py skips these where the libraries are missing (its torch 2.13
venv); here, in .venv-eco (`bash scripts/setup_env.sh --ecosystem`), each one must run. The same
extractor finds them, so a block marked ``<!-- requires: timm -->`` anywhere in README.md or docs/
is picked up without a change here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..test_docs import Block, all_blocks, missing_requirements, run_block

ECOSYSTEM = {"timm", "torchvision", "lightning"}
_BLOCKS = [b for b in all_blocks() if ECOSYSTEM & set(b.requires)]


def test_the_docs_have_ecosystem_blocks() -> None:
    needed = {name for b in _BLOCKS for name in b.requires}
    assert ECOSYSTEM <= needed, f"expected blocks needing each of {sorted(ECOSYSTEM)}, found {sorted(needed)}"


@pytest.mark.parametrize("block", _BLOCKS, ids=[b.id for b in _BLOCKS])
def test_ecosystem_doc_block_runs(block: Block, tmp_path: Path) -> None:
    missing = missing_requirements(block)
    if missing:
        pytest.skip(f"ecosystem tier: needs {', '.join(missing)} (bash scripts/setup_env.sh --ecosystem)")
    run_block(block, tmp_path)
