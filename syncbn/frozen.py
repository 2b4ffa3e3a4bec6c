"""FrozenBatchNorm: batch norm with fixed statistics and affine, a per-channel affine map in every mode."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import _masking
from . import functional as BF
from .batchnorm import check_input

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    r"""Batch norm with fixed statistics and affine: a per-channel affine map in every mode.

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with ``running_mean`` (mu), ``running_var`` (sigma^2), ``weight`` (gamma) and ``bias`` (beta;
    absent, i.e. 1 and 0, with ``affine=False``) all buffers: nothing is learnt or updated, training and eval compute the same thing, and it
    never communicates. Gradients flow to the input only. The output equals a batch norm's eval
    output with the same values. For fine-tuning with tiny batches and for transfer learning
    (detectron2's ``FrozenBatchNorm2d``). :func:`syncbn.freeze_bn` builds these from a model's batch
    norms and :func:`syncbn.unfreeze_bn` turns them back.

    The ``state_dict`` keys are those of ``nn.BatchNorm2d`` (``num_batches_tracked`` included and
    never changed); a state dict without ``num_batches_tracked`` (torchvision's frozen layers)
    loads too.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance. Default: 1e-5.
        affine: hold ``weight`` and ``bias`` buffers (as a batch norm with ``affine=True`` has
            parameters). Default: True.
        device, dtype: factory kwargs for the buffers.
        bias: with ``affine=True``, also hold ``bias``; False leaves ``self.bias`` None (no shift),
            as torch's batch norms' ``bias=False``. Default: True.
        momentum: accepted (keyword-only) for parity with torch's batch norms and kept as an
            attribute; a frozen layer never updates, so it has no effect. Default: 0.1.
        track_running_stats: accepted (keyword-only) for parity; must be True, as the layer
            normalizes with its running statistics. Default: True.

    Shape:
        - Input: ``(N, C, *)``; Output: same shape.

    Example::

        >>> frozen = syncbn.FrozenBatchNorm(64)
        >>> frozen.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        <All keys matched successfully>
        >>> y = frozen(torch.randn(2, 64, 8, 8))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        momentum: Optional[float] = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if not track_running_stats:
            raise ValueError(
                f"FrozenBatchNorm({num_features}): expected track_running_stats=True (a frozen "
                "batch norm normalizes with its running statistics), got False"
            )
        kw = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.register_buffer("weight", torch.ones(num_features, **kw) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **kw) if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    # state_dict format version (in the metadata torch saves with every state dict), so that a
    # later change of keys can migrate old checkpoints in _load_from_state_dict. Version 1: the
    # keys of nn.BatchNorm2d, weight and bias as buffers.
    _version = 1

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, *args: Any
    ) -> None:
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            # torchvision's and detectron2's frozen layers save no step counter.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)

    def extra_repr(self) -> str:
        extra = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        return extra + (", bias=False" if self.affine and self.bias is None else "")

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        name = f"{type(self).__name__}({self.num_features})"
        check_input(name, input, self.num_features)
        mask = _masking.resolve(name, self, input, mask)
        return BF.normalize(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps, mask)
