"""Shared test helpers: run the real CLI (one process or torchrun-spawned gloo ranks) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m megavlm ARGS`` or, with nproc > 1, under ``torchrun --standalone``. ``args`` may instead start
    with a script path (ending in .py)."""
    target = args[0] if args[0].endswith(".py") else None
    rest = args[1:] if target else args
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += [target] if target else ["-m", "megavlm"]
    else:
        cmd = [sys.executable] + ([target] if target else ["-m", "megavlm"])
    proc = subprocess.run(cmd + rest, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd + rest)}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(run_dir: str, *overrides: str, nproc: int = 1, config: str = TINY) -> subprocess.CompletedProcess:
    return run(["train", config, f"run_dir={run_dir}", *overrides], nproc=nproc)


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def checkpoint_tensors(path: str) -> dict:
    """Every tensor of a dist checkpoint, read in this process (no process group) with torch's own DCP reader."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ckpt.pt")
        dcp_to_torch_save(path, out)
        return torch.load(out, weights_only=False)
