"""examples/masked_sequences.py: its quick run end to end (2 ranks it starts itself), and the claims its
table rests on, checked in one process."""

from __future__ import annotations

import re
import sys

import pytest
import torch

import syncbn
from examples import masked_sequences as ms

from .launch_util import run

ROW = re.compile(
    r"^(masked|unmasked) +(running \(eval\)|batch \(training\)) +([\d.]+)% +([\d.]+)% +(\d\.\de[+-]\d\d)$", re.M
)


def test_quick_run_prints_the_table() -> None:
    out = run([sys.executable, "examples/masked_sequences.py", "--quick"])
    assert re.search(r"^world_size=2 backend=gloo batch_per_rank=16 steps=20 ", out, re.M), out
    assert len(re.findall(r"^ *(masked|unmasked) step \d+/20 loss=[\d.]+ ", out, re.M)) == 10, out
    assert "64 held-out sequences, padded A: each batch of 16 per rank to its longest; B: all to 256 frames" in out
    rows = {(m[0], m[1].split()[0]): (float(m[2]), float(m[3]), float(m[4])) for m in ROW.findall(out)}
    expected = [("masked", "running"), ("masked", "batch"), ("unmasked", "running"), ("unmasked", "batch")]
    assert list(rows) == expected, out
    for acc_a, acc_b, _ in rows.values():
        assert 0 <= acc_a <= 100 and 0 <= acc_b <= 100
    # Masked: the same logits however the sequences are padded, with running and batch statistics,
    # up to float32 rounding (sums over tensors of different lengths; ~1e-7 here, 1e-6 in a full run).
    for stats in ("running", "batch"):
        acc_a, acc_b, diff = rows["masked", stats]
        assert diff < 1e-5 and acc_a == acc_b, (stats, out)
    # Unmasked: the training computation (batch statistics) depends on the padding; eval does not
    # (running statistics are a per-channel affine map and the model never reads padded frames).
    assert rows["unmasked", "batch"][2] > 1e-3, out
    assert rows["unmasked", "running"][2] < 1e-5, out
    assert re.search(r"^done: wall=[\d.]+s$", out, re.M), out


def _logits(model: torch.nn.Module, data: ms.Sequences, pad_to, use_mask: bool) -> torch.Tensor:
    x, mask, _ = ms.pad_batch(data, torch.arange(8), pad_to)
    with torch.no_grad(), ms.mask_scope(model, mask, use_mask):
        return model(x, mask)


@pytest.mark.parametrize("train_mode", [True, False])
def test_padding_changes_only_the_unmasked_batch_statistics(train_mode: bool) -> None:
    # One process, no group: the synchronized layers act like BatchNorm on this batch.
    torch.manual_seed(0)
    model = syncbn.convert_sync_bn(ms.SequenceClassifier(width=8, kernel=5)).train(train_mode)
    data = ms.make_data(8, 10, 60, seed=0)
    for use_mask in (True, False):
        a, b = _logits(model, data, None, use_mask), _logits(model, data, ms.PAD_B, use_mask)
        if use_mask or not train_mode:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        else:
            assert (a - b).abs().max() > 1e-3


def test_the_head_norm_is_out_of_the_masks_scope() -> None:
    # Without layers=, the head's batch norm (pooled (N, C) vectors) fits no (N, T) mask: an error,
    # never a guess.
    model = syncbn.convert_sync_bn(ms.SequenceClassifier(width=8, kernel=5))
    x, mask, _ = ms.pad_batch(ms.make_data(4, 10, 30, seed=0), torch.arange(4))
    with pytest.raises(ValueError, match=r"input of shape \(4, 8\), which needs a mask of shape \(4,\)"):
        with syncbn.masked(mask):
            model(x, mask)
    with ms.mask_scope(model, mask, True):
        assert model(x, mask).shape == (4, len(ms.FREQUENCIES))
