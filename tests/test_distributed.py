"""syncbn.distributed (environment parsing, the no-launcher context) and the launch/ scripts.

The fast tier starts torchrun.sh with a probe; the runs through multinode.sh (two agents, and one
node under SLURM) are the slow tier (``-m slow``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import syncbn
from syncbn.distributed import launcher_env

from .launch_util import REPO, PortClash, base_env, finish, port_clash, run, start, stop, with_fixed_port

_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------ environment parsing
def test_launcher_env_parses_torchrun_variables() -> None:
    assert launcher_env({}) is None
    assert launcher_env({"RANK": "", "WORLD_SIZE": ""}) is None
    assert launcher_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    # LOCAL_RANK defaults to RANK (one node), so a hand-set RANK/WORLD_SIZE pair works.
    assert launcher_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 1)


@pytest.mark.parametrize(
    "env, words",
    [
        ({"RANK": "0"}, ["RANK and WORLD_SIZE", "WORLD_SIZE missing", "launch/torchrun.sh"]),
        ({"WORLD_SIZE": "2"}, ["RANK and WORLD_SIZE", "RANK missing"]),
        ({"RANK": "zero", "WORLD_SIZE": "2"}, ["integer", "RANK", "'zero'"]),
        ({"RANK": "2", "WORLD_SIZE": "2"}, ["0 <= RANK < WORLD_SIZE", "RANK=2, WORLD_SIZE=2"]),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE >= 1"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["LOCAL_RANK <= RANK", "LOCAL_RANK=1"]),
    ],
)
def test_launcher_env_rejects_bad_environments(env: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        launcher_env(env)
    for word in words:
        assert word in str(err.value)


def test_no_launcher_is_a_single_process_context(clean_env: pytest.MonkeyPatch) -> None:
    info = syncbn.init_distributed()
    assert tuple(info) == (0, 1, 0, torch.device("cpu"))
    rank, world_size, local_rank, device = info  # unpacks as the issue promises
    assert (info.is_distributed, info.backend, info.is_main) == (False, "none", True)
    assert not dist.is_initialized()
    syncbn.cleanup()  # a no-op without a group, and safe twice
    syncbn.cleanup()
    # Every syncbn layer then behaves as plain BatchNorm.
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(syncbn.SyncBatchNorm(3)(x), torch.nn.BatchNorm2d(3)(x))


def test_missing_master_address_is_explained(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR.*launch/torchrun.sh"):
        syncbn.init_distributed()
    assert not dist.is_initialized()


def test_cuda_device_beyond_visible_gpus_is_explained() -> None:
    from syncbn.distributed import _pick_device

    with pytest.raises(ValueError, match="CUDA device index below"):
        _pick_device(torch.cuda.device_count(), "cuda")


def test_group_of_one_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    # A launcher with one process: a real Gloo group of size 1 in this process, then cleaned up.
    # MASTER_PORT=0: the store (rank 0's, the only one) binds a port of the system's choosing.
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "0"}.items():
        clean_env.setenv(k, v)
    try:
        info = syncbn.init_distributed()
        assert tuple(info) == (0, 1, 0, torch.device("cpu"))
        assert (info.is_distributed, info.backend) == (True, "gloo")
        assert syncbn.init_distributed() == info  # already initialized: reports, starts nothing
    finally:
        syncbn.cleanup()
    assert not dist.is_initialized()


# ------------------------------------------------------------------ launch scripts
def _probe_lines(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith("probe "))


def test_launch_scripts_parse() -> None:
    """Every launch script is valid bash to its end (the fast tier runs only torchrun.sh in full)."""
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {"launch/torchrun.sh", "launch/multinode.sh", "launch/slurm.sbatch", "launch/accelerate.sh"} <= set(scripts)
    for script in scripts:
        run(["bash", "-n", script])


def test_launch_scripts_explain_missing_arguments() -> None:
    for script in ("launch/torchrun.sh", "launch/accelerate.sh"):
        out = run(["bash", script], expect_rc=2)
        assert "usage:" in out and "expected a training script" in out
    out = run(["bash", "launch/multinode.sh", "x.py"], expect_rc=1)
    assert "expected NNODES" in out
    out = run(["bash", "launch/multinode.sh", "x.py"],
              env=base_env(NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1"), expect_rc=2)
    assert "0 <= NODE_RANK < NNODES" in out and "NODE_RANK=2" in out
    out = run(["bash", "launch/slurm.sbatch", "x.py"], expect_rc=1)
    assert "expected to run inside a SLURM allocation" in out


def test_default_nproc_is_two_without_gpu_and_gpu_count_with() -> None:
    cmd = ". launch/_common.sh && syncbn_default_nproc"
    assert run(["bash", "-c", cmd], env=base_env(CUDA_VISIBLE_DEVICES="")).strip() == "2"
    assert run(["bash", "-c", cmd], env=base_env(CUDA_VISIBLE_DEVICES="0,1,2")).strip() == "3"
    # The project's venv python is found without PYTHON set.
    py = run(["bash", "-c", ". launch/_common.sh && echo $PYTHON"], env=base_env()).strip()
    assert py == str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else py == "python3"


def test_torchrun_sh_starts_two_cpu_processes() -> None:
    out = run(["bash", "launch/torchrun.sh", "tests/launch_probe.py"])
    assert _probe_lines(out) == [
        "probe rank=0 world_size=2 local_rank=0 backend=gloo device=cpu rank_sum=1",
        "probe rank=1 world_size=2 local_rank=1 backend=gloo device=cpu rank_sum=1",
    ]


def _two_nodes(port: int) -> tuple[str, str]:
    env = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC="1")
    cmd = ["bash", "launch/multinode.sh", "tests/launch_probe.py"]
    node1 = start(cmd, env=base_env(NODE_RANK="1", **env))
    try:
        rc0, out0 = finish(start(cmd, env=base_env(NODE_RANK="0", **env)))
        if rc0 != 0 and port_clash(out0):
            raise PortClash(out0[-2000:])
        assert rc0 == 0, f"node 0 exited with {rc0}; output:\n{out0}"
        rc1, out1 = finish(node1)
    finally:
        stop(node1)
    assert rc1 == 0, f"node 1 exited with {rc1}; output:\n{out1}"
    return out0, out1


@pytest.mark.slow
def test_multinode_sh_two_nodes_on_one_machine() -> None:
    # Two torchrun agents, one process each, meeting through c10d at 127.0.0.1:PORT. Node 0 binds
    # the port both were told in advance: a port taken in the meantime is retried, not a failure.
    out0, out1 = with_fixed_port(_two_nodes)
    lines = _probe_lines(out0 + out1)
    assert [re.sub(r" local_rank=\d", "", line) for line in lines] == [
        "probe rank=0 world_size=2 backend=gloo device=cpu rank_sum=1",
        "probe rank=1 world_size=2 backend=gloo device=cpu rank_sum=1",
    ], out0 + out1


@pytest.mark.slow
def test_slurm_sbatch_runs_multinode_per_node(tmp_path: Path) -> None:
    # Stand-ins for srun and scontrol: a one-node allocation on this machine.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_NODEID=0 SLURM_PROCID=0 exec "$@"\n'
    )
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    # One node: it hosts the rendezvous store itself, on a port of the system's choosing (0).
    env = base_env(
        PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
        SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT="0",
    )
    # Started from elsewhere, as sbatch does with its copy of the script.
    out = run(["bash", str(REPO / "launch/slurm.sbatch"), "tests/launch_probe.py"], env=env, cwd=tmp_path)
    assert "job 42, 1 node(s), rendezvous at 127.0.0.1:" in out
    assert len(_probe_lines(out)) == 2 and all("world_size=2" in line for line in _probe_lines(out))
