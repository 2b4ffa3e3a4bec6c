"""Sphinx configuration for syncbn's documentation site.

Build (what .ci/run does; nothing is downloaded at build time):

    .venv/bin/python -m pip install -e ".[docs]"
    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

Besides Sphinx's own checks, two project checks run on every build and fail it under ``-W``:
every public object autodoc documents must have a docstring, and every name exported by
``syncbn.__all__``, ``syncbn.distributed.__all__`` and ``syncbn.lightning.__all__`` must appear on the
API page.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from sphinx.util import logging
from sphinx.util.inspect import stringify_signature

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import syncbn  # noqa: E402

project = "syncbn"
author = "syncbn contributors"
copyright = "syncbn contributors"
release = version = syncbn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",  # the formulas are rendered by the reader's browser; the build fetches nothing
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "bench", "**/.ipynb_checkpoints"]
# The same pages read as plain Markdown on a code host: links between them are "file.md" links,
# which MyST resolves into the site; headings get anchors for "file.md#section" links.
myst_heading_anchors = 3

# No intersphinx: the build must work offline. References to torch and the standard library
# therefore resolve nowhere; nitpicky mode still checks every reference into syncbn itself.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|typing|collections|datetime|contextlib|dataclasses|enum|abc|os|pathlib)(\..*)?"),
    (r"py:.*", r"(int|float|str|bool|None|object|type|tuple|list|dict|callable|Callable|Any|Optional|Union|Iterator|Iterable|Mapping|Sequence|Tensor|ProcessGroup|timedelta|NoneType|Ellipsis)"),
    (r"py:.*", r"(lightning|pytorch_lightning|timm|torchvision|accelerate)(\..*)?"),
    (r"py:.*", r"comm\.ProcessGroup"),  # syncbn.comm's alias of torch.distributed.ProcessGroup
]
# Lightning is an optional dependency: the build documents syncbn.lightning without it.
autodoc_mock_imports = ["lightning", "pytorch_lightning"]
autodoc_default_options = {
    "members": True,
    "undoc-members": True,  # so that a member without a docstring reaches the check below
    "show-inheritance": True,
    # nn.Module's protocol: documented by the class itself, as torch's reference does.
    "exclude-members": "forward, extra_repr, reset_parameters, reset_running_stats, training, dump_patches, call_super_init",
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not described twice

html_theme = "furo"
html_title = f"syncbn {release}"
html_static_path: list[str] = []

_log = logging.getLogger("syncbn.docs")

# Public names the API page must document.
_EXPORTS = {
    "syncbn": [n for n in syncbn.__all__ if n != "__version__"],
    "syncbn.distributed": importlib.import_module("syncbn.distributed").__all__,
    "syncbn.lightning": ["SyncBatchNormPlugin"],  # importing it needs Lightning; its __all__ has this name
}


def _missing_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what == "module" or name.rsplit(".", 1)[-1].startswith("_"):
        return
    if not any(line.strip() for line in lines):
        _log.warning("missing docstring: %s %s", what, name, type="syncbn", subtype="docstring")


def _resolve(full: str) -> Any:
    module, _, name = full.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _check_exports(app: Any, env: Any) -> None:
    # A name counts as documented when the same object is documented under any name
    # (syncbn.init_distributed is documented as syncbn.distributed.init_distributed).
    documented = {id(obj) for obj in map(_resolve, env.get_domain("py").objects) if obj is not None}
    for module, names in _EXPORTS.items():
        for name in names:
            full = f"{module}.{name}"
            if id(_resolve(full)) not in documented:
                _log.warning("%s is exported but not on the API page (docs/api.rst)", full,
                             type="syncbn", subtype="exports")


def _mocked(cls: Any) -> bool:
    """Whether ``cls`` is (an instance of) a class that autodoc_mock_imports made up, or derives from one."""
    kind = cls if isinstance(cls, type) else type(cls)
    return any(k.__name__ == "_MockObject" for k in kind.__mro__)


def _public_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    # syncbn's private mixins (norm_act._DropAct) are not part of the API: show the public bases.
    # A mocked base (Lightning's LayerSync, when Lightning is not installed) is shown by its full
    # name, once (the plugin subclasses lightning's and pytorch_lightning's, whichever import).
    shown: list[Any] = []
    for base in bases:
        if _mocked(base):
            base = f":py:class:`{base.__display_name__}`"
        elif base.__module__.startswith("syncbn") and base.__name__.startswith("_"):
            continue
        if base not in shown:
            shown.append(base)
    bases[:] = shown


def _mocked_class_signature(app: Any, what: str, name: str, obj: Any, options: Any, signature: Any,
                            return_annotation: Any) -> Any:
    # A class built on a mocked base gets the mock's (*args, **kwargs); show its own __init__'s.
    if what == "class" and _mocked(obj) and "__init__" in vars(obj):
        params = list(inspect.signature(vars(obj)["__init__"]).parameters.values())[1:]
        return stringify_signature(inspect.Signature(params), show_return_annotation=False), return_annotation
    return None


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _missing_docstring)
    app.connect("env-check-consistency", _check_exports)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _mocked_class_signature)
    return {"parallel_read_safe": True}
