"""Unit tests for megavlm.config (fast, no torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megavlm.config import (
    Config,
    ConfigError,
    check_paths,
    load_config,
    save_config,
    to_dict,
    to_yaml,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


# ------------------------------------------------------------------ defaults / files


def test_defaults_validate_at_world_size_one():
    cfg = load_config(None)
    assert cfg == Config()
    assert validate(cfg, 1) == 1


def test_tiny_cpu_yaml_loads_and_validates():
    cfg = load_config(str(TINY))
    assert cfg.run_dir == "runs/tiny_cpu"
    assert cfg.train.steps == 30 and cfg.train.warmup_steps == 5 and cfg.train.stage == 2
    assert cfg.train.global_batch == 8 and cfg.train.micro_batch == 2
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.num_samples == 512 and cfg.data.max_seq_len == 48
    assert cfg.model.vision.image_size == 32 and cfg.model.vision.patch_size == 8
    assert cfg.model.language.ffn_hidden_size == 352
    assert cfg.logging.tensorboard is True
    assert validate(cfg, 1) == 1
    assert validate(cfg, 4) == 4  # dp=4 with global 8 / micro 2


def test_yaml_file_partial_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        textwrap.dedent(
            """
            run_dir: runs/x
            model:
              vision:
                hidden_size: 32
              language:
                num_layers: 4
            train:
              lr: 1e-4          # YAML-1.1 would make this a string
              warmup_steps: 2
            parallel:
            """
        )
    )
    cfg = load_config(str(p))
    assert cfg.run_dir == "runs/x"
    assert cfg.model.vision.hidden_size == 32
    assert cfg.model.vision.num_layers == 2  # untouched default
    assert cfg.model.language.num_layers == 4
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_steps == 2
    assert cfg.parallel == Config().parallel  # empty section = defaults
    validate(cfg, 1)


def test_empty_yaml_file_is_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(str(p)) == Config()


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))


def test_yaml_section_as_scalar_is_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(str(p))


# ------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "override, getter, expected",
    [
        ("train.steps=100", lambda c: c.train.steps, 100),
        ("parallel.tp=2", lambda c: c.parallel.tp, 2),
        ("train.lr=1e-3", lambda c: c.train.lr, 1e-3),
        ("train.lr=0.5", lambda c: c.train.lr, 0.5),
        ("train.clip_grad=2", lambda c: c.train.clip_grad, 2.0),  # float accepts int
        ("train.steps=1e3", lambda c: c.train.steps, 1000),
        ("parallel.sequence_parallel=true", lambda c: c.parallel.sequence_parallel, True),
        ("logging.tensorboard=false", lambda c: c.logging.tensorboard, False),
        ("parallel.first_stage_layers=1", lambda c: c.parallel.first_stage_layers, 1),
        ("data.tokenizer=null", lambda c: c.data.tokenizer, None),
        ("data.tokenizer=/tmp/tok", lambda c: c.data.tokenizer, "/tmp/tok"),
        ("checkpoint.dir=null", lambda c: c.checkpoint.dir, None),
        ("checkpoint.load=auto", lambda c: c.checkpoint.load, "auto"),
        ("run_dir=007", lambda c: c.run_dir, "007"),  # string fields keep the text
        ("model.vision.image_mean=[0.5, 0.5, 0.5]", lambda c: c.model.vision.image_mean, [0.5] * 3),
        ("model.vision.image_std=[1,2,3]", lambda c: c.model.vision.image_std, [1.0, 2.0, 3.0]),
        ("model.vision={hidden_size: 32}", lambda c: c.model.vision.hidden_size, 32),
    ],
)
def test_override_types(override, getter, expected):
    cfg = load_config(None, [override])
    value = getter(cfg)
    assert value == expected
    assert type(value) is type(expected)


def test_override_applies_after_yaml_and_in_order():
    cfg = load_config(str(TINY), ["train.steps=7", "train.steps=9", "parallel.first_stage_layers=1"])
    assert cfg.train.steps == 9
    assert cfg.parallel.first_stage_layers == 1
    cfg = load_config(None, ["parallel.first_stage_layers=1", "parallel.first_stage_layers=null"])
    assert cfg.parallel.first_stage_layers is None


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("train.step=5", "train.steps"),
        ("train.stpes=5", "train.steps"),
        ("trian.steps=5", "train.steps"),
        ("model.tp=2", "parallel.tp"),
        ("model.vision.hiden_size=32", "model.vision.hidden_size"),
        ("model.langauge.num_heads=8", "model.language.num_heads"),
    ],
)
def test_unknown_override_key_suggests(override, suggestion):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert "unknown config key" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_yaml_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stpes: 10\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert "train.stpes" in str(ei.value)
    assert "did you mean 'train.steps'?" in str(ei.value)

    p.write_text("model:\n  language:\n    num_kv_head: 1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model\.language\.num_kv_heads'\?"):
        load_config(str(p))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps=abc", "train.steps='abc': expected int"),
        ("train.steps=1.5", "train.steps=1.5: expected int"),
        ("train.steps=true", "expected int"),
        ("train.steps=null", "expected int, got null"),
        ("train.lr=fast", "train.lr='fast': expected float"),
        ("parallel.sequence_parallel=3", "parallel.sequence_parallel=3: expected bool"),
        ("parallel.first_stage_layers=two", "expected int or null"),
        ("model.vision.image_mean=0.5", "model.vision.image_mean=0.5: expected list of float"),
        ("model.vision.image_mean=[0.5, x, 0.5]", "model.vision.image_mean[1]"),
        ("run_dir=null", "run_dir=None: expected str"),
        ("model.spec=[1]", "model.spec"),
    ],
)
def test_override_type_errors(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert needle in str(ei.value)


def test_yaml_type_error_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  max_seq_len: long\n")
    with pytest.raises(ConfigError, match=r"data\.max_seq_len='long': expected int"):
        load_config(str(p))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps", "dotted.key=value"),
        ("=5", "empty key"),
        ("train..steps=5", "empty key"),
        ("train=5", "'train' is a section"),
        ("model.vision=clip", "'model.vision' is a section"),
        ("train.steps.x=1", "not a section"),
    ],
)
def test_malformed_overrides(override, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    assert needle in str(ei.value)


# ------------------------------------------------------------------ round trip


def test_round_trip_save_load(tmp_path):
    cfg = load_config(
        str(TINY),
        [
            "train.lr=3e-4",
            "train.adam_eps=1e-8",
            "parallel.first_stage_layers=1",
            "data.tokenizer=/some/where",
            "model.vision.image_mean=[0.1, 0.2, 0.3]",
            "run_dir=007",
            "checkpoint.load=12",
        ],
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, str(path))
    back = load_config(str(path))
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert load_config(None) == Config()
    # to_yaml is what save_config writes
    assert to_yaml(cfg) in path.read_text()
    assert [f for f in os.listdir(path.parent) if f != "config.yaml"] == []  # no temp files


def test_to_dict_is_plain_nested():
    d = to_dict(Config())
    assert d["model"]["language"]["num_kv_heads"] == 2
    assert d["parallel"]["first_stage_layers"] is None
    assert isinstance(d["model"]["vision"]["image_mean"], list)


# ------------------------------------------------------------------ derived


def test_num_image_tokens():
    from megavlm import families

    cfg = Config()
    assert families.image_tokens(cfg) == 16
    cfg.model.vision.select_strategy = "full"
    assert families.image_tokens(cfg) == 17


def test_valid_parallel_layouts():
    base = ["model.language.num_layers=4", "train.global_batch=16"]
    assert validate(load_config(None, base + ["parallel.tp=2"]), 8) == 4
    assert validate(load_config(None, base + ["parallel.pp=2"]), 4) == 2
    assert validate(load_config(None, base + ["parallel.pp=4"]), 4) == 1
    cfg = load_config(None, base + ["parallel.pp=3", "parallel.first_stage_layers=2"])
    assert validate(cfg, 3) == 1
    cfg = load_config(None, base + ["parallel.tp=2", "parallel.sequence_parallel=true"])
    assert validate(cfg, 2) == 1


# ------------------------------------------------------------------ bad configs


BAD_CONFIGS = [
    # (id, overrides, world_size, substrings the message must contain)
    ("tp_not_dividing_heads", ["parallel.tp=3"], 3,
     ["parallel.tp=3", "model.language.num_heads=4", "valid tp values: 1, 2"]),
    ("tp_not_dividing_kv_heads", ["parallel.tp=4"], 4,
     ["parallel.tp=4", "model.language.num_kv_heads=2", "valid tp values"]),
    ("tp_not_dividing_vision_heads", ["model.vision.num_heads=2", "model.language.num_heads=8",
                                      "model.language.num_kv_heads=4", "parallel.tp=4"], 4,
     ["model.vision.num_heads=2", "valid tp values: 1, 2"]),
    ("kv_not_dividing_heads", ["model.language.num_kv_heads=3"], 1,
     ["model.language.num_kv_heads=3", "model.language.num_heads=4", "valid num_kv_heads: 1, 2, 4"]),
    ("hidden_not_dividing_heads", ["model.language.hidden_size=130"], 1,
     ["model.language.hidden_size=130", "model.language.num_heads=4"]),
    ("pp_too_large", ["parallel.pp=4"], 4,
     ["parallel.pp=4", "model.language.num_layers=2", "valid pp values: 1, 2"]),
    ("layers_not_divisible_by_pp", ["model.language.num_layers=3", "parallel.pp=2"], 2,
     ["model.language.num_layers=3", "parallel.pp=2", "parallel.first_stage_layers"]),
    ("global_batch_not_divisible", ["train.global_batch=10"], 2,
     ["train.global_batch=10", "dp=2", "train.global_batch=8 or 12"]),
    ("image_not_divisible_by_patch", ["model.vision.patch_size=5"], 1,
     ["model.vision.image_size=32", "model.vision.patch_size=5", "valid patch_size values: 1, 2, 4, 8, 16, 32"]),
    ("bad_stage", ["train.stage=4"], 1, ["train.stage=4", "1, 2, 3"]),
    ("world_not_tp_pp_dp", ["parallel.tp=2", "parallel.pp=2"], 6,
     ["world size 6", "parallel.tp*parallel.pp", "= 4", "dp would be 6/4 = 1.5", "4, 8, 12"]),
    ("world_smaller_than_tp_pp", ["parallel.tp=2"], 1, ["world size 1", "dp would be 1/2"]),
    ("first_stage_layers_without_pp", ["parallel.first_stage_layers=1"], 1,
     ["parallel.first_stage_layers=1", "requires parallel.pp > 1"]),
    ("first_stage_layers_too_big", ["parallel.pp=2", "parallel.first_stage_layers=2"], 2,
     ["parallel.first_stage_layers=2", "1..1", "valid parallel.first_stage_layers"]),
    ("first_stage_layers_uneven", ["model.language.num_layers=6", "parallel.pp=3",
                                   "parallel.first_stage_layers=3"], 3,
     ["parallel.first_stage_layers=3", "3 decoder layers", "2 pipeline stages",
      "num_layers=6: 2, 4"]),
    ("sequence_parallel_tp1", ["parallel.sequence_parallel=true"], 1,
     ["parallel.sequence_parallel", "parallel.tp > 1"]),
    ("bad_projector", ["model.projector.type=mlp3x"], 1,
     ["model.projector.type='mlp3x'", "linear, mlp2x_gelu"]),
    ("feature_layer_too_low", ["model.vision.feature_layer=-3"], 1,
     ["model.vision.feature_layer=-3", "model.vision.num_layers=2", "1..2 or -2..-1"]),
    ("feature_layer_zero", ["model.vision.feature_layer=0"], 1,
     ["model.vision.feature_layer=0", "1..2 or -2..-1"]),
    ("feature_layer_too_high", ["model.vision.feature_layer=3"], 1,
     ["model.vision.feature_layer=3", "1..2 or -2..-1"]),
    ("bad_spec", ["model.spec=flash"], 1, ["model.spec='flash'", "auto, local, sdpa, te"]),
    ("bad_dtype", ["model.dtype=fp16"], 1, ["model.dtype='fp16'", "auto, fp32, bf16"]),
    ("bad_kernels", ["model.kernels=triton"], 1, ["model.kernels", "auto, fused, reference"]),
    ("bad_flavour", ["model.vision.flavour=eva"], 1, ["model.vision.flavour", "clip, siglip"]),
    ("bad_select", ["model.vision.select_strategy=cls"], 1,
     ["model.vision.select_strategy", "default, full"]),
    ("bad_schedule", ["train.lr_schedule=step"], 1, ["train.lr_schedule", "cosine, linear, constant"]),
    ("bad_source", ["data.source=laion"], 1, ["data.source", "synthetic"]),
    ("empty_load", ["checkpoint.load=''"], 1, ["checkpoint.load", "none", "auto"]),
    ("seq_too_short", ["data.max_seq_len=20"], 1, ["data.max_seq_len=20", "16", ">= 24"]),
    ("seq_too_short_full", ["data.max_seq_len=24", "model.vision.select_strategy=full"], 1,
     ["data.max_seq_len=24", "17", ">= 25"]),
    ("shapes_order", ["data.min_shapes=3", "data.max_shapes=2"], 1,
     ["data.min_shapes=3", "data.max_shapes=2"]),
    ("shapes_too_many", ["data.max_shapes=4"], 1, ["data.max_shapes=4", "<= 3"]),
    ("shapes_zero", ["data.min_shapes=0"], 1, ["data.min_shapes=0", "1 <= min_shapes"]),
    ("lr_zero", ["train.lr=0"], 1, ["train.lr=0", "> 0"]),
    ("min_lr_above_lr", ["train.min_lr=1"], 1, ["train.min_lr=1.0", "train.lr=0.001"]),
    ("beta1", ["train.adam_beta1=1.0"], 1, ["train.adam_beta1=1.0", "0 < adam_beta1 < 1"]),
    ("beta2", ["train.adam_beta2=0"], 1, ["train.adam_beta2=0.0", "0 < adam_beta2 < 1"]),
    ("keep_negative", ["checkpoint.keep=-1"], 1, ["checkpoint.keep=-1", ">= 0"]),
    ("save_interval_negative", ["checkpoint.save_interval=-5"], 1, ["checkpoint.save_interval=-5"]),
    ("mean_len", ["model.vision.image_mean=[0.5, 0.5]"], 1,
     ["model.vision.image_mean", "2 entries", "num_channels=3"]),
    ("std_len", ["model.vision.num_channels=1"], 1, ["model.vision.image_mean", "num_channels=1"]),
    ("std_nonpositive", ["model.vision.image_std=[0.2, 0.0, 0.2]"], 1, ["model.vision.image_std[1]", "> 0"]),
    ("tp_zero", ["parallel.tp=0"], 1, ["parallel.tp=0", "positive"]),
    ("micro_batch_zero", ["train.micro_batch=0"], 1, ["train.micro_batch=0", "positive"]),
    ("steps_zero", ["train.steps=0"], 1, ["train.steps=0", "positive"]),
    ("siglip_full", ["model.vision.flavour=siglip", "model.vision.select_strategy=full"], 1,
     ["model.vision.select_strategy", "siglip"]),
    ("vocab_pad_vs_tp", ["model.language.vocab_pad_multiple=3", "parallel.tp=2"], 2,
     ["model.language.vocab_pad_multiple=3", "parallel.tp=2"]),
    ("sp_seq_len", ["parallel.tp=2", "parallel.sequence_parallel=true", "data.max_seq_len=49"], 2,
     ["data.max_seq_len=49", "parallel.tp=2", "data.max_seq_len=50"]),
]


@pytest.mark.parametrize(
    "overrides, world_size, needles", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_configs(overrides, world_size, needles):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as ei:
        validate(cfg, world_size)
    msg = str(ei.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_warmup_longer_than_the_run_is_a_warning_not_an_error():
    """As in Megatron-LM, the LR then never reaches its peak: a quick train.steps=4 run of a warmup config works."""
    from megavlm.config import ConfigWarning

    cfg = load_config(str(TINY), ["train.steps=4"])  # tiny_cpu.yaml warms up for 5 steps
    with pytest.warns(ConfigWarning, match=r"train\.warmup_steps=5 is more than train\.steps=4"):
        assert validate(cfg, 1) == 1


def test_bad_world_size_argument():
    with pytest.raises(ConfigError, match="world_size"):
        validate(Config(), 0)


def test_validate_catches_wrong_types_set_in_code():
    cfg = Config()
    cfg.train.steps = "10"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.steps"):
        validate(cfg, 1)


# ------------------------------------------------------------------ import hygiene


def test_import_does_not_pull_torch():
    code = (
        "import sys, megavlm.config as c; "
        "bad = [m for m in ('torch', 'megatron', 'megatron.core') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_duplicate_yaml_key_is_an_error_naming_key_and_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word; a config must not (issue 15, item 13)."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  lr: 0.01\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice in the same section, at lines 2 and 4"):
        load_config(str(p))
    p.write_text("run_dir: /tmp/a\ntrain: {steps: 3}\nrun_dir: /tmp/b\n")
    with pytest.raises(ConfigError, match=r"key 'run_dir' appears twice .* at lines 1 and 3"):
        load_config(str(p))
    # the same key in two sections, and a merge key overridden, are fine
    p.write_text("train:\n  <<: {steps: 3, lr: 0.01}\n  steps: 4\ncheckpoint:\n  keep: 1\nlogging:\n  interval: 1\n")
    cfg = load_config(str(p))
    assert cfg.train.steps == 4 and cfg.train.lr == 0.01


# --------------------------------------------------------------------------------------
# check_paths and size bounds (issue 15, item 11): found before any work, never a traceback mid-run
# --------------------------------------------------------------------------------------


def _paths_error(tmp_path, *overrides):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError) as ei:
        check_paths(cfg)
    return str(ei.value)


def test_check_paths_refuses_directories_that_cannot_be(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = sorted(os.listdir(tmp_path))
    assert "run_dir=" + str(afile) + " is a file, not a directory" in _paths_error(tmp_path, f"run_dir={afile}")
    assert f"cannot be created: {afile} is a file" in _paths_error(tmp_path, f"run_dir={afile}/sub/run")
    # a place no one can create a directory in, root included (a chmod 0500 folder would not stop root)
    assert "run_dir=/proc/megavlm-run: cannot write in /proc" in _paths_error(tmp_path, "run_dir=/proc/megavlm-run")
    assert f"checkpoint.dir={afile} is a file" in _paths_error(tmp_path, f"checkpoint.dir={afile}")
    (tmp_path / "checkpoints").write_text("")  # where checkpoint.dir=null puts them, under run_dir
    assert "checkpoint.dir=null (so {run_dir}/checkpoints) is a file" in _paths_error(tmp_path, f"run_dir={tmp_path}")
    assert f"data.shards={afile} is a file, not a directory" in _paths_error(
        tmp_path, "data.source=shards", f"data.shards={afile}")
    assert f"data.shards={afile} is a file" in _paths_error(
        tmp_path, "data.source=synthetic_shards", f"data.shards={afile}")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "is a broken symbolic link" in _paths_error(tmp_path, f"run_dir={tmp_path / 'dangling'}")
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["checkpoints", "dangling"])  # the checks left nothing
    # what is fine: a new directory under a writable one, an existing directory
    check_paths(load_config(None, [f"run_dir={tmp_path / 'new' / 'run'}"]))
    check_paths(load_config(None, [f"run_dir={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}"]))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("override, needle", [
    ("train.global_batch=1e11", "train.global_batch=100000000000 is too large: at most 2147483647"),
    ("train.global_batch=1e8", "train.global_batch=100000000 is too large: at most 16,777,216 samples per step"),
    ("train.micro_batch=3e9", "train.micro_batch=3000000000 is too large"),
    ("data.max_seq_len=1e12", "data.max_seq_len=1000000000000 is too large"),
    ("train.steps=1e20", "train.steps=100000000000000000000 is too large"),
])
def test_sizes_have_an_upper_bound(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(load_config(None, [override]), 1)
