"""The benchmarks run as docs/perf.md gives them (each answers ``--help`` from the repository root, so none shadows an
installed package or misses an import), and megavlm's training step does no more aten operations than a plain
transformers LLaVA loop on the same shapes (counted, not timed: deterministic)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import ROOT, _env

BENCHMARKS = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help(name):
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", name), "--help"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage" in proc.stdout.lower()


def _step_module():
    spec = importlib.util.spec_from_file_location("_bench_step", os.path.join(ROOT, "benchmarks", "step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_ops_no_more_than_transformers(rt, tmp_path):
    """One step of configs/demo.yaml at PP=1 (batch 64 = 4 × 16, in-memory data): megavlm's aten ops against the
    transformers loop's on the same batches (data, forward, backward, optimizer together)."""
    from megavlm import families
    from megavlm.config import load_config, validate

    step = _step_module()
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), [
        "parallel.pp=1", f"run_dir={tmp_path}", "data.source=synthetic", "data.num_samples=256", "data.eval_samples=0",
        "logging.tensorboard=false", "train.warmup_steps=0", "train.steps=100"])
    validate(cfg, 1)
    trainer = step.build_megavlm(cfg)
    hf_model, hf_opt = step.build_hf(cfg, trainer.tokenizer)
    img = families.of(cfg).image_processor(cfg)
    step.megavlm_step(trainer, 1)  # first steps allocate optimizer state: count a later one
    step.hf_step(hf_model, hf_opt, trainer.data.microbatches(0), img.mean, img.std)
    with step.OpCounter() as ours:
        step.megavlm_step(trainer, 2, ours)
    with step.OpCounter() as theirs:
        step.hf_step(hf_model, hf_opt, trainer.data.microbatches(1), img.mean, img.std, theirs)
    a, b = sum(ours.counts.values()), sum(theirs.counts.values())
    assert a > 1000 and b > 1000  # both really ran a step
    assert a <= b, (dict(ours.counts), dict(theirs.counts))
