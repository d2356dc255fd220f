"""Checks the trainer makes before loading a checkpoint."""

import pytest

from megavlm.config import load_config, to_dict
from megavlm.errors import UserError
from megavlm.training.trainer import _check_same_model


def test_other_architecture_is_named():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    cur = to_dict(load_config("configs/tiny_cpu.yaml", ["model.language.num_layers=4", "model.vision.patch_size=4"]))
    with pytest.raises(UserError, match=r"model.language.num_layers: checkpoint 2, config 4") as e:
        _check_same_model(saved, cur["model"], "/ckpt")
    assert "model.vision.patch_size" in str(e.value)


def test_backend_settings_may_differ():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    cur = to_dict(load_config("configs/tiny_cpu.yaml", ["model.spec=sdpa", "model.dtype=bf16", "model.kernels=reference"]))
    _check_same_model(saved, cur["model"], "/ckpt")  # no error
    _check_same_model({}, cur["model"], "/ckpt")  # checkpoints without a config (older) are not checked


def test_keys_added_since_the_checkpoint_take_their_defaults():
    saved = to_dict(load_config("configs/tiny_cpu.yaml"))["model"]
    del saved["language"]["qkv_bias"]  # a checkpoint written before the field existed
    _check_same_model(saved, to_dict(load_config("configs/tiny_cpu.yaml"))["model"], "/ckpt")
    with pytest.raises(UserError, match="qkv_bias: checkpoint False, config True"):
        _check_same_model(saved, to_dict(load_config("configs/tiny_cpu.yaml", ["model.language.qkv_bias=true"]))[
            "model"], "/ckpt")
