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
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # (a test's own runtime may hold
        env.pop(k, None)                                                       # that port: pick a free one)
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


#: (question, answer) pairs of the shards :func:`write_image_shards` writes.
QUESTIONS = [("what color is the square ?", "red"), ("what shape is blue ?", "circle"),
             ("describe the image .", "a green triangle")]


def write_image_shards(root, sizes, n: int = 16, second_image_every: int = 0) -> tuple[str, str]:
    """Shards (``megavlm data convert`` of a jsonl file) of ``n`` one-turn records over random-noise images whose
    ``(width, height)`` cycle through ``sizes``; every ``second_image_every``-th record (0: none) has a second image,
    of the size four places on. Returns (shards dir, the first image's path)."""
    import numpy as np
    from PIL import Image

    images = os.path.join(root, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "records.jsonl"), "w") as f:
        for i in range(n):
            names = []
            for j in range(1 + bool(second_image_every and i % second_image_every == 0)):
                w, h = sizes[(i + 4 * j) % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(images, f"{i}_{j}.png"))
                names.append(f"{i}_{j}.png")
            q, a = QUESTIONS[i % len(QUESTIONS)]
            rec = {"conversations": [{"from": "human", "value": "<image>\n" * len(names) + q},
                                     {"from": "gpt", "value": a}]}
            rec.update({"image": names[0]} if len(names) == 1 else {"images": names})
            f.write(json.dumps(rec) + "\n")
    shards = os.path.join(root, "shards")
    run(["data", "convert", "--format", "jsonl", "--json", os.path.join(root, "records.jsonl"), "--images", images,
         "--out", shards, "--workers", "1"])
    return shards, os.path.join(images, "0_0.png")


def assert_layouts_resume_equal(tmp_path, ref_dir, resume: str, overrides, config: str, steps=(3, 4),
                                layouts=(("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]))) -> None:
    """Each layout (two processes) resumes ``resume`` (a checkpoint of the one-process run in ``ref_dir``) with
    ``overrides`` and logs the reference's losses at ``steps`` (to 1e-5)."""
    want = losses(ref_dir)
    for name, layout in layouts:
        d = os.path.join(tmp_path, name)
        train(d, *overrides, f"checkpoint.load={resume}", *layout, nproc=2, config=config)
        got = losses(d)
        assert sorted(got) == list(steps), name
        for step in steps:
            assert abs(got[step] - want[step]) <= 1e-5, (name, step, got[step], want[step])
