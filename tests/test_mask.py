"""Masked statistics for padded sequences: ``mask=`` and ``syncbn.masked``.

Reference: torch's single-process ``BatchNorm1d`` on the valid values of every rank, gathered into
one ``(M, C)`` batch (float64). Padded positions hold garbage (NaN, huge values) in every test,
so any leak of padding into a valid output, a gradient or a statistic shows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import syncbn

from .harness import run_on_ranks
from .parity import assert_close

TOL = 1e-10


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The valid values of ``x`` (N, C, *S) as an ``(M, C)`` batch, in a fixed order."""
    return x.movedim(1, -1)[mask]


def _scatter(values: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like.movedim(1, -1))
    out[mask] = values
    return out.movedim(-1, 1)


def _lengths_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def _batch(gen: torch.Generator, n: int, c: int, spatial: tuple[int, ...], lengths: list[int]) -> tuple:
    x = torch.randn(n, c, *spatial, generator=gen, dtype=torch.float64) * 2 + 3
    t = spatial[-1]
    mask = _lengths_mask(lengths, t)
    for _ in spatial[:-1]:
        mask = mask.unsqueeze(1)
    mask = mask.expand(n, *spatial).clone()
    if len(spatial) > 1:  # also drop a few positions inside, not only the tail
        mask.flatten(1)[:, 1::5] = False
    garbage = x.clone()
    pad = ~mask.unsqueeze(1).expand_as(x)
    garbage[pad] = float("nan")
    garbage.view(-1)[pad.reshape(-1).nonzero()[::2, 0]] = 1e30
    return x, garbage, mask


def _masked_parity(rank: int, world_size: int, spatial: tuple[int, ...], lengths: list[list[int]], steps: int = 3) -> None:
    """Each rank: its own sequences (lengths[rank]); reference: BatchNorm1d on every rank's valid values."""
    c = 3
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(c, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    layer = syncbn.SyncBatchNorm(c, dtype=torch.float64)
    layer.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        parts = [_batch(gen, len(ls), c, spatial, ls) for ls in lengths]
        grads = [torch.randn(p[0].shape, generator=gen, dtype=torch.float64) for p in parts]
        x, garbage, mask = parts[rank]
        xin = garbage.clone().requires_grad_()
        y = layer(xin, mask)
        valid_all = torch.cat([_valid(p[0], p[2]) for p in parts]).requires_grad_()
        y_ref = ref(valid_all)
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + int(p[2].sum()))
        mine = slice(offsets[rank], offsets[rank + 1])
        expected = _scatter(y_ref[mine].detach(), mask, x)
        assert torch.isfinite(y).all(), f"step {step}: padding leaked into the output"
        assert_close(y, expected, TOL, f"step {step} output (0 where padded)")
        y.backward(grads[rank])
        y_ref.backward(torch.cat([_valid(g, p[2]) for g, p in zip(grads, parts)]))
        gx = _scatter(valid_all.grad[mine], mask, x)
        assert torch.isfinite(xin.grad).all(), f"step {step}: padding leaked into the gradient"
        assert_close(xin.grad, gx, TOL, f"step {step} grad_input (0 where padded)")
        for name in ("weight", "bias"):
            summed = getattr(layer, name).grad.detach().clone()
            dist.all_reduce(summed)
            assert_close(summed, getattr(ref, name).grad, TOL, f"step {step} grad_{name}")
        layer.zero_grad(), ref.zero_grad()
        assert_close(layer.running_mean, ref.running_mean, TOL, f"step {step} running_mean")
        assert_close(layer.running_var, ref.running_var, TOL, f"step {step} running_var")
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)
    layer.eval(), ref.eval()
    x, garbage, mask = _batch(gen, 2, c, spatial, [spatial[-1], 1])
    with torch.no_grad():
        expected = _scatter(ref(_valid(x, mask)), mask, x)
        assert_close(layer(garbage, mask), expected, TOL, "eval with a mask")


@pytest.mark.parametrize(
    "world_size,lengths",
    [
        (2, [[7, 2, 5], [3]]),
        (3, [[7, 1], [0, 0], [4, 6, 2]]),  # the middle rank is all padding: an empty rank
        (3, [[7], [5, 3], []]),  # the last rank has no sequences at all
    ],
    ids=["2ranks", "3ranks-all-padded", "3ranks-empty"],
)
@pytest.mark.parametrize("spatial", [(7,), (2, 7), (2, 2, 7)], ids=["1d", "2d", "3d"])
def test_masked_statistics_equal_batch_norm_on_the_valid_values(world_size, lengths, spatial):
    run_on_ranks(world_size, _masked_parity, spatial, lengths)


def test_masked_statistics_one_process():
    run_on_ranks(1, _masked_parity, (9,), [[9, 4, 1]])


def _masked_large_mean(rank: int, world_size: int, offset: float) -> list[float]:
    """Relative errors of the group's mean (in std) and unbiased variance, float32 at |mean|/std = offset."""
    gen = torch.Generator().manual_seed(7)
    lengths = [[9, 9], [9, 4, 0]]  # rank 0 unpadded, rank 1 padded
    parts = [_batch(gen, len(ls), 2, (9,), ls) for ls in lengths]
    xs = [(p[0] * 0.5 + offset).round().float() if offset >= 1e6 else (p[0] * 0.5 + offset).float() for p in parts]
    layer = syncbn.SyncBatchNorm(2, momentum=1.0)
    layer(xs[rank], parts[rank][2])
    valid = torch.cat([_valid(x.double(), p[2]) for x, p in zip(xs, parts)])
    mean, var = valid.mean(0), valid.var(0)
    return [
        float(((layer.running_mean.double() - mean).abs() / var.sqrt()).max()),
        float(((layer.running_var.double() - var).abs() / var).max()),
    ]


@pytest.mark.parametrize("offset", [1e4, 1e7])
def test_masked_statistics_at_large_mean_float32(offset):
    # float32 values many standard deviations from 0 (at 1e7 integers, as float32 holds them):
    # the masked statistics refine the kernel's float32-rounded mean as the unmasked ones do (the
    # variance was 3.5% off at 1e7). Bound: a few float32 ulps of the buffers.
    for mean_err, var_err in run_on_ranks(2, _masked_large_mean, offset):
        assert mean_err < 3e-7 * offset and var_err < 1e-6, (mean_err, var_err)


# --------------------------------------------------------------------------------------------
# A Conformer's convolution module (pointwise conv, GLU, depthwise conv, batch norm, activation,
# pointwise conv), unchanged, converted and run under syncbn.masked.


class ConformerConv(nn.Module):
    def __init__(self, d: int = 4, kernel: int = 3) -> None:
        super().__init__()
        # Without a bias, zeroed padding stays zero up to the depthwise conv, which then sees the
        # same zeros past a sequence's end however long the batch is: what remains to depend on
        # the padding is the batch norm's statistics, the part under test.
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1, bias=False)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.SiLU()
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d, T)
        return self.pointwise2(self.act(self.bn(self.depthwise(self.glu(self.pointwise1(x))))))


def _conformer(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    module = syncbn.convert_sync_bn(ConformerConv().double())
    seqs = [torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i)) for i, n in enumerate([9, 3, 6, 5])]
    mine = seqs[2 * rank : 2 * rank + 2]
    outs = {}
    for pad_to in (9, 14):  # the same sequences padded two ways
        copy_ = copy.deepcopy(module)
        x = torch.full((2, 4, pad_to), 1e6, dtype=torch.float64)  # garbage padding
        for i, s in enumerate(mine):
            x[i, :, : s.shape[1]] = s
        mask = _lengths_mask([s.shape[1] for s in mine], pad_to)
        x = x * mask.unsqueeze(1)  # sequence models zero the padding at their input
        with syncbn.masked(mask):
            y = copy_(x)
        outs[pad_to] = (
            [y[i, :, : s.shape[1]] for i, s in enumerate(mine)],
            copy_.bn.running_mean.clone(),
            copy_.bn.running_var.clone(),
        )
    (ya, ma, va), (yb, mb, vb) = outs[9], outs[14]
    for a, b in zip(ya, yb):
        assert_close(a, b, 1e-12, "valid outputs depend on the padding")
    assert_close(ma, mb, 1e-12, "running_mean depends on the padding")
    assert_close(va, vb, 1e-12, "running_var depends on the padding")
    return {"running_mean": ma}


def test_conformer_module_under_masked_is_independent_of_padding():
    a, b = run_on_ranks(2, _conformer)
    assert torch.equal(a["running_mean"], b["running_mean"])


# --------------------------------------------------------------------------------------------
# The context manager's rules


def test_masked_context_matching_rule():
    layer = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = _lengths_mask([5, 2], 5)
    with syncbn.masked(mask):
        y = layer(x)
    assert torch.equal(y, syncbn.SyncBatchNorm(3, dtype=torch.float64)(x, mask))
    assert (y[1, :, 2:] == 0).all()
    with syncbn.masked(mask), pytest.raises(ValueError, match=r"needs a mask of shape \(2, 4\)"):
        layer(torch.randn(2, 3, 4, dtype=torch.float64))
    half = _lengths_mask([2, 1], 3)
    with syncbn.masked(mask, half):  # one mask per shape: a downsampling model
        assert (layer(torch.randn(2, 3, 3, dtype=torch.float64))[1, :, 1:] == 0).all()
    with pytest.raises(ValueError, match="at most one mask per shape"):
        with syncbn.masked(mask, mask.clone()):
            pass
    with pytest.raises(ValueError, match="bool masks"):
        with syncbn.masked(mask.float()):
            pass


def test_masked_context_limited_to_layers_and_explicit_mask_wins():
    body = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    head = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = _lengths_mask([5, 2], 5)
    with syncbn.masked(mask, layers=body):
        assert (body(x)[1, :, 2:] == 0).all()
        pooled = head(x.mean(2))  # (N, C): not in the scope, runs unmasked
        assert pooled.shape == (2, 3)
        full = torch.ones_like(mask)
        assert (body(x, full) != 0).all()  # an explicit mask wins
    with pytest.raises(ValueError, match=r"expected mask to be a bool tensor of shape \(2, 5\)"):
        body(x, mask[:, :3])


def test_norm_act_and_frozen_layers_take_masks():
    mask = _lengths_mask([4, 1], 4)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    act = syncbn.SyncBatchNormAct(3, act=nn.Sigmoid(), dtype=torch.float64)
    y = act(x, mask)
    assert (y[1, :, 1:] == 0).all(), "padded positions stay 0 after the activation"
    plain = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    assert_close(y[mask.unsqueeze(1).expand_as(x)], torch.sigmoid(plain(x, mask))[mask.unsqueeze(1).expand_as(x)], 1e-12, "act")
    frozen = syncbn.freeze_bn(syncbn.SyncBatchNorm(3, dtype=torch.float64))
    with syncbn.masked(mask):
        assert (frozen(x)[1, :, 1:] == 0).all()


# --------------------------------------------------------------------------------------------
# Every existing guarantee with a mask


def _min_count_masked(rank: int, world_size: int) -> str:
    layer = syncbn.SyncBatchNorm(2, dtype=torch.float64, fallback="running")
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    if rank == 0:
        mask[0, 0] = True  # one valid value in the whole group
    before = layer.running_mean.clone()
    y = layer(x, mask)
    assert torch.equal(layer.running_mean, before), "fewer than min_count valid values: no update"
    assert int(layer.num_batches_tracked) == 1
    if rank == 0:
        assert_close(y[0, :, 0], x[0, :, 0] / (1 + 1e-5) ** 0.5, 1e-12, "running statistics used")
    assert (y[~mask.unsqueeze(1).expand_as(y)] == 0).all()
    strict = syncbn.SyncBatchNorm(2, dtype=torch.float64)
    try:
        strict(x, mask)
    except ValueError as err:
        return str(err)
    return "no error"


def test_min_count_counts_valid_values():
    for message in run_on_ranks(2, _min_count_masked):
        assert "expected at least 2 values per channel across the process group" in message and "got 1." in message, message


def _micro_batch_masked(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    layer = syncbn.SyncBatchNorm(3, dtype=torch.float64, momentum=None)
    model = nn.Sequential(layer)
    gen = torch.Generator().manual_seed(5)
    batches = []
    for lengths in ([6, 2], [3, 5]):
        x = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)
        batches.append((x, _lengths_mask(lengths, 6)))
    with syncbn.accumulate_bn_stats(model):
        for x, m in batches:
            layer(x + rank, m)
    # Reference: the valid values of every micro-batch on every rank, one cumulative step.
    valid = torch.cat([_valid(x + r, m) for r in range(world_size) for x, m in batches])
    assert int(layer.num_batches_tracked) == 1
    assert_close(layer.running_mean, valid.mean(0), 1e-12, "accumulated mean")
    assert_close(layer.running_var, valid.var(0, unbiased=True), 1e-12, "accumulated unbiased var")
    fresh = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    syncbn.recompute_bn_stats(_MaskedModel(fresh), [{"x": x + rank, "mask": m} for x, m in batches])
    assert_close(fresh.running_mean, valid.mean(0), 1e-12, "precise mean")
    assert_close(fresh.running_var, valid.var(0, unbiased=True), 1e-12, "precise var")


class _MaskedModel(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(x, mask)


def test_accumulate_and_recompute_take_masked_batches():
    run_on_ranks(2, _micro_batch_masked)


def _compiled_masked(rank: int, world_size: int) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = syncbn.SyncBatchNorm(3, dtype=torch.float64)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(6)
    for lengths in ([5, 2], [1, 4, 3], [0]):
        x = torch.randn(len(lengths), 3, 5, generator=gen, dtype=torch.float64)
        mask = _lengths_mask(lengths, 5)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe, mask), compiled(xc, mask)
        assert_close(yc, ye, 1e-12, f"{lengths} output")
        g = torch.randn(ye.shape, generator=gen, dtype=torch.float64)
        ye.backward(g), yc.backward(g)
        assert_close(xc.grad, xe.grad, 1e-12, f"{lengths} grad_input")
        assert_close(compiled_layer.running_var, eager.running_var, 1e-12, f"{lengths} running_var")


def test_masked_layer_compiles_to_one_graph_with_changing_lengths():
    run_on_ranks(2, _compiled_masked, timeout=300)


def test_sequence_mask():
    lengths = torch.tensor([3, 0, 5])
    mask = syncbn.sequence_mask(lengths)
    assert mask.shape == (3, 5) and mask.dtype == torch.bool
    assert torch.equal(mask, _lengths_mask([3, 0, 5], 5))
    assert syncbn.sequence_mask(lengths, 7).shape == (3, 7)
    with pytest.raises(ValueError, match=r"lengths in \[0, 4\]"):
        syncbn.sequence_mask(lengths, 4)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        syncbn.sequence_mask(lengths.float())
