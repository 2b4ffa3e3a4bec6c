"""What to do when the batch is too small: deferred statistics (gradient accumulation) and precise statistics.

The fallback policies for groups with too few values (``min_count`` and ``fallback``) live in
:class:`syncbn.SyncBatchNorm` itself, as they decide control flow inside its forward.
"""

from __future__ import annotations

import contextlib
from itertools import islice
from typing import Union, Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as BF
from ._forward import count_step
from .batchnorm import SyncBatchNorm

__all__ = ["accumulate_bn_stats", "recompute_bn_stats"]


class _StatsAccumulator:
    """Exact union of batch statistics, merged one batch at a time (Chan, Golub and LeVeque 1979).

    Called as a layer's statistics sink with the group's ``(mean, biased var, count)``; since those
    are identical on every rank of the group, so is the union, and no further communication is
    needed. Keeps float64 ``(count, mean, M2)`` and adds a batch with
    ``delta = mean_b - mean``, ``mean += delta * n_b / n``,
    ``M2 += n_b * var_b + delta**2 * n * n_b / (n + n_b)``: no sums of squares, so no cancellation
    at any ``|mean| / std``. A count may be a tensor (no host read; 0 for an unusable batch).
    """

    def __init__(self) -> None:
        self.n: Union[float, Tensor] = 0.0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def __call__(self, mean: Tensor, var: Tensor, count: Union[int, Tensor]) -> None:
        mean, var = mean.to(torch.float64), var.to(torch.float64)
        nb = count.to(torch.float64) if isinstance(count, Tensor) else float(count)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean * (nb > 0), var * nb
            return
        n = self.n + nb
        safe = n.clamp(min=1.0) if isinstance(n, Tensor) else max(n, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * (nb / safe)
        self.m2 = self.m2 + var * nb + delta.square() * (self.n * nb / safe)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor, int]:
        """Mean, biased variance (float64) and count of everything seen; count 0 if nothing."""
        if self.mean is None:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 0
        n = int(self.n.item()) if isinstance(self.n, Tensor) else int(self.n)
        return self.mean, self.m2 / max(n, 1), n


def _tracking_layers(module: nn.Module, caller: str) -> list[SyncBatchNorm]:
    """The SyncBatchNorm layers of ``module`` that keep running statistics.

    Raises ``ValueError`` when ``module`` holds torch batch norms with running statistics (they
    would update them on every forward, unnoticed) or a layer already collecting statistics.
    """
    layers: list[SyncBatchNorm] = []
    plain: list[str] = []
    for name, m in module.named_modules():
        if isinstance(m, SyncBatchNorm):
            if m.track_running_stats:
                if m._stats_sink is not None:
                    raise ValueError(
                        f"{caller}: {type(m).__name__} at {name or '<root>'!r} is already collecting "
                        "statistics; expected no nested accumulate_bn_stats / recompute_bn_stats"
                    )
                layers.append(m)
        elif isinstance(m, _BatchNorm) and m.track_running_stats:
            plain.append(f"{name or '<root>'} ({type(m).__name__})")
    if plain:
        raise ValueError(
            f"{caller}: expected only syncbn layers to keep running statistics, got torch batch "
            f"norms {', '.join(plain)}; convert them with syncbn.convert_sync_bn first"
        )
    return layers


@contextlib.contextmanager
def accumulate_bn_stats(module: nn.Module) -> Iterator[None]:
    r"""Update running statistics once per optimizer step under gradient accumulation.

    Inside the context every :class:`SyncBatchNorm` (and :class:`SyncBatchRenorm`) in ``module``
    normalizes each micro-batch with that micro-batch's synchronized statistics, as usual, but
    leaves its running statistics and ``num_batches_tracked`` alone. On a normal exit each layer
    makes ONE running-average update with the exact mean ``mu`` and unbiased variance of the union
    of all its micro-batches on all ranks of its group,

    .. math::

        M = \sum_k M_k, \quad \mu = \frac{1}{M}\sum_k M_k \mu_k, \quad
        \sigma^2 = \frac{1}{M}\sum_k M_k (\sigma_k^2 + \mu_k^2) - \mu^2,

    (float64 sums; ``M_k`` the group's count of micro-batch ``k``), with the layer's momentum,
    ``momentum=None`` or ``debias`` semantics, and ``num_batches_tracked`` grows by one. So ``k``
    micro-batches of ``b`` samples on ``W`` ranks leave the running statistics one step of batch
    norm on all ``k * b * W`` samples would. Micro-batches skipped by ``fallback="running"`` do not
    count. If the block raises, the layers are restored and nothing is updated. The exit itself
    communicates nothing.

    Args:
        module: a model whose batch norms were converted with :func:`syncbn.convert_sync_bn`.
            Torch batch norms with running statistics are refused (``ValueError``), as they would
            update on every micro-batch.

    Example::

        >>> with syncbn.accumulate_bn_stats(model):
        ...     for x, y in micro_batches:
        ...         loss_fn(model(x), y).backward()
        >>> optimizer.step()
    """
    layers = _tracking_layers(module, "syncbn.accumulate_bn_stats")
    sinks = [_StatsAccumulator() for _ in layers]
    for layer, sink in zip(layers, sinks):
        layer._stats_sink = sink
    try:
        yield
    finally:
        for layer in layers:
            layer._stats_sink = None
    # Reached only when the block did not raise.
    for layer, sink in zip(layers, sinks):
        mean, var, count = sink.result()
        if count < 2:
            continue  # nothing (or nothing usable) seen: no update, as in torch for no forward
        factor = count_step(layer.momentum, layer.num_batches_tracked, layer.debias)
        BF.update_running_stats(layer.running_mean, layer.running_var, mean, var, count, factor)


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    elif isinstance(batch, dict):
        model(**batch)
    else:
        raise ValueError(
            "syncbn.recompute_bn_stats: expected each batch to be a Tensor, a (input, target, ...) "
            f"tuple or list, or a dict of keyword arguments, got {type(batch).__name__}"
        )


def recompute_bn_stats(
    model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None
) -> nn.Module:
    """Set running statistics to the exact population statistics of ``batches`` (PreciseBN).

    Runs ``model`` in training mode without gradients over ``batches`` (the first ``num_batches``
    of them when given) and sets every :class:`SyncBatchNorm` layer's ``running_mean`` and
    ``running_var`` to the pooled mean and unbiased variance of all values it saw, on all ranks of
    its group, computed exactly from float64 sums (not a moving average). ``num_batches_tracked``
    (a renorm schedule's clock) is left unchanged, as are layers that saw nothing. Afterwards
    every submodule's training flag is what it was before.

    Each batch is passed as ``model(batch)`` for a Tensor, ``model(batch[0])`` for a tuple or list
    (a DataLoader's ``(input, target)``) and ``model(**batch)`` for a dict.

    Every rank of a group must run the same number of batches (each forward is a collective):
    pass ``num_batches`` when the loaders' lengths may differ.

    Args:
        model: a model whose batch norms were converted with :func:`syncbn.convert_sync_bn`.
        batches: an iterable of inputs, e.g. a DataLoader over (part of) the training set.
        num_batches: use at most this many batches; None uses them all.

    Returns:
        ``model``.

    Example::

        >>> syncbn.recompute_bn_stats(model, train_loader, num_batches=200)
        >>> evaluate(model.eval())
    """
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"syncbn.recompute_bn_stats: expected num_batches >= 0 or None, got {num_batches}")
    layers = _tracking_layers(model, "syncbn.recompute_bn_stats")
    flags = [(m, m.training) for m in model.modules()]
    sinks = [_StatsAccumulator() for _ in layers]
    try:
        for layer, sink in zip(layers, sinks):
            layer._stats_sink = sink
        model.train()
        with torch.no_grad():
            for batch in islice(batches, num_batches):
                _call(model, batch)
    finally:
        for layer in layers:
            layer._stats_sink = None
        for m, flag in flags:
            m.training = flag
    with torch.no_grad():
        for layer, sink in zip(layers, sinks):
            mean, var, count = sink.result()
            if count < 2:
                continue
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var * (count / (count - 1)))
    return model
