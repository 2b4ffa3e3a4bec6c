"""What differs between the torch versions syncbn supports (``torch>=2.1``)."""

from __future__ import annotations

import torch

__all__ = ["is_compiling"]

# torch.compiler.is_compiling arrived in torch 2.3; torch._dynamo.is_compiling answers the same
# question on 2.1 and 2.2.
if hasattr(torch.compiler, "is_compiling"):
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - torch 2.1, 2.2
    from torch._dynamo import is_compiling  # type: ignore[no-redef]
