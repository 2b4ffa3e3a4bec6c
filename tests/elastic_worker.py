"""torchrun entry point for tests/test_elastic.py: examples/train_resnet.py with a worker killed.

On the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) the rank named by ``SYNCBN_KILL_RANK``
sends itself SIGKILL after its second optimizer step past the first checkpoint
(``SYNCBN_KILL_AFTER``, a file path): mid-way through the epoch after a checkpoint, with no
exception and no cleanup, like an OOM kill or a lost node. torchrun then restarts every worker,
and ``--resume`` continues from the checkpoint. The example itself is unchanged: the kill hangs
on torch's global optimizer-step hook.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import train_resnet  # noqa: E402


def _arm_kill(after: Path) -> None:
    steps_past = 0

    def hook(optimizer, args, kwargs) -> None:
        nonlocal steps_past
        if after.exists():
            steps_past += 1
            if steps_past == 2:
                print(f"rank {os.environ['RANK']}: SIGKILL mid-epoch", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(hook)


if __name__ == "__main__":
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get("RANK") == os.environ.get("SYNCBN_KILL_RANK"):
        _arm_kill(Path(os.environ["SYNCBN_KILL_AFTER"]))
    train_resnet.main(sys.argv[1:])
