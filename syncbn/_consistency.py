"""Consistency mode: before each synchronized call, check that every rank is at the same layer.

Off by default (``SYNCBN_DEBUG=1`` or :func:`set_debug` turns it on). Each synchronized forward
first makes one small all_gather through :mod:`syncbn.comm` that verifies every rank of the group
is in the same layer, at the same call, with the same channel count and dtype, and raises the same
``ValueError`` on every rank otherwise, where the mismatched statistics collective would abort
Gloo ("Received data size doesn't match expected size") or hang. Under ``torch.compile`` the check
is an ordered custom operator, so compiled steps check exactly as eager ones do.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _compat, _config, comm
from ._compat import is_compiling

__all__ = ["set_debug", "debug_enabled", "check_consistency"]


def set_debug(flag: Optional[bool]) -> None:
    """Turn consistency mode on or off for this process; None goes back to ``$SYNCBN_DEBUG``.

    In consistency mode every synchronized call first runs a check: one small all_gather that
    verifies every rank of the group is in the same layer, at the same call, with the same
    channel count and dtype, and raises ``ValueError`` on every rank otherwise, where the
    mismatched statistics collective would abort Gloo ("Received data size doesn't match expected
    size") or hang. Every rank of a group must use the same setting (it adds a collective). Off
    by default; ``SYNCBN_DEBUG=1`` in the environment turns it on.
    """
    _config.set_switch(_config.DEBUG, flag)


def debug_enabled() -> bool:
    """Whether consistency mode is on (:func:`set_debug`, or ``SYNCBN_DEBUG=1``)."""
    return _config.debug()


# Calls per layer on this rank, keyed by the layer's process-unique ``key`` (0: by name, for the
# functional API).
_calls: dict[Any, int] = {}
# float dtypes first; anything else is reported by its position in this tuple or as -1.
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_NAME_BYTES = 64
_HEAD = 5  # call, name hash, channels, dtype code, name length


def _next_call(name: str, key: int) -> int:
    k = key if key else name
    n = _calls[k] = _calls.get(k, 0) + 1
    return n


def _encode(name: str, call: int, channels: int, dtype: torch.dtype, device: Any) -> Tensor:
    raw = name.encode("utf-8")
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    head = [call, zlib.crc32(raw), channels, code, min(len(raw), _NAME_BYTES)]
    body = list(raw[:_NAME_BYTES]) + [0] * (_NAME_BYTES - min(len(raw), _NAME_BYTES))
    return torch.tensor(head + body, dtype=torch.int64, device=device)


def _decode(row: list) -> tuple[str, int, int, str]:
    call, _, channels, code, n = row[:_HEAD]
    name = bytes(row[_HEAD : _HEAD + n]).decode("utf-8", errors="replace")
    dtype = str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "an unlisted dtype"
    return name, call, channels, dtype


def _group_ranks(group: Optional[comm.ProcessGroup], n: int) -> list[int]:
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except Exception:  # pragma: no cover - very old torch: fall back to group-local ranks
        return list(range(n))


def _check(name: str, x: Tensor, group: Optional[comm.ProcessGroup], key: int) -> None:
    call = _next_call(name, key)
    mine = _encode(name, call, x.shape[1] if x.dim() > 1 else -1, x.dtype, x.device)
    try:
        rows = comm.all_gather(mine, group).tolist()
    except RuntimeError as err:
        raise RuntimeError(
            f"syncbn: the consistency check of {name} (call {call}) could not all_gather over the "
            f"process group: {err}"
        ) from err
    keys = [row[:4] for row in rows]  # call, name hash, channels, dtype code
    if all(k == keys[0] for k in keys):
        return
    ranks = _group_ranks(group, len(rows))
    lines = []
    for rank, row in zip(ranks, rows):
        r_name, r_call, r_channels, r_dtype = _decode(row)
        lines.append(f"  rank {rank}: {r_name} call {r_call}, {r_channels} channels, {r_dtype}")
    what = [
        label
        for label, i in (("layer", 1), ("call count", 0), ("channel count", 2), ("dtype", 3))
        if any(k[i] != keys[0][i] for k in keys)
    ]
    raise ValueError(
        f"syncbn consistency check failed on rank {dist.get_rank()} in {name} (call {call}): expected "
        f"every rank of the group to be in the same synchronized layer, at the same call, with the "
        f"same channel count and dtype; got different {', '.join(what)}:\n"
        + "\n".join(lines)
        + "\nMake every rank run the same synchronized layers in the same order (no rank-dependent "
        "branches or early exits around them) with inputs of the same channel count and dtype."
    )


if _compat.HAS_CUSTOM_OP:

    # In the forward chain of collectives (see syncbn.comm): takes and returns its token.
    @_compat.custom_op("syncbn::check_consistency", side_effect=True)
    def _check_raw(x: Tensor, name: str, key: int, group_name: str, token: Tensor) -> Tensor:
        _check(name, x, _compat.group_by_name(group_name), key)
        return token.new_empty(0)

    @_check_raw.register_fake
    def _(x: Tensor, name: str, key: int, group_name: str, token: Tensor) -> Tensor:
        return token.new_empty(0)

    def _check_op(x: Tensor, name: str, key: int, group_name: str) -> None:
        comm.set_token(x.device, _check_raw(x, name, key, group_name, comm.current_token(x.device)))

else:  # pragma: no cover - older torch: the check breaks the graph

    @torch.compiler.disable
    def _check_op(x: Tensor, name: str, key: int, group_name: str) -> None:
        _check(name, x, _compat.group_by_name(group_name), key)


def check_consistency(name: str, x: Tensor, group: Optional[comm.ProcessGroup] = None, key: int = 0) -> None:
    """Verify, in one all_gather of ``5 + 64`` int64 values, that all ranks agree on this call.

    Every rank sends its layer name (hash and first 64 bytes), how many times this layer has been
    called on this rank (counted per ``key``, a process-unique number of the layer, or per
    ``name`` when 0), the channel count ``x.shape[1]`` and ``x.dtype``. The message is the same
    fixed size on every rank, so even mismatched ranks complete it; if any value differs, every
    rank raises the same ``ValueError`` listing each rank's values. Must be called by every rank
    of ``group`` before the collective it protects.
    """
    if is_compiling():
        pg = group if group is not None else dist.group.WORLD
        _check_op(x.detach(), name, key, pg.group_name)
        return
    _check(name, x, group, key)
