"""``train.trainable`` (a list of vision / projector / language) replaces ``train.stage``'s preset: the config check,
which parameters train (end to end through the trainer: the others stay bit-identical), the start-up line, ``plan``'s
trained count and the MFU's FLOP factors."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import checkpoint_tensors, train

STEPS = ["train.steps=2", "train.warmup_steps=0", "train.lr=1e-2", "train.global_batch=4", "train.micro_batch=2",
         "checkpoint.keep=0", "logging.tensorboard=false"]


def test_config_check_names_the_key():
    from megavlm.config import ConfigError, load_config, validate

    cfg = load_config(None, ["train.trainable=[vision, projector]"])
    validate(cfg, 1)
    assert cfg.train.trainable == ["vision", "projector"]
    for bad, needle in (("[]", r"train\.trainable=\[\] trains nothing"),
                        ("[vision, llm]", r"train\.trainable\[1\]='llm' is not valid; choose one of: vision, "
                                          r"projector, language"),
                        ("[language, language]", "names a part twice")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config(None, [f"train.trainable={bad}"]), 1)


def test_trainable_parts_and_prefixes():
    from megavlm import shapes

    assert shapes.trainable_parts(2) == (False, True, True)
    assert shapes.trainable_parts(2, ["vision", "projector"]) == (True, True, False)
    assert shapes.trainable_prefixes(1, ["language"]) == ("language_model.",)
    assert shapes.trainable_prefixes(1) == shapes.TRAINABLE[1]
    assert shapes.trained_label(3, ["projector", "vision"]) == "vision+projector (train.trainable)"
    assert shapes.trained_label(2) == "projector+language (train.stage=2)"


def test_plan_and_mfu_count_what_trains():
    from megavlm import families, plan, shapes
    from megavlm.config import load_config
    from megavlm.training.trainer import model_flops_per_step

    cfg = load_config(None, ["model.language.vocab_size=40", "train.trainable=[vision, projector]"])
    sp = plan.stage_params(cfg, 40, tp=1, pp=1, rank=0)
    assert sp.trainable == sp.vision + sp.projector and sp.language > 0
    fam = families.of(cfg)
    v, p, lm = fam.vision_arch(cfg), fam.projector_arch(cfg), cfg.model.language
    n_tok, n_img = 256, 4
    lm_fwd = shapes.decoder_forward_flops(lm, n_tok, cfg.data.max_seq_len, lm.vocab_size)
    proj = p.forward_flops(n_img * p.tokens(v.tokens))
    # the frozen LLM still back-propagates (data grads) to the trained parts before it
    assert model_flops_per_step(cfg, n_tok, n_img) == 2 * lm_fwd + 3 * v.forward_flops(n_img) + 3 * proj
    cfg.train.trainable = ["language"]  # nothing before the LLM trains: vision and projector only run forward
    assert model_flops_per_step(cfg, n_tok, n_img) == 3 * lm_fwd + v.forward_flops(n_img) + proj
    text = plan.format_plan(plan.make_plan(cfg, gpus=1, gpu_memory_gib=80, vocab_size=40))
    assert "trains language (train.trainable)" in text
    trained = next(line for line in text.splitlines() if line.strip().startswith("vision"))
    assert trained.split()[-1] == "0"  # the vision encoder's trained count


@pytest.mark.slow
def test_vision_and_projector_train_and_the_llm_stays_bit_identical(tmp_path):
    """From one checkpoint, two steps with ``train.trainable=[vision, projector]`` (``train.stage=2`` would freeze the
    vision encoder and train the LLM): every vision and projector weight moved, every LLM tensor is bit-identical."""
    start = tmp_path / "start"
    train(start, "train.steps=1", "logging.tensorboard=false")
    ckpt = os.path.join(start, "checkpoints", "iter_0000001")
    run = tmp_path / "run"
    proc = train(run, *STEPS, f"checkpoint.load={ckpt}", "checkpoint.finetune=true", "train.stage=2",
                 "train.trainable=[vision, projector]")
    assert "trains vision+projector (train.trainable)" in proc.stdout
    before = checkpoint_tensors(ckpt)
    after = checkpoint_tensors(os.path.join(run, "checkpoints", "iter_0000002"))
    prefixes = ("vision_model.", "projector.", "language_model.")
    weights = {k: v for k, v in before.items() if isinstance(v, torch.Tensor) and k.startswith(prefixes)}
    changed = {k for k, v in weights.items() if not torch.equal(v, after[k])}
    parts = {p: [k for k in weights if k.startswith(p)] for p in prefixes}
    assert all(parts.values()), parts
    assert not changed & set(parts["language_model."])
    # every trained tensor moved (norm biases included: the loss reaches them all)
    assert set(parts["vision_model."]) | set(parts["projector."]) <= changed


def test_qwenvl_recipe_stages():
    """configs/qwenvl_stages.yaml and the two later stages its header gives pass the checks and train what Qwen-VL's
    stages train."""
    import re

    from megavlm import shapes
    from megavlm.config import load_config, validate

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                        "qwenvl_stages.yaml")
    later = re.findall(r'"(train\.trainable=\[[a-z,]+\])"', open(path).read())
    assert len(later) == 2
    want = [(True, True, False), (True, True, True), (False, True, True)]
    for overrides, parts in zip([[]] + [[t] for t in later], want):
        cfg = load_config(path, overrides)
        validate(cfg, 1)
        assert shapes.trainable_parts(cfg.train.stage, cfg.train.trainable) == parts
