"""Start and stop the process group from a launcher's environment (torchrun, accelerate, SLURM).

``init_distributed()`` reads the variables every torch launcher sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; ``accelerate launch`` sets the same ones because it
starts processes through ``torch.distributed.run``), picks NCCL when CUDA is available and Gloo
otherwise, binds the process to GPU ``LOCAL_RANK``, and returns where this process stands. Without a
launcher (plain ``python script.py``) it starts nothing and returns rank 0 of 1, so the same script
runs in one process. ``cleanup()`` destroys the group.

Example::

    >>> info = syncbn.init_distributed()          # rank, world_size, local_rank, device
    >>> model = syncbn.convert_sync_bn(model).to(info.device)
    >>> if info.is_distributed:
    ...     model = DistributedDataParallel(model, broadcast_buffers=False)
    >>> ...
    >>> syncbn.cleanup()
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _config
from .comm import _drop_channels

__all__ = ["DistInfo", "init_distributed", "cleanup", "launcher_env", "env_timeout"]

# A launcher is present when these are set; the rest have defaults or come from the launcher's store.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE")


class DistInfo(NamedTuple):
    """Where this process stands: unpacks as ``rank, world_size, local_rank, device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """True when a process group is initialized (also for a group of one started by a launcher)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def backend(self) -> str:
        """The process group's backend ("gloo", "nccl", ...), or "none" without a process group."""
        return str(dist.get_backend()) if self.is_distributed else "none"

    @property
    def is_main(self) -> bool:
        """True on the rank that prints, writes checkpoints and files (rank 0)."""
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(
                f"init_distributed: expected environment variable {name} (set by torchrun / accelerate "
                f"launch), but it is missing; start the script with launch/torchrun.sh, or unset RANK "
                f"and WORLD_SIZE to run as a single process"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"init_distributed: expected an integer in environment variable {name}, got {raw!r}; "
            f"fix or unset it"
        ) from None


def launcher_env(env: Optional[Mapping[str, str]] = None) -> Optional[tuple[int, int, int]]:
    """Parse ``(rank, world_size, local_rank)`` from a launcher's environment; None without a launcher.

    Raises ``ValueError`` naming the variable when the environment is half set or inconsistent
    (e.g. ``RANK`` without ``WORLD_SIZE``, ``RANK >= WORLD_SIZE``). ``LOCAL_RANK`` defaults to
    ``RANK`` (right for one node), so a hand-set ``RANK``/``WORLD_SIZE`` pair also works.
    """
    env = os.environ if env is None else env
    present = [name for name in _LAUNCHER_VARS if env.get(name, "") != ""]
    if not present:
        return None
    if len(present) != len(_LAUNCHER_VARS):
        missing = [name for name in _LAUNCHER_VARS if name not in present]
        raise ValueError(
            f"init_distributed: expected both RANK and WORLD_SIZE (a launcher sets both), got only "
            f"{present[0]}={env[present[0]]!r} with {missing[0]} missing; start the script with "
            f"launch/torchrun.sh, or unset {present[0]} to run as a single process"
        )
    rank = _int_var(env, "RANK")
    world_size = _int_var(env, "WORLD_SIZE")
    local_rank = _int_var(env, "LOCAL_RANK", default=rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"init_distributed: expected WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got RANK={rank}, "
            f"WORLD_SIZE={world_size}; check the launcher's --nproc-per-node / --nnodes"
        )
    if local_rank < 0 or local_rank > rank:
        raise ValueError(
            f"init_distributed: expected 0 <= LOCAL_RANK <= RANK, got LOCAL_RANK={local_rank}, "
            f"RANK={rank}; check the launcher's environment"
        )
    return rank, world_size, local_rank


def env_timeout(env: Optional[Mapping[str, str]] = None) -> Optional[datetime.timedelta]:
    """The collective timeout from ``$SYNCBN_TIMEOUT`` (seconds, e.g. ``60`` or ``2.5``); None when unset.

    Raises ``ValueError`` naming the variable when it is not a positive number.
    """
    return _config.timeout(env, caller="init_distributed")


def _pick_device(local_rank: int, device: Optional[torch.device | str]) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if dev.index is None or dev.index >= count:
            raise ValueError(
                f"init_distributed: expected a CUDA device index below the {count} visible GPU(s), "
                f"got {dev}; start at most {count} processes per node (NPROC={count}) or pass "
                f"device='cpu'"
            )
    return dev


def init_distributed(
    backend: Optional[str] = None,
    *,
    device: Optional[torch.device | str] = None,
    timeout: Optional[datetime.timedelta] = None,
) -> DistInfo:
    """Initialize the default process group from the launcher's environment and return where we are.

    - Launcher present (``RANK`` and ``WORLD_SIZE`` set): ``init_process_group`` with the ``env://``
      rendezvous (``MASTER_ADDR``/``MASTER_PORT``, or torchrun's own store), ``backend`` defaulting to
      ``"nccl"`` when the device is CUDA and ``"gloo"`` otherwise; on CUDA the current device becomes
      ``cuda:LOCAL_RANK``.
    - No launcher: nothing is started; returns ``DistInfo(0, 1, 0, device)`` and every syncbn layer
      behaves like plain BatchNorm.
    - A group already initialized (e.g. by ``accelerate.Accelerator``): nothing is started; its rank
      and size are returned.

    Args:
        backend: ``"gloo"``, ``"nccl"``, or any string ``init_process_group`` accepts. Default: None
            (NCCL on CUDA, Gloo on CPU).
        device: the device to train on. Default: None (``cuda:LOCAL_RANK`` when CUDA is available,
            else CPU). Pass ``"cpu"`` to stay on the CPU on a GPU machine.
        timeout: how long a collective (and syncbn's shared-memory exchange) may wait for the other
            ranks before raising. Default: None, which takes ``$SYNCBN_TIMEOUT`` (seconds) when set,
            else torch's default of 30 minutes. A lost peer on another machine is only noticed
            after this time, so set it well below the default for interactive runs.

    Returns:
        :class:`DistInfo`, which unpacks as ``rank, world_size, local_rank, device`` and has
        ``backend``, ``is_distributed`` and ``is_main``.

    Raises:
        ValueError: a half-set or inconsistent launcher environment, ``MASTER_ADDR``/``MASTER_PORT``
            missing, a ``SYNCBN_TIMEOUT`` that is not a positive number, or more processes per node
            than visible GPUs; raised before any network call.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _int_var(os.environ, "LOCAL_RANK", default=rank)
        return DistInfo(rank, world_size, local_rank, _bind(_pick_device(local_rank, device)))

    parsed = launcher_env()
    if parsed is None:
        return DistInfo(0, 1, 0, _pick_device(0, device))
    rank, world_size, local_rank = parsed
    if not dist.is_available():
        raise ValueError(
            "init_distributed: expected a torch build with torch.distributed, got one without it; "
            "install the standard torch wheel or run without a launcher"
        )
    torchelastic = "TORCHELASTIC_RUN_ID" in os.environ
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not torchelastic and not os.environ.get(name):
            raise ValueError(
                f"init_distributed: expected environment variable {name} next to RANK and WORLD_SIZE, "
                f"but it is missing; use launch/torchrun.sh (which sets it) or export {name}"
            )
    if timeout is None:
        timeout = env_timeout()
    dev = _bind(_pick_device(local_rank, device))
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def _bind(dev: torch.device) -> torch.device:
    # NCCL uses the current CUDA device; without this every rank would talk from GPU 0.
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def cleanup() -> None:
    """Destroy the default process group if one is initialized; a no-op otherwise (safe to call twice).

    Also drops every shared-memory channel of syncbn's transport, so a group initialized later in
    this process (a notebook, a sweep, a reused worker) builds its own.

    Waits 0.1 s first, with the GIL released: a Gloo worker thread that has just finished a
    collective still has to take the GIL to free that work's Python tensors, and if the group is
    destroyed before it has (say when a DistributedDataParallel model holding the group's last
    reference is freed), the destructor joins that thread while holding the GIL and the process
    hangs at exit (seen with torch 2.13).
    """
    _drop_channels()
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.1)
        dist.destroy_process_group()
