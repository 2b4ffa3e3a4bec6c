"""Lightning integration: a ``LayerSync`` plugin that synchronizes batch norms with syncbn (CPU included).

``Trainer(sync_batchnorm=True)`` uses ``torch.nn.SyncBatchNorm``, which refuses CPU tensors and does
not know timm's norm-act layers. This plugin converts with :func:`syncbn.convert_sync_bn` instead::

    import lightning as L
    from syncbn.lightning import SyncBatchNormPlugin

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()])

Importing :mod:`syncbn` never imports Lightning; importing this module needs ``lightning`` (or the
older ``pytorch_lightning`` package; with both installed the plugin is accepted by either Trainer).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from torch import nn

from . import comm
from ._forward import check_options
from .convert import convert_sync_bn, revert_sync_bn

__all__ = ["SyncBatchNormPlugin"]


def _layer_sync_bases() -> tuple[type, ...]:
    bases = []
    for name in ("lightning.pytorch.plugins", "pytorch_lightning.plugins"):
        try:
            module = __import__(name, fromlist=["LayerSync"])
        except ImportError:
            continue
        bases.append(module.LayerSync)
    if not bases:
        raise ImportError(
            "syncbn.lightning: expected Lightning to be installed (lightning.pytorch or "
            "pytorch_lightning), found neither; install it with `pip install lightning`, or use "
            "syncbn.convert_sync_bn(model) directly without Lightning"
        )
    return tuple(bases)


class SyncBatchNormPlugin(*_layer_sync_bases()):  # type: ignore[misc]
    """Lightning ``LayerSync`` plugin: synchronized batch norm through syncbn, on CPU and GPU.

    Lightning calls :meth:`apply` on the ``LightningModule`` when fitting starts (after the process
    group exists) and :meth:`revert` when it ends, so the module you get back holds plain torch
    batch norms again. Every batch norm in the model, timm's ``BatchNormAct2d`` included, then
    normalizes with the statistics of all ranks' batches; see :func:`syncbn.convert_sync_bn`.

    Args:
        process_group: group whose ranks share statistics; None is the default (whole world).
        min_count, fallback, debias, renorm, skip_unknown: as in :func:`syncbn.convert_sync_bn`.

    Raises:
        ValueError: bad ``min_count`` or ``fallback`` (at construction); the errors of
            :func:`syncbn.convert_sync_bn` when Lightning applies the plugin.

    Example::

        >>> trainer = lightning.Trainer(
        ...     accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()]
        ... )
        >>> trainer.fit(model)  # statistics over both processes' batches
    """

    def __init__(
        self,
        process_group: Optional[comm.ProcessGroup] = None,
        *,
        min_count: int = 2,
        fallback: str = "raise",
        debias: bool = False,
        renorm: Union[bool, Mapping[str, Any]] = False,
        skip_unknown: bool = False,
    ) -> None:
        check_options("syncbn.lightning.SyncBatchNormPlugin", min_count, fallback)
        self.process_group = process_group
        self.options: dict[str, Any] = {
            "min_count": min_count,
            "fallback": fallback,
            "debias": debias,
            "renorm": renorm,
            "skip_unknown": skip_unknown,
        }

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every batch norm of ``model`` with :func:`syncbn.convert_sync_bn`."""
        return convert_sync_bn(model, self.process_group, **self.options)

    def revert(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply` with :func:`syncbn.revert_sync_bn` (the original classes and Parameters)."""
        return revert_sync_bn(model)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"SyncBatchNormPlugin(process_group={self.process_group!r}, {opts})"
