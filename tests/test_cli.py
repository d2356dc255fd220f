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


@pytest.mark.parametrize("case", ["run_dir_is_a_file", "checkpoint_dir_is_a_file", "shards_is_a_file",
                                  "global_batch_1e11"])
def test_paths_and_sizes_are_checked_before_any_work(tmp_path, case):
    """Each of these was a traceback (issue 15, item 11) -- checkpoint.dir a file only at the first save, after the
    training compute: now one `error:` line, exit status 2, before anything is written."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    run_dir = tmp_path / "run"
    overrides, needle = {
        "run_dir_is_a_file": ([f"run_dir={afile}"], f"run_dir={afile} is a file"),
        "checkpoint_dir_is_a_file": ([f"checkpoint.dir={afile}"], f"checkpoint.dir={afile} is a file"),
        "shards_is_a_file": (["data.source=synthetic_shards", f"data.shards={afile}"],
                             f"data.shards={afile} is a file"),
        "global_batch_1e11": (["train.global_batch=1e11"], "train.global_batch=100000000000 is too large"),
    }[case]
    proc = run(["train", "configs/tiny_cpu.yaml", f"run_dir={run_dir}", "train.steps=1", *overrides], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert not run_dir.exists() and afile.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_check_command_runs_trains_checks_for_a_world_size(tmp_path):
    ok = run(["check", "configs/tiny_cpu.yaml", f"run_dir={tmp_path / 'r'}", "--world-size", "2"])
    assert "ok for 2 process(es): tp=1 pp=1 dp=2" in ok.stdout
    bad = run(["check", "configs/tiny_cpu.yaml", "parallel.tp=2", "--world-size", "3"], check=False)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "world size 3" in bad.stderr
    assert not (tmp_path / "r").exists()


def test_torchrun_launch_checks_once_before_spawning(tmp_path):
    """launch/torchrun.sh runs `megavlm check` before torchrun: a config mistake is one `error:` line and exit 2
    (under torchrun each rank printed it, then torchrun its ChildFailedError traceback and exit 1); torchrun is not
    started. A good config goes on to torchrun with the same arguments."""
    import subprocess
    import sys

    from helpers import ROOT, _env

    env = {k: v for k, v in _env().items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MEGAVLM",
                                                          "MEGAVLM_CHECK", "MEGAVLM_DRY_RUN")}
    env.update(NPROC_PER_NODE="2", TORCHRUN=f"{sys.executable} -c print('TORCHRUN-STARTED')")
    launch = os.path.join(ROOT, "launch", "torchrun.sh")
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = subprocess.run(["bash", launch, "configs/tiny_cpu.yaml", f"run_dir={afile}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("error:") == 1 and f"error: run_dir={afile} is a file" in bad.stderr
    assert "TORCHRUN-STARTED" not in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(["bash", launch, "configs/tiny_cpu.yaml", f"run_dir={tmp_path / 'r'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "TORCHRUN-STARTED" in good.stdout, good.stderr
    assert "ok for 2 process(es)" in good.stderr
