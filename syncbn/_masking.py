"""Masks for padded sequences: the ``masked`` context manager and how a layer finds its mask.

A synchronized layer takes ``mask=`` directly. Models whose ``forward`` calls ``self.bn(x)`` without
one (the convolution module of a Conformer, a TDNN) run inside :func:`masked` instead, which hands
a mask to the synchronized layers called within it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from . import _stats as ST

__all__ = ["masked", "sequence_mask", "active", "resolve"]


def sequence_mask(lengths: Tensor, max_length: Optional[int] = None) -> Tensor:
    """The ``(N, T)`` bool mask of sequences of ``lengths``, True where a position holds data.

    ``mask[i, t] = t < lengths[i]`` (TensorFlow's ``sequence_mask``); ``T`` is ``max_length`` or the
    longest length. On ``lengths``' device.

    Args:
        lengths: ``(N,)`` integer tensor of sequence lengths, each in ``[0, T]``.
        max_length: ``T``, the padded length; None: ``lengths.max()`` (read on the host).

    Raises:
        ValueError: ``lengths`` not a 1-D integer tensor, or a length outside ``[0, max_length]``.

    Example::

        >>> syncbn.sequence_mask(torch.tensor([3, 1]), 4)
        tensor([[ True,  True,  True, False],
                [ True, False, False, False]])
    """
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        got = f"{lengths.dtype} tensor of shape {tuple(lengths.shape)}" if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"syncbn.sequence_mask: expected lengths as a 1-D integer tensor, got a {got}")
    if max_length is None:
        max_length = int(lengths.max()) if lengths.numel() else 0
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_length):
        raise ValueError(
            f"syncbn.sequence_mask: expected lengths in [0, {max_length}], got {lengths.tolist()}; "
            "pass the padded length as max_length"
        )
    return torch.arange(max_length, device=lengths.device) < lengths.unsqueeze(1)


class _Scope:
    def __init__(self, masks: tuple[Tensor, ...], layers: Optional[set[int]]) -> None:
        self.masks = masks
        self.layers = layers


# The masks in force, innermost last. Per process (not per thread), like the layers' buffers.
_stack: list[_Scope] = []


@contextlib.contextmanager
def masked(*masks: Tensor, layers: Union[nn.Module, Iterable[nn.Module], None] = None) -> Iterator[None]:
    """Hand masks to the synchronized layers called inside the block that are given no ``mask=``.

    Matching rule: a layer whose input has shape ``(N, C, *S)`` takes the mask of shape ``(N, *S)``
    (the input's shape without the channel dim); with several masks (say a model that halves the
    sequence length), each layer takes the one of its shape. A layer whose input fits none of
    them raises ``ValueError`` naming the layer, its input's shape and the masks' shapes: a mask
    is never guessed. ``layers`` limits the masks to the synchronized layers inside those modules
    (say the convolution modules of a network whose classifier head also has a batch norm); the
    others run unmasked. An explicit ``mask=`` always wins; an inner block replaces an outer one.

    Args:
        *masks: bool tensors, True where a position holds data; at most one per shape.
        layers: a module or modules whose synchronized layers take the masks; None: all.

    Raises:
        ValueError: no mask, a mask that is not a bool tensor, or two masks of the same shape.

    Example::

        >>> mask = torch.arange(100)[None, :] < lengths[:, None]  # (N, T)
        >>> with syncbn.masked(mask):
        ...     y = conformer_conv_module(x)  # (N, C, T); its batch norm ignores the padding
    """
    if not masks:
        raise ValueError("syncbn.masked: expected at least one mask, got none")
    shapes = set()
    for m in masks:
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            what = f"{m.dtype} tensor" if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"syncbn.masked: expected bool masks (True where a position holds data), got a {what}")
        if tuple(m.shape) in shapes:
            raise ValueError(
                f"syncbn.masked: expected at most one mask per shape, got two of shape {tuple(m.shape)}; "
                "a layer could not tell which one is its own"
            )
        shapes.add(tuple(m.shape))
    scope_layers: Optional[set[int]] = None
    if layers is not None:
        modules = [layers] if isinstance(layers, nn.Module) else list(layers)
        scope_layers = {id(sub) for mod in modules for sub in mod.modules()}
    _stack.append(_Scope(tuple(masks), scope_layers))
    try:
        yield
    finally:
        _stack.pop()


def active() -> bool:
    """Whether a :func:`masked` block is open (some layer may take a mask from it)."""
    return bool(_stack)


def resolve(name: str, layer: nn.Module, x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask ``layer`` uses for input ``x``: ``mask`` itself (checked), the context's, or None."""
    if mask is not None:
        ST.check_mask(name, x, mask)
        return mask
    if not _stack:
        return None
    scope = _stack[-1]
    if scope.layers is not None and id(layer) not in scope.layers:
        return None
    want = (x.shape[0],) + tuple(x.shape[2:])
    for m in scope.masks:
        if tuple(m.shape) == want:
            ST.check_mask(name, x, m)
            return m
    raise ValueError(
        f"{name}: called inside syncbn.masked with an input of shape {tuple(x.shape)}, which needs a "
        f"mask of shape {want}; got masks of shapes {[tuple(m.shape) for m in scope.masks]}. Pass "
        "a mask of that shape too, or limit the masks to the right layers with layers=..."
    )
