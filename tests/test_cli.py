"""User mistakes at the command line: a clear message, exit status 2, no traceback, nothing written."""

import os

import pytest

from helpers import run

BAD = [
    (["parallel.tp=3"], "parallel.tp"),
    (["parallel.pp=3"], "parallel.pp"),
    (["train.global_batch=7"], "train.global_batch"),
    (["model.vision.image_size=30"], "model.vision.image_size"),
    (["train.stage=4"], "train.stage"),
    (["train.stpes=10"], "did you mean 'train.steps'"),
    (["parallel.first_stage_layers=1"], "parallel.first_stage_layers"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["model.projector.type=mlp3x"], "model.projector.type"),
    (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load=/nonexistent/ckpt"),
    (["model.kernels=fused"], "model.kernels=fused cannot run here"),
    (["data.tokenizer=/nonexistent/tok"], "tokenizer path '/nonexistent/tok' does not exist"),
]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_bad_input_fails_cleanly(tmp_path, overrides, expected):
    run_dir = tmp_path / "run"
    proc = run(["train", "configs/tiny_cpu.yaml", f"run_dir={run_dir}", *overrides], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") or "\nerror:" in proc.stderr
    if "checkpoint.load" not in expected:  # config checks run before anything is written
        assert not os.path.exists(run_dir)
    else:  # a missing checkpoint is found after start-up, but before any training or checkpoint write
        assert not os.path.exists(run_dir / "checkpoints")


def test_missing_config_file(tmp_path):
    proc = run(["train", str(tmp_path / "nope.yaml")], check=False)
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr and "Traceback" not in proc.stderr


def test_world_size_mismatch_is_caught_before_process_groups(tmp_path):
    """Under torchrun with 2 ranks, tp=4 cannot fit: both ranks stop during the config check."""
    proc = run(["train", "configs/tiny_cpu.yaml", f"run_dir={tmp_path / 'r'}", "parallel.tp=4"], nproc=2,
               check=False)
    assert proc.returncode != 0
    assert "parallel.tp" in proc.stderr and "world size" in proc.stderr.lower()
    assert not os.path.exists(tmp_path / "r")


def test_help_lists_commands():
    proc = run(["--help"])
    assert "train" in proc.stdout and "eval" in proc.stdout


def test_overrides_may_follow_the_options():
    """`megavlm plan CONFIG --gpus 2 parallel.tp=2` takes the trailing override; a stray option is still an error."""
    import json

    proc = run(["plan", "configs/tiny_cpu.yaml", "--gpus", "2", "--output", "json", "parallel.tp=2"])
    assert json.loads(proc.stdout)["config_layout"]["layout"]["tp"] == 2
    bad = run(["plan", "configs/tiny_cpu.yaml", "--gpus", "2", "--bogus"], check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
