"""Every setting syncbn reads from the environment, and the private seams its tests use.

Environment variables are read when used (not at import), with one rule for on/off switches:
``1``/``true``/``yes``/``on`` turn a switch on, ``0``/``false``/``no``/``off`` turn it off, unset or
empty keeps the default, and anything else raises ``ValueError`` naming the variable.

==================  =================================================================  =========
variable            meaning                                                            default
==================  =================================================================  =========
``SYNCBN_SHM``      shared-memory all_reduce between ranks of one machine (switch)     on
``SYNCBN_DEBUG``    consistency mode: check every rank is at the same layer (switch)   off
``SYNCBN_TIMEOUT``  collective timeout in seconds (``init_distributed``, shared memory)  the group's
``SYNCBN_SHM_DIR``  folder of the shared-memory mapping files                          /dev/shm
==================  =================================================================  =========

:func:`syncbn.set_shared_memory` and :func:`syncbn.set_debug` override the two switches for the
process; ``None`` goes back to the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Mapping, Optional

__all__ = ["switch", "shared_memory", "debug", "timeout", "shm_dir", "Testing", "testing", "current"]

SHM, DEBUG, TIMEOUT, SHM_DIR = "SYNCBN_SHM", "SYNCBN_DEBUG", "SYNCBN_TIMEOUT", "SYNCBN_SHM_DIR"

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

# Process-wide overrides of the switches (set_shared_memory, set_debug); None: the environment.
_overrides: dict[str, Optional[bool]] = {SHM: None, DEBUG: None}


def switch(name: str, default: bool, env: Optional[Mapping[str, str]] = None) -> bool:
    """The on/off switch ``name``: its override if set, else the environment, else ``default``."""
    forced = _overrides.get(name)
    if forced is not None and env is None:
        return forced
    raw = (os.environ if env is None else env).get(name)
    if not raw:  # unset or empty (the common case: no string work)
        return default
    raw = raw.strip().lower()
    if not raw:
        return default
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    raise ValueError(
        f"syncbn: expected {name} to be one of {_ON + _OFF} (or unset), got {raw!r}; fix or unset it"
    )


def set_switch(name: str, flag: Optional[bool]) -> None:
    _overrides[name] = None if flag is None else bool(flag)


def shared_memory() -> bool:
    """Whether ranks of one machine exchange statistics through shared memory (default on)."""
    return switch(SHM, True)


def debug() -> bool:
    """Whether consistency mode is on (default off)."""
    return switch(DEBUG, False)


def timeout(env: Optional[Mapping[str, str]] = None, caller: str = "syncbn") -> Optional[datetime.timedelta]:
    """``$SYNCBN_TIMEOUT`` as a timedelta (seconds, e.g. ``60`` or ``2.5``); None when unset.

    Raises ``ValueError`` naming the variable when it is not a positive, finite number.
    """
    raw = (os.environ if env is None else env).get(TIMEOUT, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(
            f"{caller}: expected {TIMEOUT} to be a positive number of seconds (e.g. 60), got {raw!r}; "
            "fix or unset it"
        )
    return datetime.timedelta(seconds=seconds)


def shm_dir() -> Optional[str]:
    """``$SYNCBN_SHM_DIR``, or None when unset."""
    return os.environ.get(SHM_DIR, "").strip() or None


# ---------------------------------------------------------------------------------------------
# Testing seams. Production code reads them through current(); only tests and
# benchmarks/gpu_check.py change them, through the testing() context manager.


@dataclass(frozen=True)
class Testing:
    """What tests may change about how syncbn runs (the defaults are production behaviour).

    Attributes:
        always_sync: take the synchronized path (local statistics, collective, autograd Function)
            also in a group of one rank or without a group (a group of one: no collective runs).
            Lets one process per GPU exercise the path NCCL needs two ranks for.
        fused_device_types: device types whose tensors take torch's fused SyncBatchNorm kernels.
        kernels: the object the fused kernels are looked up on (``torch``, or CPU emulations).
    """

    always_sync: bool = False
    fused_device_types: tuple[str, ...] = ("cuda",)
    kernels: Any = None  # None: torch itself


_DEFAULT = Testing()
_current = _DEFAULT


def current() -> Testing:
    """The testing seams in force (production: the defaults)."""
    return _current


@contextlib.contextmanager
def testing(**changes: Any) -> Iterator[Testing]:
    """Change :class:`Testing` fields inside a ``with`` block; restored on exit, also on error.

    Example::

        >>> with testing(always_sync=True, fused_device_types=("cpu",), kernels=emulated):
        ...     layer(x)
    """
    global _current
    known = {f.name for f in fields(Testing)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"syncbn._config.testing: expected fields among {sorted(known)}, got {unknown}")
    saved = _current
    _current = replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved
