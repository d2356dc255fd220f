"""Checkpoints and run bookkeeping (issue 15, items 1-6, 12-14): nothing lost, nothing corrupt or crafted loaded,
nothing written before the checks pass, nothing left running. One process, in-process Trainer runs of the tiny
config (4 steps make the checkpoints the tests copy and damage)."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from helpers import TINY
from megavlm.config import ConfigError, load_config, validate
from megavlm.errors import UserError
from megavlm.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _cfg(run_dir, shards, *overrides):
    return load_config(TINY, [f"run_dir={run_dir}", f"data.shards={shards}", "data.num_samples=64",
                              "logging.tensorboard=false", "train.warmup_steps=2", *overrides])


def _train(run_dir, shards, *overrides) -> dict:
    from megavlm.training.trainer import Trainer

    return Trainer(_cfg(run_dir, shards, *overrides)).run()


def _metrics(run_dir) -> list[dict]:
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _snapshot(root) -> dict:
    """Every file under ``root`` with its size and modification time (what "nothing was written" compares)."""
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def run4(rt, shards, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (``latest`` → iter_0000004)."""
    run_dir = str(tmp_path_factory.mktemp("run4"))
    _train(run_dir, shards, "train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep=0")
    return run_dir


@pytest.fixture
def run(run4, tmp_path):
    """A copy of ``run4`` to damage."""
    dst = str(tmp_path / "run")
    shutil.copytree(run4, dst)
    return dst


def _ck(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"iter_{step:07d}")


# --------------------------------------------------------------------------------------
# 1. pruning deletes only this run's checkpoints
# --------------------------------------------------------------------------------------


def test_pruning_keeps_another_runs_checkpoints(run, shards, capsys):
    ck = os.path.join(run, "checkpoints")
    os.rename(_ck(run, 2), _ck(run, 25))  # an earlier run that got further
    os.rename(_ck(run, 4), _ck(run, 30))
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("iter_0000030\n")
    _train(run, shards, "train.steps=7", "checkpoint.save_interval=5", "checkpoint.keep=1")
    out = capsys.readouterr().out
    assert "a new run starts at step 1" in out and "iter_0000025" in out and "checkpoint.load=auto" in out
    # keep=1 pruned this run's iter_5, kept its iter_7, and never touched the earlier run's two
    assert sorted(os.listdir(ck)) == ["iter_0000007", "iter_0000025", "iter_0000030", "latest"]
    assert ckpt.find_checkpoint(run) == _ck(run, 7)
    assert [m["step"] for m in _metrics(run)] == list(range(1, 8))


def test_resumed_run_prunes_its_own_earlier_checkpoints(run, shards):
    _train(run, shards, "train.steps=6", "checkpoint.save_interval=2", "checkpoint.keep=2", "checkpoint.load=auto")
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["iter_0000004", "iter_0000006", "latest"]


# --------------------------------------------------------------------------------------
# 2. a broken `latest` never restarts the run silently
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer,said", [(None, "is missing"), (b"", "is empty"), (b"\xff\xfe\x00iter", "not UTF-8"),
                                          (b"iter_0000009\n", "names iter_0000009, which does not exist")])
def test_broken_latest_resumes_from_the_newest_checkpoint(run, shards, capsys, pointer, said):
    latest = os.path.join(run, "checkpoints", "latest")
    os.remove(latest)
    if pointer is not None:
        with open(latest, "wb") as f:
            f.write(pointer)
    before = _metrics(run)
    out = _train(run, shards, "train.steps=5", "checkpoint.load=auto")
    printed = capsys.readouterr().out
    assert said in printed and f"resuming from the newest checkpoint there, {_ck(run, 4)}" in printed
    assert out["start_step"] == 4
    after = _metrics(run)
    assert after[:4] == before and [m["step"] for m in after] == [1, 2, 3, 4, 5]


def test_broken_latest_with_checkpoints_of_two_runs_is_an_error(run):
    import json

    manifest = os.path.join(_ck(run, 2), "integrity.json")
    with open(manifest) as f:
        data = json.load(f)
    data["megavlm"]["run_id"] = "another-run"
    with open(manifest, "w") as f:
        json.dump(data, f)
    os.remove(os.path.join(run, "checkpoints", "latest"))
    with pytest.raises(UserError, match="come from 2 different runs.*checkpoint.load=PATH"):
        ckpt.resolve_load_path("auto", os.path.join(run, "checkpoints"), [])


# --------------------------------------------------------------------------------------
# 3. torn checkpoints: one clear error, naming the file and the previous complete checkpoint; nothing touched
# --------------------------------------------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage,named", [
    (lambda p: _truncate(os.path.join(p, "__0_0.distcp")), r"__0_0.distcp is truncated \(\d+ of \d+ bytes\)"),
    (lambda p: os.remove(os.path.join(p, "__0_0.distcp")), "__0_0.distcp is missing"),
    (lambda p: os.remove(os.path.join(p, ".metadata")), r"\.metadata is missing"),
    (lambda p: os.remove(os.path.join(p, "metadata.json")), "metadata.json is missing"),
    (lambda p: os.remove(os.path.join(p, "integrity.json")), "integrity.json is missing"),
])
def test_torn_checkpoint_is_refused_before_anything_is_written(run, shards, damage, named):
    from megavlm.training.trainer import Trainer

    damage(_ck(run, 4))
    before = _snapshot(run)
    with pytest.raises(UserError, match=named) as e:
        Trainer(_cfg(run, shards, "train.steps=6", "checkpoint.load=auto"))
    assert e.value.all_ranks
    assert f"the previous complete checkpoint is {_ck(run, 2)}" in str(e.value)
    assert _snapshot(run) == before  # metrics.jsonl, config.yaml, tokenizer, checkpoints: all as they were


def test_torn_checkpoint_cli_prints_one_error_line(run):
    import subprocess
    import sys

    from helpers import ROOT, _env

    os.remove(os.path.join(_ck(run, 4), "__0_0.distcp"))
    env = {k: v for k, v in _env().items() if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "megavlm", "train", TINY, f"run_dir={run}", "checkpoint.load=auto",
                           "train.steps=6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and "__0_0.distcp is missing" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------------------
# 4. checksums: corrupt bytes are found before loading
# --------------------------------------------------------------------------------------


def _flip(path, n=64):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def test_corrupt_bytes_are_refused(run, shards):
    from megavlm.training.trainer import Trainer

    _flip(os.path.join(_ck(run, 4), "__0_0.distcp"))
    before = _snapshot(run)
    with pytest.raises(UserError, match=r"__0_0.distcp does not match its checksum in integrity.json") as e:
        Trainer(_cfg(run, shards, "train.steps=6", "checkpoint.load=auto"))
    assert f"the previous complete checkpoint is {_ck(run, 2)}" in str(e.value)
    assert _snapshot(run) == before


def test_corrupt_bytes_are_refused_by_generate_and_convert(run, tmp_path):
    """The inference load (generate, eval) and the convert reader check the checksums too."""
    from megavlm.convert import engine
    from megavlm.inference.command import Request
    from megavlm.inference.command import run as generate

    _flip(os.path.join(_ck(run, 4), "__0_0.distcp"))
    with pytest.raises(UserError, match="does not match its checksum"):
        generate(Request(ckpt=run, prompt="what colour?", max_new_tokens=2))
    with pytest.raises(UserError, match="does not match its checksum"):
        engine.mcore_to_hf(run, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_manifest_is_megatrons_integrity_format(run):
    """megatron-core's own verifier (dist_checkpointing.load(..., verify_integrity=True)) reads our manifest."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import verify_integrity_manifest

    verify_integrity_manifest(_ck(run, 4))  # passes on an intact checkpoint
    _flip(os.path.join(_ck(run, 4), "__0_0.distcp"))
    with pytest.raises(CheckpointingException, match="hash mismatch"):
        verify_integrity_manifest(_ck(run, 4))


# --------------------------------------------------------------------------------------
# 5. untrusted checkpoints: our state is not pickled, pickles are refused or read weights-only
# --------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(path):
    """What an attacker does after editing a file: a manifest that matches (when there is one)."""
    import hashlib
    import json

    file = os.path.join(path, "integrity.json")
    if not os.path.exists(file):
        return
    with open(file) as f:
        manifest = json.load(f)
    for name in manifest["files"]:
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        manifest["files"][name], manifest["sizes"][name] = hashlib.sha256(data).hexdigest(), len(data)
    with open(file, "w") as f:
        json.dump(manifest, f)


def test_crafted_metadata_is_refused_not_run(run, tmp_path):
    marker = tmp_path / "pwned"
    path = _ck(run, 4)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    _rehash(path)
    with pytest.raises(UserError, match=r"refusing to load .*\.metadata: it calls (posix|os)\.system"):
        ckpt.load_common(path)
    with pytest.raises(UserError, match="refusing to load"):
        ckpt.verify(path)
    assert not marker.exists()


def test_crafted_common_state_and_extra_state_are_not_unpickled(rt, run, tmp_path):
    """A checkpoint whose common state and model ``_extra_state`` items hold a payload: the common state is read with
    weights_only=True (refused), the extra states of our layers (None in the live model) are not read at all."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megavlm import families
    from megavlm.data.constants import image_token_id
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.models.vlm import build_model

    marker = tmp_path / "pwned"
    cfg = ckpt.saved_config(_ck(run, 4))
    image_token = image_token_id(load_tokenizer(None), families.of(cfg).image_token)
    model = build_model(cfg, rt, cfg.model.language.vocab_size, image_token)
    sd = model.sharded_state_dict()
    extra = [k for k, v in sd.items() if isinstance(v, ShardedObject) and k.endswith("_extra_state")]
    assert extra
    for k in extra:
        sd[k] = ShardedObject(sd[k].key, _Payload(marker), sd[k].global_shape, sd[k].global_offset,
                              replica_id=sd[k].replica_id)
    common = {"config": ckpt.load_common(_ck(run, 4))["config"], "format_version": 1}
    crafted = str(tmp_path / "crafted")
    os.makedirs(crafted)
    dist_checkpointing.save({"model": sd, "common": common}, crafted)
    ckpt.load(crafted, model, same_layout=False)  # weights load; the extra states are not unpickled
    assert not marker.exists()

    evil = str(tmp_path / "evil_common")
    os.makedirs(evil)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "common": dict(common, x=_Payload(marker))}, evil)
    with pytest.raises(UserError, match="holds objects other than plain data and tensors"):
        ckpt.load_common(evil)
    assert not marker.exists()


def test_rng_and_data_position_are_not_pickled(run4):
    """A checkpoint's only pickled items are megatron's common state and the layers' extra states; our RNG states and
    data position are uint8 tensors."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = FileSystemReader(_ck(run4, 4)).read_metadata().state_dict_metadata  # our own file: plain pickle is fine
    pickled = sorted(k.split("/")[0] for k, v in md.items() if isinstance(v, BytesStorageMetadata))
    assert all(k == "common_state" or k.endswith("._extra_state") for k in pickled), pickled
    assert isinstance(md.get("rng_blob"), TensorStorageMetadata), sorted(md)[-5:]
    assert isinstance(md.get("data_blob"), TensorStorageMetadata), sorted(md)[-5:]


def test_pack_round_trip():
    state = {"a": [1, 2.5, None, True, "x"], "t": (torch.arange(5), torch.zeros(2, 3, dtype=torch.bfloat16)),
             "b": b"\x00\xffdali", "e": torch.empty(0, dtype=torch.int64), "n": {"k": torch.tensor(True)}}
    back = ckpt.unpack(ckpt.pack(state))
    assert back["a"] == state["a"] and back["b"] == state["b"] and isinstance(back["t"], tuple)
    assert torch.equal(back["t"][0], state["t"][0]) and back["t"][1].dtype == torch.bfloat16
    assert back["e"].shape == (0,) and back["n"]["k"].item() is True
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.pack({"x": object()})


def test_format_1_checkpoint_still_loads_and_resumes_identically(rt, shards, tmp_path):
    """A checkpoint written by the code before format 2 (pickled RNG and data position, no manifest) resumes exactly
    like the format-2 checkpoint of the same state."""
    from legacy_checkpoint import save_v1

    from megavlm.config import to_dict
    from megavlm.training.trainer import Trainer

    src = str(tmp_path / "src")
    t = Trainer(_cfg(src, shards, "train.steps=2"))
    t.resume()
    for step in (1, 2):
        t.step(step)
    common = {"scheduler": t.scheduler.state_dict(), "consumed_samples": 16,
              "layout": {"tp": 1, "pp": 1, "dp": 1, "distributed_optimizer": False, "first_stage_layers": None},
              "config": to_dict(t.cfg)}
    v1 = save_v1(str(tmp_path / "v1"), 2, t.model, t.optimizer, common, data_state=t.data.state_dict())
    t.save(2)
    v2 = _ck(src, 2)
    losses = {}
    for name, path in (("v1", v1), ("v2", v2)):
        out = _train(str(tmp_path / f"from_{name}"), shards, "train.steps=4", f"checkpoint.load={path}")
        assert out["start_step"] == 2
        losses[name] = out["losses"]
    assert losses["v1"] == losses["v2"]


def test_help_says_checkpoints_must_be_trusted():
    from megavlm.cli import _parser

    p = _parser()
    subs = next(a for a in p._actions if a.dest == "command").choices
    for cmd in ("train", "generate", "convert", "eval"):
        assert "trusted source" in " ".join(subs[cmd].format_help().split()), cmd


# --------------------------------------------------------------------------------------
# 6. no helper process outlives a save
# --------------------------------------------------------------------------------------


def test_saving_starts_no_helper_process(run4):
    """megatron's writer keeps its results in a multiprocessing Manager (a ~275 MB process per rank that survives a
    killed rank); after the saves of ``run4`` this process has no child but multiprocessing's resource tracker (the
    synthetic shards' writer pool starts it; it reads a pipe only its parent holds, so it exits with it)."""
    import psutil

    assert os.path.isdir(_ck(run4, 4))
    children = [" ".join(c.cmdline()) for c in psutil.Process().children(recursive=True)]
    assert [c for c in children if "multiprocessing.resource_tracker" not in c] == []


# --------------------------------------------------------------------------------------
# 12. non-finite learning rate, loss or gradient norm
# --------------------------------------------------------------------------------------


def test_non_finite_lr_is_a_config_error():
    for lr in ("inf", "nan", "-inf"):
        with pytest.raises(ConfigError, match="train.lr"):
            validate(load_config(TINY, [f"train.lr={lr}"]), 1)  # what `megavlm train` runs first


def test_diverging_loss_stops_before_saving(rt, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"step \d+: the (loss|gradient norm) is (nan|inf).*training diverged") as e:
        _train(run_dir, shards, "train.steps=6", "train.lr=1e30", "train.clip_grad=0", "train.warmup_steps=0")
    assert e.value.all_ranks and "No checkpoint was saved" in str(e.value)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


# --------------------------------------------------------------------------------------
# 13 (vocabulary) and 14: refused before anything is written
# --------------------------------------------------------------------------------------


def test_vocab_smaller_than_tokenizer_is_refused_before_writing(rt, shards, tmp_path):
    from megavlm.training.trainer import Trainer

    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"model.language.vocab_size=10 is smaller than the tokenizer's \d+ tokens"):
        Trainer(_cfg(run_dir, shards, "model.language.vocab_size=10"))
    assert not run_dir.exists()


def test_missing_load_path_is_refused_before_writing(rt, shards, tmp_path):
    from megavlm.training.trainer import Trainer

    run_dir, own_shards = tmp_path / "run", tmp_path / "run" / "shards"
    with pytest.raises(UserError, match="checkpoint.load=/nonexistent/ckpt: no checkpoint there"):
        Trainer(load_config(TINY, [f"run_dir={run_dir}", "checkpoint.load=/nonexistent/ckpt"]))
    assert not run_dir.exists() and not own_shards.exists()

