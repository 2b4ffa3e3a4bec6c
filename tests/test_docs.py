"""Docs that stay true: every Python code block in README.md and docs/ runs, and the README's links resolve.

A block is a fenced ```python block in Markdown, or a ``.. code-block:: python`` block in
reStructuredText. Each runs in a fresh namespace in this process, on CPU, with no process group (so
syncbn's layers compute plain batch norm), from a temporary working directory; tracebacks carry
the document's own path and line numbers. Markers on the lines right above a block (HTML comments
in Markdown, ``.. requires: ...`` comments in reStructuredText) change that:

- ``<!-- requires: timm torchvision -->``: run only where every one of these modules imports
  (``cuda``: where a GPU is visible); tests/ecosystem/test_docs_eco.py runs the blocks that need
  timm, torchvision or Lightning in ``.venv-eco``.
- ``<!-- run: script -->``: write the block to a file and run it with ``python`` in its own process
  (code that starts processes itself, such as Lightning's DDP strategy);
  ``<!-- run: torchrun -->``: launch that file with ``torchrun --standalone --nproc-per-node=2``.

Doctest-style blocks (``>>>``) are refused: write plain code that a reader can paste.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

__all__ = ["Block", "REPO", "doc_files", "extract_blocks", "all_blocks", "missing_requirements", "run_block"]

REPO = Path(__file__).resolve().parent.parent
PYTHON_LANGS = ("python", "py", "python3")
RUN_MODES = ("exec", "script", "torchrun")
# A block run in its own process that takes longer than this has hung.
SUBPROCESS_TIMEOUT_S = float(os.environ.get("SYNCBN_LAUNCH_TIMEOUT", "150"))
README_MAX_BYTES = 8 * 1024  # issue 19: a README a user reads in five minutes


@dataclass(frozen=True)
class Block:
    """One Python code block of a document."""

    path: Path
    line: int  # 1-based line of the block's first code line
    code: str
    requires: tuple[str, ...] = ()
    run: str = "exec"

    @property
    def id(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every Markdown and reStructuredText page under docs/ (not the build output)."""
    docs = REPO / "docs"
    pages = [p for p in sorted(docs.rglob("*")) if p.suffix in (".md", ".rst") and "_build" not in p.parts]
    return [REPO / "README.md", *pages]


_MD_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MD_MARKER = re.compile(r"^\s*<!--\s*(?P<key>[a-z_-]+)\s*:\s*(?P<value>.*?)\s*-->\s*$")
_RST_BLOCK = re.compile(r"^(?P<indent>\s*)\.\. (?:code-block|code|sourcecode)::\s*(?P<lang>\S+)\s*$")
_RST_MARKER = re.compile(r"^\s*\.\. (?P<key>requires|run)\s*:\s*(?P<value>.*?)\s*$")
_DOCTEST = re.compile(r"^\s*>>> ", re.M)


def _apply_markers(path: Path, line: int, markers: list[tuple[str, str]]) -> tuple[tuple[str, ...], str]:
    requires: list[str] = []
    run = "exec"
    for key, value in markers:
        if key == "requires":
            requires += value.replace(",", " ").split()
        elif key == "run":
            if value not in RUN_MODES:
                raise ValueError(f"{path}:{line}: expected run: one of {RUN_MODES}, got {value!r}")
            run = value
        else:
            raise ValueError(f"{path}:{line}: expected a marker 'requires' or 'run', got {key!r}")
    return tuple(requires), run


def _markers_above(lines: list[str], index: int, pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    """The markers on the lines directly above ``lines[index]`` (no blank line between)."""
    found = []
    i = index - 1
    while i >= 0 and (m := pattern.match(lines[i])):
        found.append((m.group("key"), m.group("value")))
        i -= 1
    return found[::-1]


def _extract_markdown(path: Path, lines: list[str]) -> list[Block]:
    blocks = []
    i = 0
    while i < len(lines):
        m = _MD_FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        lang = info.split()[0].lower() if info else ""
        if lang in PYTHON_LANGS:
            requires, run = _apply_markers(path, i + 1, _markers_above(lines, i, _MD_MARKER))
            indent = len(m.group("indent"))
            body = [line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : end]]
            blocks.append(Block(path, i + 2, "\n".join(body) + "\n", requires, run))
        elif lang in ("pycon", "doctest"):
            raise ValueError(f"{path}:{i + 1}: a {lang} block cannot be run; write a ```python block")
        i = end + 1
    return blocks


def _extract_rst(path: Path, lines: list[str]) -> list[Block]:
    blocks = []
    for i, line in enumerate(lines):
        m = _RST_BLOCK.match(line)
        if not m or m.group("lang").lower() not in PYTHON_LANGS:
            continue
        indent = len(m.group("indent"))
        j = i + 1
        while j < len(lines) and re.match(r"^\s+:[\w-]+:", lines[j]):  # directive options
            j += 1
        body: list[str] = []
        first: Optional[int] = None
        k = j
        while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent):
            if lines[k].strip() and first is None:
                first = k
            body.append(lines[k])
            k += 1
        if first is None:
            raise ValueError(f"{path}:{i + 1}: empty code block")
        body = body[first - j :]
        width = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        code = "\n".join(b[width:] for b in body).rstrip() + "\n"
        requires, run = _apply_markers(path, i + 1, _markers_above(lines, i, _RST_MARKER))
        blocks.append(Block(path, first + 1, code, requires, run))
    return blocks


def extract_blocks(path: Path) -> list[Block]:
    """Every Python code block of one document, with its markers; raises on a block that cannot run."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = _extract_rst(path, lines) if path.suffix == ".rst" else _extract_markdown(path, lines)
    for block in blocks:
        if _DOCTEST.search(block.code):
            raise ValueError(f"{block.id}: a doctest-style block (>>>) cannot be run; write plain code")
    return blocks


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in extract_blocks(path)]


def missing_requirements(block: Block) -> list[str]:
    """The requirements of ``block`` that this environment lacks."""
    missing = []
    for name in block.requires:
        if name == "cuda":
            import torch

            if not torch.cuda.is_available():
                missing.append(name)
        elif importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_XDIST_WORKER")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, unless the block requires cuda
    return env


def run_block(block: Block, workdir: Path) -> None:
    """Run ``block`` as its markers say, from ``workdir``; raise with the block's output on failure."""
    if block.run == "exec":
        import torch
        import torch.distributed as dist

        # A block runs as a reader's fresh script would: without a process group.
        assert not (dist.is_available() and dist.is_initialized()), (
            f"{block.id}: a process group is already initialized in this process (left by an earlier test)"
        )
        # Line numbers in tracebacks are the document's.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        torch.manual_seed(0)
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            exec(code, {"__name__": "__docs__", "__file__": str(block.path)})
        finally:
            os.chdir(cwd)
        assert not (dist.is_available() and dist.is_initialized()), f"{block.id} left a process group behind"
        return
    script = workdir / "block.py"
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    if block.run == "script":
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    env = _subprocess_env()
    if "cuda" in block.requires:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise AssertionError(f"{block.id} did not finish within {SUBPROCESS_TIMEOUT_S:.0f} s:\n{out}") from None
    assert proc.returncode == 0, f"{block.id} ({block.run}) exited with {proc.returncode}:\n{proc.stdout}"


# ------------------------------------------------------------------------------------------------
# The main suite: every block whose requirements this environment has.

_BLOCKS = all_blocks()


def test_every_page_is_scanned() -> None:
    names = {p.relative_to(REPO).as_posix() for p in doc_files()}
    assert {"README.md", "docs/index.md", "docs/api.rst"} <= names, names
    assert any(b.path.name == "README.md" for b in _BLOCKS), "README.md has no Python block"


@pytest.mark.parametrize("block", _BLOCKS, ids=[b.id for b in _BLOCKS])
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    missing = missing_requirements(block)
    if missing:
        pytest.skip(f"{block.id} needs {', '.join(missing)} (the ecosystem tier runs timm, torchvision "
                    f"and Lightning blocks: bash scripts/setup_env.sh --ecosystem)")
    run_block(block, tmp_path)


def test_markers_are_checked(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- requires: timm -->\n<!-- run: script -->\n```python\nx = 1\n```\n")
    (block,) = extract_blocks(page)
    assert (block.requires, block.run, block.line, block.code) == (("timm",), "script", 4, "x = 1\n")
    page.write_text("<!-- run: sometimes -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="expected run: one of"):
        extract_blocks(page)
    page.write_text("```python\n>>> x = 1\n```\n")
    with pytest.raises(ValueError, match="doctest-style"):
        extract_blocks(page)
    rst = tmp_path / "page.rst"
    rst.write_text("Title\n=====\n\n.. requires: torchvision\n.. code-block:: python\n   :caption: c\n\n"
                   "   import os\n   if os:\n       pass\n\nAfter.\n")
    (block,) = extract_blocks(rst)
    assert (block.requires, block.line, block.code) == (("torchvision",), 8, "import os\nif os:\n    pass\n")


def test_a_failing_block_points_at_the_document(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Text\n\n```python\nx = 1\nraise RuntimeError('from the page')\n```\n")
    (block,) = extract_blocks(page)
    with pytest.raises(RuntimeError, match="from the page") as info:
        run_block(block, tmp_path)
    assert any(entry.lineno + 1 == 5 and str(entry.path) == str(page) for entry in info.traceback)


def test_readme_stays_short() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move reference material into docs/"
    )


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub and MyST give a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", text, flags=re.M | re.S)  # no headings inside code
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def test_readme_links_resolve() -> None:
    """README.md is read outside the site too: its relative links and anchors must exist."""
    readme = REPO / "README.md"
    for m in _LINK.finditer(readme.read_text(encoding="utf-8")):
        target = m.group("target") or m.group("image")
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (REPO / file) if file else readme
        assert path.exists(), f"README.md links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"README.md links to {target}: no such heading in {file}"


# Phrases that narrate the project's history or leave a number without its machine; history goes in
# CHANGELOG.md, and a number carries its method, machine and date at its table.
_HISTORY = re.compile(r"earlier versions?|used to |no longer|\((?:before|now)\)|on this machine|\blanded\b", re.I)


def test_docs_describe_the_present() -> None:
    found = []
    for page in doc_files():
        if page.name == "changelog.md":
            continue
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if m := _HISTORY.search(line):
                found.append(f"{page.relative_to(REPO)}:{number}: {m.group(0)!r}")
    assert not found, "history or undated wording (move it to CHANGELOG.md or date it at its table):\n" + "\n".join(found)
