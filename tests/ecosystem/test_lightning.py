"""Lightning's Trainer on 2 CPU processes with syncbn.lightning.SyncBatchNormPlugin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning", reason="ecosystem tier: needs Lightning (bash scripts/setup_env.sh --ecosystem)")

from . import lightning_fit as fit  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "lightning_fit.py")


def _reference(ranks: list[int]) -> dict:
    """One process, plain BatchNorm, SGD on the concatenation of the given ranks' batches."""
    net = fit.make_net()
    opt = torch.optim.SGD(net.parameters(), lr=fit.LR)
    data = [fit.rank_data(r) for r in ranks]
    for step in range(fit.STEPS):
        batch = torch.cat([d[step * fit.PER_RANK : (step + 1) * fit.PER_RANK] for d in data])
        opt.zero_grad()
        fit.loss_fn(net.train()(batch)).backward()
        opt.step()
    return net.state_dict()


def test_trainer_ddp_two_cpu_processes_synchronizes_statistics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for result in ranks:  # the plugin reverted the model when fitting ended
        assert "BatchNorm2d" in result["classes"] and "BatchNorm1d" in result["classes"]
        assert not any(c.startswith("Sync") for c in result["classes"])
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    for key in state0:
        assert torch.equal(state0[key], state1[key]), f"{key} differs between ranks"

    together = _reference([0, 1])
    alone = _reference([0])
    for key in ("net.1.running_mean", "net.1.running_var", "net.6.running_mean", "net.6.running_var"):
        ref_key = key[len("net.") :]
        assert torch.allclose(state0[key], together[ref_key], rtol=1e-5, atol=1e-5), key
    # Local statistics would have been rank 0's own: far from the synchronized ones.
    assert (alone["1.running_mean"] - together["1.running_mean"]).abs().max() > 0.1
    for key, value in together.items():
        assert torch.allclose(state0["net." + key].double(), value.double(), rtol=1e-4, atol=1e-5), key
