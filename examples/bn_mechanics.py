"""Batch-norm mechanics, measured: the seed document's hands-on claims, computed with syncbn's layers.

    python examples/bn_mechanics.py

Each row states a claim, the number measured here, and whether it holds. Everything runs in one
process: without a process group SyncBatchNorm computes exactly what nn.BatchNorm does.
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

import syncbn
from syncbn import functional as BF

__all__ = ["Row", "measure", "main"]


class Row(NamedTuple):
    claim: str
    measured: str
    holds: bool


def _bn(c: int = 1, **kw) -> syncbn.SyncBatchNorm:
    return syncbn.SyncBatchNorm(c, **kw).double()


def sigmoid_gradient(n: int, spread: float = 0.5) -> Row:
    """E[sigmoid'(z)] for pre-activations of mean 4 and std `spread`, straight into the sigmoid vs
    through BN with gamma = `spread` (BN moves the mean to 0 and keeps the spread)."""

    def ratio(std: float) -> tuple[float, float]:
        x = (4.0 + std * torch.randn(n, 1)).double()
        bn = _bn()
        with torch.no_grad():
            bn.weight.fill_(std)
        grads = []
        for z in (x, bn(x)):
            z = z.detach().requires_grad_(True)
            torch.sigmoid(z).sum().backward()
            grads.append(z.grad.mean().item())
        return grads[0], grads[1]

    raw, normed = ratio(spread)
    raw1, normed1 = ratio(1.0)
    point = 0.25 / (torch.sigmoid(torch.tensor(4.0)) * torch.sigmoid(torch.tensor(-4.0))).item()
    return Row(
        "sigmoid unit: expected gradient grows >10x when BN moves the input mean from 4 to 0",
        f"std {spread}: E[s'(z)] {raw:.4f} -> {normed:.4f}, x{normed / raw:.1f} (at a point: x{point:.1f}; "
        f"with std 1 the spread itself blurs it: x{normed1 / raw1:.1f})",
        normed / raw > 10,
    )


def relu_firing(n: int) -> Row:
    """Fraction of positive ReLU inputs after BN with beta = 0 and with beta = 0.5."""
    x = (3.0 + 2.0 * torch.randn(n, 4)).double()  # 4 units, all firing ~93% before BN
    before = (x > 0).double().mean().item()
    bn = _bn(4)
    at0 = (bn(x) > 0).double().mean().item()
    with torch.no_grad():
        bn.bias.fill_(0.5)
    at_half = (bn(x) > 0).double().mean().item()
    expected = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))  # Phi(0.5) for Gaussian inputs
    return Row(
        "ReLU after BN: ~50% of units fire with beta = 0; a positive beta raises it",
        f"before BN {100 * before:.1f}%; beta=0: {100 * at0:.1f}%; beta=0.5: {100 * at_half:.1f}% "
        f"(Phi(0.5) = {100 * expected:.1f}%)",
        abs(at0 - 0.5) < 0.02 and at_half > at0 + 0.1,
    )


def ema_bias(steps: int = 5, momentum: float = 0.1) -> Row:
    """Zero-initialised running mean after `steps` batches of mean 2: biased by (1-m)^t; debias fixes it."""
    plain, debiased = _bn(momentum=momentum), _bn(momentum=momentum, debias=True)
    c = 2.0
    for _ in range(steps):
        x = torch.randn(64, 1).double()
        x = x - x.mean() + c  # every batch has mean exactly c
        plain(x)
        debiased(x)
    biased = plain.running_mean.item()
    closed = c * (1 - (1 - momentum) ** steps)
    fixed = debiased.running_mean.item()
    return Row(
        f"zero-init EMA (m={momentum}) after {steps} batches of mean {c}: biased to c(1-(1-m)^t); "
        "bias correction (debias=True) recovers c",
        f"EMA {biased:.4f} (closed form {closed:.4f}); corrected {fixed:.4f}",
        abs(biased - closed) < 1e-12 and abs(fixed - c) < 1e-12,
    )


def jacobians(n: int = 6) -> list[Row]:
    """dy/dx of one channel over a batch of n: dense in training mode, diagonal in eval mode."""
    bn = _bn()
    with torch.no_grad():
        bn.weight.fill_(1.5)
    x = torch.randn(n, 1).double()
    j_train = torch.autograd.functional.jacobian(lambda t: bn(t), x).reshape(n, n)
    mean, var = x.mean(), x.var(unbiased=False)
    sigma = (var + bn.eps).sqrt()
    xhat = ((x - mean) / sigma).flatten()
    # y_i = g (x_i - mu) / sigma + b  =>  dy_i/dx_j = g / sigma (delta_ij - 1/n - xhat_i xhat_j / n)
    closed = 1.5 / sigma * (torch.eye(n, dtype=x.dtype) - 1.0 / n - torch.outer(xhat, xhat) / n)
    err = (j_train - closed).abs().max().item()
    off = ~torch.eye(n, dtype=torch.bool)
    dense = (j_train[off].abs() > 1e-12).double().mean().item()
    bn.eval()
    j_eval = torch.autograd.functional.jacobian(lambda t: bn(t), x).reshape(n, n)
    diag_expected = 1.5 / math.sqrt(bn.running_var.item() + bn.eps)
    eval_off = j_eval[off].abs().max().item()
    eval_diag_err = (j_eval.diagonal() - diag_expected).abs().max().item()
    return [
        Row(
            "training-mode Jacobian is dense and equals g/sigma (I - 1/n - xhat xhat^T / n)",
            f"{100 * dense:.0f}% of off-diagonal entries non-zero; max |J - closed form| = {err:.1e}",
            dense == 1.0 and err < 1e-12,
        ),
        Row(
            "eval-mode Jacobian is diagonal: g / sqrt(running_var + eps)",
            f"max |off-diagonal| = {eval_off:.1e}; max |diag - g/sqrt(var+eps)| = {eval_diag_err:.1e}",
            eval_off == 0.0 and eval_diag_err < 1e-12,
        ),
    ]


def scale_invariance(n: int, a: float = 10.0) -> list[Row]:
    """BN(a W x) = BN(W x); the gradient w.r.t. W scales as 1/a, so the relative step as 1/a^2."""
    torch.manual_seed(1)
    x = torch.randn(n, 8).double()
    w = torch.randn(4, 8).double()
    target = torch.randn(n, 4).double()
    bn = syncbn.SyncBatchNorm(4, eps=1e-12).double()  # tiny eps: invariance up to eps (torch needs eps > 0)

    def out_and_grad(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.clone().requires_grad_(True)
        y = bn(x @ weight.t())
        ((y - target) ** 2).mean().backward()
        return y.detach(), weight.grad

    y1, g1 = out_and_grad(w)
    ya, ga = out_and_grad(a * w)
    out_diff = (y1 - ya).abs().max().item()
    grad_ratio = (g1.norm() / ga.norm()).item()
    lr = 0.1
    rel = lambda wt, g: (lr * g.norm() / wt.norm()).item()  # noqa: E731
    eff = rel(w, g1) / rel(a * w, ga)
    return [
        Row(
            f"scaling the previous layer's weights by {a:g} leaves BN's output unchanged",
            f"max |BN(aWx) - BN(Wx)| = {out_diff:.1e}",
            out_diff < 1e-10,
        ),
        Row(
            "so the gradient shrinks as 1/a and the relative update as 1/a^2: weight decay, by "
            "shrinking |W|, raises the effective learning rate lr/|W|^2",
            f"|grad(W)|/|grad(aW)| = {grad_ratio:.3f}; relative step ratio = {eff:.1f} (a^2 = {a * a:g})",
            abs(grad_ratio - a) < 1e-6 and abs(eff - a * a) < 1e-4,
        ),
    ]


def covariate_shift(n: int) -> Row:
    """Eval mean on shifted inputs equals gamma (m_test - mu_pop) / sqrt(var_pop + eps) + beta."""
    bn = _bn(momentum=None)  # cumulative average: running stats = population estimates
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.3)
    for _ in range(20):
        bn((1.0 + 0.5 * torch.randn(n, 1)).double())  # population ~ N(1, 0.25)
    bn.eval()
    x_test = (2.5 + 0.5 * torch.randn(n, 1)).double()  # shifted: mean 2.5
    measured = bn(x_test).mean().item()
    mu, var = bn.running_mean.item(), bn.running_var.item()
    formula = 2.0 * (x_test.mean().item() - mu) / math.sqrt(var + bn.eps) + 0.3
    return Row(
        "eval mean under covariate shift = gamma (m_test - mu_pop) / sqrt(var_pop + eps) + beta",
        f"measured {measured:.6f}; formula {formula:.6f} (mu_pop {mu:.3f}, m_test {x_test.mean().item():.3f})",
        abs(measured - formula) < 1e-10,
    )


def renorm_mapping(n: int) -> list[Row]:
    """Batch Renorm's r, d turn batch-normalized values into population-normalized ones."""
    layer = syncbn.SyncBatchRenorm(3, momentum=0.1, affine=False, r_max=100.0, d_max=100.0).double()
    for _ in range(30):
        layer(torch.randn(n, 3).double() * 2.0 + 1.0)  # running stats ~ population N(1, 4)
    x = torch.randn(n, 3).double() * 1.5 + 1.4  # a batch whose statistics differ from them
    mu, var = layer.running_mean.clone(), layer.running_var.clone()  # before this step's update
    y = layer(x)
    pop = (x - mu) / (var + layer.eps).sqrt()
    bmean, bvar = x.mean(0), x.var(0, unbiased=False)
    r, d = BF.renorm_factors(bmean, bvar, mu, var, layer.eps, 100.0, 100.0)
    batch_normed = (x - bmean) / (bvar + layer.eps).sqrt()
    err = (batch_normed * r + d - pop).abs().max().item()
    err_layer = (y - pop).abs().max().item()
    clipped = syncbn.SyncBatchRenorm(3, affine=False, r_max=1.0, d_max=0.0).double()
    bn_out = nn.functional.batch_norm(x, None, None, training=True, eps=clipped.eps)
    err_clip = (clipped(x) - bn_out).abs().max().item()
    return [
        Row(
            "Batch Renorm: xhat_B * r + d = (x - mu) / sigma with r = sigma_B/sigma, d = (mu_B - mu)/sigma",
            f"r = {[round(v, 3) for v in r.tolist()]}, d = {[round(v, 3) for v in d.tolist()]}; "
            f"max |xhat_B r + d - xhat_pop| = {err:.1e} (library forward: {err_layer:.1e})",
            err < 1e-12 and err_layer < 1e-12,
        ),
        Row(
            "with r_max = 1, d_max = 0 it is plain batch norm",
            f"max |renorm - BN| = {err_clip:.1e}",
            err_clip < 1e-12,
        ),
    ]


def measure(n: int = 4096, seed: int = 0) -> list[Row]:
    """Every claim with its measurement; deterministic for a given seed."""
    torch.manual_seed(seed)
    rows = [sigmoid_gradient(n), relu_firing(n), ema_bias()]
    rows += jacobians()
    rows += scale_invariance(256)
    rows.append(covariate_shift(n))
    rows += renorm_mapping(512)
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| claim | measured | holds |", "|---|---|---|"]
    lines += [f"| {r.claim} | {r.measured} | {'yes' if r.holds else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="batch size of the statistical checks")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = measure(args.samples, args.seed)
    print(format_table(rows))
    failed = [r.claim for r in rows if not r.holds]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} claims hold")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
