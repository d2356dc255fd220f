"""Every command in README.md's ```bash blocks, at tiny scale.

The blocks are parsed from README.md (``\\`` continuation lines joined, comment lines and trailing ``# ...`` comments
dropped), so an edited command is what runs. Each command is recognised by its first words; a README command of a
kind this file does not know fails ``test_every_readme_command_is_covered``, so every README command stays covered.

- The pipeline block ("A real LLaVA-1.5 run": `megavlm ...` and `torchrun ... -m megavlm train ...` commands) runs
  in order in a fresh directory that stands in for the checkout (``cwd``), after tests/readme_fixtures.py wrote
  what the README says to fetch beforehand at the README's relative paths: a tiny random CLIP
  (``models/clip-vit-large-patch14-336``), a tiny random LLaMA with the synthetic word-level tokenizer
  (``models/vicuna-7b-v1.5``), a few LLaVA-Pretrain and instruction-mix records with JPEG images (``data/...``) and
  ``cat.jpg``. The substitutions, and nothing else:

  * the absolute prefixes ``/checkpoints/`` and ``/data/llava/`` → ``{tmp}/checkpoints/`` and ``{tmp}/data/llava/``,
    in the commands and in the recipes (the recipes read those paths);
  * ``--nproc-per-node 8`` → ``2`` (two CPU ranks, gloo); torchrun's rendezvous port is a free one, given through
    the environment (``PET_MASTER_PORT``) so that tests running side by side do not collide on 29500;
  * the words ``megavlm`` / ``torchrun`` → ``python -m megavlm`` / ``python -m torch.distributed.run`` with this
    interpreter and tests/helpers.py's environment (no PATH lookup);
  * a recipe named by ``megavlm plan`` is the checkout's file with only the two prefixes substituted (the real
    7B shapes: plan counts, it builds nothing);
  * a recipe named by a *train* command is a tiny copy at the same relative path under ``{tmp}``: the recipe with
    the prefixes substituted, its ``model`` section replaced by the one in the ``config.yaml`` that
    ``convert hf-to-mcore`` wrote (the tiny CLIP + LLaMA, ``model.dtype=fp32`` on CPU), and ``train.steps=2``,
    ``train.micro_batch=1``, ``train.global_batch=2 × data-parallel size`` (2 micro-batches per rank),
    ``train.warmup_steps=0``, ``data.max_seq_len=96`` (4 image tokens + the longest text), ``data.eval_samples=0``.
    Everything else is the recipe's: stage, template, image mode, LR schedule, ``checkpoint.load`` /
    ``checkpoint.finetune`` and the parallel layout (stage 2: TP=2 with sequence parallelism and the distributed
    optimizer, the tiny model's 4 heads / 2 KV heads divide by 2); the checkpoint is saved at the end of the run
    (``checkpoint.save_interval`` 500 > 2 steps).

  Checked: every command exits 0; the converted checkpoint, tokenizer and config exist; each shards summary kept
  records; inspect finds no sample without supervised tokens; plan says the recipe's layout fits; stage 1 changed
  the projector only (tensors compared with the checkpoint it loaded), stage 2 loaded stage 1's newest checkpoint
  as a finetune (weights only, step 0), changed the LLM and not the vision encoder, with finite losses; the HF
  export loads with transformers' LlavaForConditionalGeneration and holds stage 2's weights; generate prints an
  answer, and with ``--output json`` at least one token.
- "Quick start" (`make demo`, `make test`) is not run: `make test` is this test suite, and `make demo` takes ~8
  minutes. The Makefile must have the targets, `make -n demo` must be the train (2 ranks) + eval of
  configs/demo.yaml (whose config checks pass for 2 ranks here), and `make -n test` must run pytest on tests/.
  tests/training/test_demo.py trains and evaluates the same model family on 2 ranks (PP=2) for 30 steps.
- "Many nodes, Slurm": the `launch/torchrun.sh` line runs as written (executable script) with MEGAVLM_DRY_RUN=1, for
  its NODE_RANK and for the other node, and prints the two-node torchrun command; `sbatch` runs launch/slurm.sbatch
  under a fake srun/scontrol (tests/runtime/test_multinode.py's) as a 2-node allocation, dry run. The real
  two-"node" training is tests/runtime/test_multinode.py::test_two_nodes_equal_one_node.
- "Container": no Docker engine. The build context has the Dockerfile; the `docker run` line's inner command parses
  as torchrun + `megavlm train` of a recipe in the image's checkout, and the recipe's absolute paths lie under the
  mounted volumes. tests/test_dockerfile.py checks the Dockerfile itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import socket
import stat
import subprocess
import sys

import pytest
from helpers import ROOT, _env, checkpoint_tensors

README = os.path.join(ROOT, "README.md")
PREFIXES = ("/checkpoints/", "/data/llava/")
NPROC = 2  # ranks on this machine instead of the README's --nproc-per-node 8
TINY_SEQ = 96
# `megavlm` sub-commands the pipeline knows how to check ("train" also comes through torchrun)
PIPELINE_STEPS = {("convert", "hf-to-mcore"), ("data", "convert"), ("data", "inspect"), ("plan",), ("train",),
                  ("convert", "mcore-to-hf"), ("generate",)}
MAKE_TARGETS = {"demo", "test"}


# ----------------------------------------------------------------------------------------------------------------
# README parsing
# ----------------------------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def bash_blocks(path: str = README) -> list[tuple[str, list[str]]]:
    """(section heading, commands) of every ```bash block: continuation lines joined, comment lines dropped."""
    blocks, heading, cmds, inside, cur = [], "", [], False, ""
    for line in _read(path).splitlines():
        s = line.strip()
        if not inside:
            if s.startswith("#") and not s.startswith("```"):
                heading = s.lstrip("#").strip() if line.startswith("#") else heading
            if s == "```bash":
                inside, cmds, cur = True, [], ""
            continue
        if s.startswith("```"):
            assert not cur, f"README block under {heading!r} ends inside a continued command: {cur!r}"
            blocks.append((heading, cmds))
            inside = False
            continue
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1].strip() + " "
            continue
        cmds.append(cur + s)
        cur = ""
    assert not inside, "README.md has an unterminated ```bash block"
    return blocks


def words(cmd: str) -> list[str]:
    return shlex.split(cmd, comments=True)


def split_env(ws: list[str]) -> tuple[dict, list[str]]:
    env, i = {}, 0
    while i < len(ws) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", ws[i]):
        k, _, v = ws[i].partition("=")
        env[k] = v
        i += 1
    return env, ws[i:]


def megavlm_command(ws: list[str]) -> tuple[str, ...] | None:
    """The `megavlm` sub-command of a `megavlm ...` or `torchrun ... -m megavlm ...` command."""
    if ws[0] == "megavlm":
        rest = ws[1:]
    elif ws[0] == "torchrun" and "-m" in ws and ws[ws.index("-m") + 1:ws.index("-m") + 2] == ["megavlm"]:
        rest = ws[ws.index("-m") + 2:]
    else:
        return None
    if rest[:1] in (["convert"], ["data"]):
        return tuple(rest[:2])
    return tuple(rest[:1])


def kind(cmd: str) -> str | None:
    env, ws = split_env(words(cmd))
    if not ws:
        return None
    if ws[0] == "make" and len(ws) == 2 and not env:
        return "make"
    if ws[0] in ("megavlm", "torchrun") and not env:
        return "pipeline" if megavlm_command(ws) else None
    if ws[0] == "launch/torchrun.sh":
        return "launch"
    if ws[0] == "sbatch" and "launch/slurm.sbatch" in ws and not env:
        return "sbatch"
    if ws[:2] in (["docker", "build"], ["docker", "run"]) and not env:
        return "docker"
    return None


def blocks_of(*kinds: str) -> list[list[str]]:
    """The README blocks made only of commands of these kinds."""
    out = [cmds for _, cmds in bash_blocks() if cmds and {kind(c) for c in cmds} <= set(kinds)]
    assert out, f"README.md has no ```bash block of {kinds} commands"
    return out


def test_every_readme_command_is_covered():
    """Each block is one of the kinds handled below; a new kind of README command must get a handler here."""
    blocks = bash_blocks()
    assert blocks, "no ```bash blocks found in README.md"
    pipelines = 0
    for heading, cmds in blocks:
        assert cmds, f"empty ```bash block under {heading!r}"
        kinds = {kind(c) for c in cmds}
        unknown = [c for c in cmds if kind(c) is None]
        assert not unknown, (f"README ```bash block under {heading!r} has commands tests/test_readme.py does not "
                             f"know how to run or check: {unknown}; add a handler there")
        groups = ({"make"}, {"pipeline"}, {"launch", "sbatch"}, {"docker"})
        assert any(kinds <= g for g in groups), (heading, kinds, "mixes command kinds handled separately")
        if kinds == {"pipeline"}:
            pipelines += 1
            for c in cmds:
                sub = megavlm_command(words(c))
                assert sub in PIPELINE_STEPS, (f"README command {c!r}: tests/test_readme.py has no tiny-scale check "
                                               f"for `megavlm {' '.join(sub)}`")
        for c in cmds:
            if kind(c) == "make":
                assert words(c)[1] in MAKE_TARGETS, f"README command {c!r}: no check for this make target"
    assert pipelines == 1, "the megavlm commands (the pipeline run in a fixture directory) must be in one block"


# ----------------------------------------------------------------------------------------------------------------
# Quick start: make demo / make test (not run; see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


def _make_n(target: str) -> list[list[str]]:
    # Under `make test` this runs inside make: drop the parent's MAKEFLAGS/MAKELEVEL (they add "make[1]: Entering
    # directory" lines) and ask for no directory lines anyway.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [words(line) for line in proc.stdout.splitlines() if line.strip()]
    # the `install` prerequisite's lines, printed when .venv/.installed is older than its inputs
    return [w for w in lines if "scripts/install.sh" not in w and w[:1] != ["touch"]]


def test_quick_start_make_targets():
    from megavlm.config import load_config, validate

    targets = {w[1] for cmds in blocks_of("make") for w in map(words, cmds)}
    makefile = _read(os.path.join(ROOT, "Makefile"))
    for t in targets:
        assert re.search(rf"^{t}:", makefile, re.MULTILINE), f"Makefile has no `{t}` target"
    if "demo" in targets:
        train, ev = _make_n("demo")
        assert train[0].endswith("torchrun") and train[-4:] == ["-m", "megavlm", "train", "configs/demo.yaml"], train
        nproc = int(train[train.index("--nproc-per-node") + 1])
        assert ev[0].endswith("megavlm") and ev[1:] == ["eval", "configs/demo.yaml"], ev
        cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"))
        validate(cfg, nproc)  # every config check of the demo run, for its world size
    if "test" in targets:
        *before, cmd = _make_n("test")
        assert cmd[1:4] == ["-m", "pytest", "-q"] and cmd[-1] == "tests", cmd
        assert any(c[1:4] == ["-m", "ruff", "check"] for c in before), before  # the lint runs first


# ----------------------------------------------------------------------------------------------------------------
# Many nodes, Slurm
# ----------------------------------------------------------------------------------------------------------------


def _multinode():
    """tests/runtime/test_multinode.py (its clean environment, fake srun/scontrol and flag helper)."""
    path = os.path.join(ROOT, "tests", "runtime", "test_multinode.py")
    spec = importlib.util.spec_from_file_location("_readme_multinode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tail(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("-m"):]


def test_launch_commands_dry_run(tmp_path):
    mn = _multinode()
    flag = mn.flag
    cmds = [c for cmds in blocks_of("launch", "sbatch") for c in cmds]
    launches = [c for c in cmds if kind(c) == "launch"]
    sbatches = [c for c in cmds if kind(c) == "sbatch"]
    assert launches or sbatches
    script = os.path.join(ROOT, "launch", "torchrun.sh")
    assert os.stat(script).st_mode & stat.S_IXUSR, "launch/torchrun.sh is not executable (README runs it directly)"
    for c in launches:
        env, ws = split_env(words(c))
        nnodes = int(env.get("NNODES", "1"))
        for rank in sorted({int(env.get("NODE_RANK", "0"))} | set(range(min(nnodes, 2)))):
            run_env = mn._clean_env(**{**env, "NODE_RANK": str(rank), "MEGAVLM_DRY_RUN": "1"})
            proc = subprocess.run(ws, cwd=ROOT, env=run_env, check=False, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, (c, proc.stderr)
            cmd = shlex.split(proc.stdout)
            assert cmd[0] == "torchrun", cmd
            assert _tail(cmd) == ["-m", "megavlm", "train", *ws[1:]], cmd
            if "NPROC_PER_NODE" in env:
                assert flag(cmd, "--nproc-per-node") == env["NPROC_PER_NODE"]
            if nnodes > 1:
                assert flag(cmd, "--nnodes") == str(nnodes) and flag(cmd, "--node-rank") == str(rank)
                assert flag(cmd, "--master-addr") == env["MASTER_ADDR"]
                assert flag(cmd, "--master-port") == env.get("MASTER_PORT", "29500")
                assert f"node {rank}/{nnodes}" in proc.stderr
            _parse_megavlm(_tail(cmd)[2:])
    for c in sbatches:
        ws = words(c)
        opts = dict(o.lstrip("-").split("=", 1) for o in ws[1:ws.index("launch/slurm.sbatch")] if "=" in o)
        nodes = int(opts.get("nodes", "1"))
        args = ws[ws.index("launch/slurm.sbatch") + 1:]
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        mn._executable(bin_dir / "srun", mn.FAKE_SRUN)
        mn._executable(bin_dir / "scontrol", mn.FAKE_SCONTROL)
        logs = tmp_path / "logs"
        env = mn._clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
                            SLURM_JOB_ID="4321", SLURM_JOB_NAME="megavlm", SLURM_JOB_NUM_NODES=str(nodes),
                            SLURM_JOB_NODELIST="gpu[07-08]", SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE="8",
                            LOG_DIR=str(logs), MEGAVLM_DRY_RUN="1")
        # what sbatch runs: the batch script, from the submit directory, with the allocation in SLURM_*
        proc = subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=ROOT, env=env, check=False,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (c, proc.stdout + proc.stderr)
        for rank in range(nodes):
            lines = (logs / f"node-{rank}.log").read_text().splitlines()
            cmd = shlex.split(next(line for line in lines if not line.startswith("[launch]")))
            assert flag(cmd, "--nnodes") == str(nodes) and flag(cmd, "--node-rank") == str(rank), cmd
            assert flag(cmd, "--master-addr") == "gpu07", cmd
            assert _tail(cmd) == ["-m", "megavlm", "train", *args], cmd


def _parse_megavlm(argv: list[str]):
    """argparse of `megavlm ARGV` (runs nothing); the config file must be in the checkout."""
    from megavlm.cli import _parser

    args = _parser().parse_args(argv)
    if args.command == "train":
        assert os.path.isfile(os.path.join(ROOT, args.config)), args.config
    return args


# ----------------------------------------------------------------------------------------------------------------
# Container (no Docker engine)
# ----------------------------------------------------------------------------------------------------------------

_DOCKER_RUN_VALUE_OPTS = {"-v", "--volume", "-e", "--env", "--gpus", "--ipc", "-w", "--workdir", "--name", "-u",
                          "--user", "--shm-size", "--network", "--entrypoint", "--env-file", "--mount", "-p"}


def test_container_commands():
    import yaml
    from torch.distributed.run import get_args_parser

    tags = set()
    for c in (c for cmds in blocks_of("docker") for c in cmds):
        ws = words(c)
        if ws[1] == "build":
            tag = ws[ws.index("-t") + 1]
            context = ws[-1]
            assert os.path.isfile(os.path.join(ROOT, context, "Dockerfile")), c
            tags.add(tag)
            continue
        i, mounts = 2, []
        while ws[i].startswith("-"):
            opt = ws[i]
            val = None
            if "=" in opt:
                opt, val = opt.split("=", 1)
            elif opt in _DOCKER_RUN_VALUE_OPTS:
                i += 1
                val = ws[i]
            if opt in ("-v", "--volume"):
                mounts.append(val.split(":")[1])
            i += 1
        image, inner = ws[i], ws[i + 1:]
        assert image in tags, f"{c!r}: runs image {image!r}, which no README `docker build -t` makes"
        assert inner[0] == "torchrun", inner
        targs = get_args_parser().parse_args(inner[1:])
        assert targs.module and targs.training_script == "megavlm", inner
        args = _parse_megavlm(targs.training_script_args)
        assert args.command == "train"
        # the recipe's absolute paths (data, tokenizer, initial checkpoint) must be visible inside the container
        cfg = yaml.safe_load(_read(os.path.join(ROOT, args.config)))
        for section, key in (("data", "shards"), ("data", "tokenizer"), ("checkpoint", "load"), ("", "run_dir")):
            v = cfg.get(section, {}).get(key) if section else cfg.get(key)
            if isinstance(v, str) and v.startswith("/"):
                assert any(v == m or v.startswith(m.rstrip("/") + "/") for m in mounts), (
                    f"{c!r}: {section}.{key}={v} is not under a mounted volume {mounts}")


# ----------------------------------------------------------------------------------------------------------------
# A real LLaVA-1.5 run, at tiny scale
# ----------------------------------------------------------------------------------------------------------------


def _sub_prefixes(text: str, tmp: str) -> str:
    for p in PREFIXES:
        text = re.sub(rf"(?<![\w./-]){re.escape(p)}", lambda _m, p=p: tmp + p, text)
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve_ckpt(path: str) -> str:
    """An iter_* folder from an iter_* folder, a checkpoints folder, a run dir or an hf-to-mcore output."""
    for d in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(d, "latest")
        if os.path.isfile(latest):
            return os.path.join(d, _read(latest).strip())
    assert os.path.isfile(os.path.join(path, ".metadata")), f"no checkpoint at {path}"
    return path


def _groups(path: str) -> dict[str, dict]:
    import torch

    out = {"vision_model": {}, "projector": {}, "language_model": {}}
    for k, v in checkpoint_tensors(path).items():
        g = k.split(".", 1)[0]
        if g in out and isinstance(v, torch.Tensor) and "_extra_state" not in k:
            out[g][k] = v
    assert all(out.values()), {g: len(v) for g, v in out.items()}
    return out


def _compare(before: str, after: str) -> dict[str, tuple[int, int]]:
    """Per part of the model: (tensors changed, tensors) between two checkpoints."""
    import torch

    a, b = _groups(before), _groups(after)
    res = {}
    for g in a:
        assert a[g].keys() == b[g].keys(), g
        res[g] = (sum(not torch.equal(a[g][k], b[g][k]) for k in a[g]), len(a[g]))
    return res


def _tiny_train_config(recipe: str, dest: str, tmp: str, model: dict, nproc: int) -> dict:
    import yaml

    from megavlm.config import _yaml_load

    cfg = _yaml_load(_sub_prefixes(_read(recipe), tmp))
    cfg["model"] = dict(model, dtype="fp32")
    p = cfg["parallel"]
    dp = nproc // (p["tp"] * p["pp"])
    cfg["train"].update(steps=2, micro_batch=1, global_batch=2 * dp, warmup_steps=0)
    cfg["data"].update(max_seq_len=TINY_SEQ, eval_samples=0)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return cfg


class Pipeline:
    def __init__(self, tmp: str):
        self.tmp = tmp
        self.env = _env()
        self.init_model = None  # the model section of hf-to-mcore's config.yaml
        self.last_train = None  # (run dir's newest checkpoint)
        self.log = []

    def run(self, argv: list[str], what: str, torchrun: bool = False) -> subprocess.CompletedProcess:
        env = dict(self.env, PET_MASTER_PORT=str(_free_port())) if torchrun else self.env
        proc = subprocess.run(argv, cwd=self.tmp, env=env, check=False, capture_output=True, text=True, timeout=600)
        self.log.append(what)
        assert proc.returncode == 0, (f"README command failed ({proc.returncode}): {what}\nran: {shlex.join(argv)}\n"
                                      f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def command(self, cmd: str) -> None:
        ws = [_sub_prefixes(w, self.tmp) for w in words(cmd)]
        sub = megavlm_command(ws)
        if ws[0] == "torchrun":
            i = ws.index("--nproc-per-node") if "--nproc-per-node" in ws else None
            assert i is not None, f"{cmd!r}: no --nproc-per-node"
            ws[i + 1] = str(NPROC)
            nproc = NPROC
            argv = [sys.executable, "-m", "torch.distributed.run"] + ws[1:]
            margs = ws[ws.index("-m") + 2:]
        else:
            nproc = 1
            argv = [sys.executable, "-m", "megavlm"] + ws[1:]
            margs = ws[1:]
        handler = {("convert", "hf-to-mcore"): self.hf_to_mcore, ("data", "convert"): self.data_convert,
                   ("data", "inspect"): self.data_inspect, ("plan",): self.plan, ("train",): self.train,
                   ("convert", "mcore-to-hf"): self.mcore_to_hf, ("generate",): self.generate}[sub]
        handler(cmd, argv, margs, nproc)

    # --- the steps ---------------------------------------------------------------------------------------------

    def hf_to_mcore(self, cmd, argv, margs, nproc):
        import yaml

        self.run(argv, cmd)
        out = os.path.join(self.tmp, margs[margs.index("--out") + 1])
        assert os.path.isfile(os.path.join(_resolve_ckpt(out), ".metadata")), out
        assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json")), out
        self.init_model = yaml.safe_load(_read(os.path.join(out, "config.yaml")))["model"]

    def data_convert(self, cmd, argv, margs, nproc):
        self.run(argv, cmd)
        out = os.path.join(self.tmp, margs[margs.index("--out") + 1])
        summary = json.loads(_read(os.path.join(out, "summary.json")))
        assert summary["kept"] > 0 and summary["kept"] == summary["records"], summary

    def data_inspect(self, cmd, argv, margs, nproc):
        proc = self.run(argv, cmd)
        assert "without supervised tokens: 0 (0.0%)" in proc.stdout, proc.stdout[-3000:]
        n = int(margs[margs.index("-n") + 1]) if "-n" in margs else 1
        assert proc.stdout.count("--- ") >= n, proc.stdout[-3000:]

    def plan(self, cmd, argv, margs, nproc):
        config = margs[1]
        dest = os.path.join(self.tmp, config)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w") as f:  # the real recipe, prefixes substituted
            f.write(_sub_prefixes(_read(os.path.join(ROOT, config)), self.tmp))
        proc = self.run(argv, cmd)
        assert "-> peak" in proc.stdout and ": fits in" in proc.stdout, proc.stdout[-3000:]
        assert "layouts that fit" in proc.stdout, proc.stdout[-3000:]

    def train(self, cmd, argv, margs, nproc):
        import yaml

        assert self.init_model is not None, "a train command before `convert hf-to-mcore`"
        config = margs[1]
        cfg = _tiny_train_config(os.path.join(ROOT, config), os.path.join(self.tmp, config), self.tmp,
                                 self.init_model, nproc)
        for o in margs[2:]:  # overrides on the README command line are passed through; record the ones we read
            k, _, v = o.partition("=")
            sec, _, key = k.partition(".")
            if key:
                cfg[sec][key] = yaml.safe_load(v)
            else:
                cfg[sec] = yaml.safe_load(v)
        load = os.path.join(self.tmp, cfg["checkpoint"]["load"])
        loaded = _resolve_ckpt(load)
        if self.last_train is not None:
            assert loaded == self.last_train, f"{cmd!r} loads {loaded}, not the previous stage's {self.last_train}"
        proc = self.run(argv, cmd, torchrun=nproc > 1)
        run_dir = os.path.join(self.tmp, cfg["run_dir"])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            ms = [json.loads(line) for line in f]
        assert [m["step"] for m in ms] == [1, 2], ms
        assert all(math.isfinite(m["loss"]) for m in ms), ms
        if cfg["checkpoint"]["finetune"]:
            assert "weights (finetune: fresh optimizer, step 0)" in proc.stdout, proc.stdout[-3000:]
        saved = _resolve_ckpt(run_dir)
        assert saved.endswith("iter_0000002"), saved
        changed = _compare(loaded, saved)
        stage = cfg["train"]["stage"]
        trained = {1: {"projector"}, 2: {"projector", "language_model"}, 3: set(changed)}[stage]
        for part, (n, total) in changed.items():
            if part in trained:
                assert n > 0, (f"stage {stage}: {part} did not change", changed)
            else:
                assert n == 0, (f"stage {stage}: frozen {part} changed", changed)
        assert changed["projector"][0] == changed["projector"][1], changed  # every projector tensor trained
        self.last_train = saved

    def mcore_to_hf(self, cmd, argv, margs, nproc):
        import torch
        from transformers import LlavaForConditionalGeneration

        self.run(argv, cmd)
        out = os.path.join(self.tmp, margs[margs.index("--out") + 1])
        ckpt = _resolve_ckpt(os.path.join(self.tmp, margs[margs.index("--ckpt") + 1]))
        model = LlavaForConditionalGeneration.from_pretrained(out)
        sd = model.state_dict()
        (norm,) = [k for k in sd if k.endswith("norm.weight") and "language_model" in k and "layers" not in k]
        want = _groups(ckpt)["language_model"]["language_model.decoder.final_layernorm.weight"]
        assert torch.equal(sd[norm].float(), want.float()), "the export does not hold the checkpoint's weights"

    def generate(self, cmd, argv, margs, nproc):
        proc = self.run(argv, cmd)
        answer = proc.stdout.strip()
        assert answer and len(answer.splitlines()) == 1, proc.stdout
        assert "new tokens" in proc.stderr, proc.stderr[-2000:]
        if "--output" not in margs:
            proc = self.run(argv + ["--output", "json"], cmd + " --output json")
            result = json.loads(proc.stdout)
            assert result["new_tokens"] >= 1 and len(result["generated_ids"]) == result["new_tokens"], result
            assert result["text"].strip() == answer, (result["text"], answer)


@pytest.mark.slow
@pytest.mark.distributed
def test_llava_run_at_tiny_scale(tmp_path):
    import readme_fixtures

    (cmds,) = blocks_of("pipeline")
    tmp = str(tmp_path)
    readme_fixtures.make_all(tmp)
    pipe = Pipeline(tmp)
    for c in cmds:
        pipe.command(c)
    subs = [megavlm_command(words(c)) for c in cmds]
    assert ("train",) in subs and ("convert", "hf-to-mcore") in subs, subs
