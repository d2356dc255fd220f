"""A rank killed during a save (issue 15): the run resumes exactly where the uninterrupted run would be, and no
process of the run outlives it. Two ranks (PP=2) of the tiny config, a few steps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, TINY, _env, metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ARGS = ["parallel.pp=2", "train.steps=6", "checkpoint.save_interval=2", "checkpoint.keep=2", "data.num_samples=64",
        "logging.tensorboard=false", "train.warmup_steps=2"]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_worker.py")


def _torchrun(target: list[str], args: list[str], log: str, **env_extra) -> tuple[int, str, list]:
    """Run under torchrun (2 ranks), recording every process it starts; returns (status, output, processes)."""
    import psutil

    env = dict(_env(), **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target, *args]
    seen: dict[int, psutil.Process] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    with open(log) as f:
        return proc.returncode, f.read(), list(seen.values())


def _left_running(procs: list, grace_s: float = 10.0) -> list[str]:
    """The recorded processes still alive after a grace period (psutil compares start times: no pid reuse)."""
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("crash") / "run")
    rc, out, procs = _torchrun([WORKER], ["train", TINY, f"run_dir={run_dir}", *ARGS], run_dir + ".crash.log",
                               MEGAVLM_TEST_KILL_RANK="1", MEGAVLM_TEST_KILL_STEP="4")
    crashed = {"rc": rc, "out": out, "left": _left_running(procs), "metrics": metrics(run_dir),
               "files": sorted(os.listdir(os.path.join(run_dir, "checkpoints"))),
               "latest": open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()}
    rc, out, procs = _torchrun(["-m", "megavlm"], ["train", TINY, f"run_dir={run_dir}", *ARGS, "checkpoint.load=auto"],
                               run_dir + ".resume.log")
    resumed = {"rc": rc, "out": out, "left": _left_running(procs), "metrics": metrics(run_dir),
               "files": sorted(os.listdir(os.path.join(run_dir, "checkpoints")))}
    return run_dir, crashed, resumed


def test_kill_during_save_resumes_exactly_and_leaves_nothing_running(crashed_and_resumed):
    _, crashed, resumed = crashed_and_resumed
    # the kill came in the middle of saving step 4: its directory is still the temporary one, latest is step 2
    assert crashed["rc"] != 0, crashed["out"][-3000:]
    assert "iter_0000004.tmp" in crashed["files"] and "iter_0000004" not in crashed["files"], crashed["files"]
    assert crashed["latest"] == "iter_0000002"
    assert [m["step"] for m in crashed["metrics"]] == [1, 2, 3, 4]
    assert crashed["left"] == [], "processes outlived the killed run"

    assert resumed["rc"] == 0, resumed["out"][-3000:]
    assert "loaded " in resumed["out"] and "iter_0000002: step 2" in resumed["out"]
    assert resumed["files"] == ["iter_0000004", "iter_0000006", "latest"]  # no .tmp left, keep=2
    assert resumed["left"] == []
    # metrics.jsonl continues exactly: steps 1-2 kept, 3-4 recomputed equal to the steps the killed run had made
    got = resumed["metrics"]
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert got[:2] == crashed["metrics"][:2]
    for before, after in zip(crashed["metrics"][2:], got[2:4]):
        assert abs(before["loss"] - after["loss"]) <= 1e-6, (before, after)
        assert before["lr"] == after["lr"] and before["supervised_tokens"] == after["supervised_tokens"]
        assert before["grad_norm"] == pytest.approx(after["grad_norm"], rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_corrupt_checkpoint_stops_every_rank_with_one_error_line(crashed_and_resumed, tmp_path):
    """Flipped bytes in rank 1's file of the latest checkpoint: rank 1 finds them (each rank re-hashes the files it
    reads), and both ranks stop with status 2 before anything is written; one ``error:`` line, no traceback."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(crashed_and_resumed[0], run_dir)
    target = os.path.join(run_dir, "checkpoints", "iter_0000006", "__1_0.distcp")
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        f.write(b"\x00" * 64)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        before = f.read()
    port, procs = str(_free_port()), []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "megavlm", "train", TINY, f"run_dir={run_dir}", *ARGS,
                                       "train.steps=8", "checkpoint.load=auto"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    errors = [line for _, err in outs for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint "), errors
    assert "__1_0.distcp does not match its checksum" in errors[0]
    assert "previous complete checkpoint is " + os.path.join(run_dir, "checkpoints", "iter_0000004") in errors[0]
    assert not any("Traceback" in o + e for o, e in outs)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert f.read() == before
    assert json.loads(before.splitlines()[-1])["step"] == 6
