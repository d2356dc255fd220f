"""Step time and memory of LoRA against full stage 2, side by side on the demo model (configs/demo.yaml at PP=1).

    python benchmarks/lora.py [--size demo|mid] [--rank 8] [--rounds 3] [--steps 6] [--threads 1] [--json OUT]

Sizes are benchmarks/step.py's: ``demo`` (configs/demo.yaml: ViT 64×2, decoder 128×2, batch 64) and ``mid`` (ViT
256×4 at 64², decoder 512×4, sequences of 256, batch 8).

Two variants of the same run: full stage 2 (projector + LLM trained) and stage 2 with LoRA (``model.lora.rank``,
alpha = 2·rank, all four targets: the projector trained, the LLM frozen but for its adapters). Each round runs one
process per variant, alternating (full, LoRA, full, LoRA, ...): megavlm's ``Trainer`` steps ``--steps`` optimizer
steps on the in-memory synthetic data; per step the wall time and the process's CPU time (``time.process_time``: all
its threads) are taken, the median after the first step; the table gives the median over rounds and the LoRA/full
ratio. On a shared machine the wall time swings with the other work (a step of the same variant measured 0.1-9 s
while three other jobs ran); the CPU time of a one-thread process (``--threads 1``, the default) is the steadier
figure. Memory: one more process per variant runs three steps under
``megavlm.plan.measure.TensorMemory`` (live tensor bytes op by op, not RSS): weights, gradient buffers, optimizer
state and the step's peak, next to ``megavlm plan``'s estimate of the peak for the same config.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = ["data.source=synthetic", "logging.tensorboard=false", "train.stage=2", "checkpoint.save_interval=0"]


def sizes() -> dict[str, tuple[str, list[str]]]:
    """benchmarks/step.py's sizes: name → (config, overrides)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_step", os.path.join(ROOT, "benchmarks", "step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SIZES


def variants(rank: int) -> dict[str, list[str]]:
    return {"full stage 2": [], f"LoRA r={rank}": [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}"]}


def _config(overrides: list[str], run_dir: str):
    from megavlm.config import load_config, validate

    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [*BASE, *overrides, f"run_dir={run_dir}"])
    assert cfg.parallel.pp == 1, "the sizes run at PP=1"
    validate(cfg, 1)
    return cfg


def worker(what: str, overrides: list[str], steps: int, out: str, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        cfg = _config([*overrides, f"train.steps={steps}"], d)
        if what == "time":
            from megavlm.training.trainer import Trainer

            tr = Trainer(cfg)
            times, cpu = [], []
            for step in range(1, steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                tr.step(step)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            res["step_times_s"], res["step_cpu_s"] = times, cpu
            res["params"] = sum(p.numel() for p in tr.model.parameters())
            res["trainable"] = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
        else:
            from megavlm import plan
            from megavlm.plan.measure import measure_training

            res = measure_training(cfg, steps=3)
            est = plan.make_plan(cfg, gpus=1, gpu_memory_gib=1024, device="cpu", vocab_size=res["vocab_size"])
            res["plan_peak"] = est["config_layout"]["peak"]
    with open(out, "w") as f:
        json.dump(res, f)


def _run(what: str, overrides: list[str], steps: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", what, "--steps", str(steps), "--out", out]
        cmd += ["--threads", str(threads or 0)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd + ["--", *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{what} {overrides} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["demo", "mid"], default="demo", help="benchmarks/step.py's sizes")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per timing process (the first is dropped)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.overrides, args.steps, args.out, args.threads)
        return 0
    path, size = sizes()[args.size]
    assert path == "configs/demo.yaml", path
    var = {name: [*size, *ov] for name, ov in variants(args.rank).items()}
    times: dict[str, list[float]] = {k: [] for k in var}
    cpus: dict[str, list[float]] = {k: [] for k in var}
    info: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, ov in var.items():
            res = _run("time", ov, args.steps, args.threads)
            times[name].append(statistics.median(res["step_times_s"][1:]))
            cpus[name].append(statistics.median(res["step_cpu_s"][1:]))
            info[name] = {"params": res["params"], "trainable": res["trainable"]}
            print(f"round {r + 1}/{args.rounds} {name}: median step {times[name][-1] * 1e3:.0f} ms wall, "
                  f"{cpus[name][-1] * 1e3:.0f} ms CPU", flush=True)
    for name, ov in var.items():
        info[name]["memory"] = _run("memory", ov, 3, args.threads)
    full, lora = list(var)
    mib = 2 ** 20
    print(f"\n{args.size} model (configs/demo.yaml + benchmarks/step.py's {args.size} overrides, PP=1, synthetic "
          f"data), {info[full]['params']:,} parameters; "
          f"{args.rounds} rounds × {args.steps} steps, {args.threads or 'default'} thread(s)\n")
    print(f"{'':<34}{full:>16}{lora:>16}{'LoRA/full':>12}")
    print(f"{'trained parameters':<34}{info[full]['trainable']:>16,}{info[lora]['trainable']:>16,}"
          f"{info[lora]['trainable'] / info[full]['trainable']:>12.3f}")
    tf, tl = statistics.median(times[full]), statistics.median(times[lora])
    print(f"{'step wall time, median (ms)':<34}{tf * 1e3:>16.0f}{tl * 1e3:>16.0f}{tl / tf:>12.3f}")
    cf, cl = statistics.median(cpus[full]), statistics.median(cpus[lora])
    print(f"{'step CPU time, median (ms)':<34}{cf * 1e3:>16.0f}{cl * 1e3:>16.0f}{cl / cf:>12.3f}")
    for key, label in (("weights", "weights (MiB)"), ("gradients", "gradient buffers (MiB)"),
                       ("optimizer", "optimizer state (MiB)"), ("activations_peak", "fwd/bwd peak above static (MiB)"),
                       ("peak", "step peak, tensors (MiB)"), ("plan_peak", "megavlm plan's peak (MiB)")):
        a, b = info[full]["memory"][key], info[lora]["memory"][key]
        print(f"{label:<34}{a / mib:>16.2f}{b / mib:>16.2f}{(b / a if a else float('nan')):>12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "rank": args.rank, "times_s": times, "cpu_s": cpus, "info": info}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
