"""DPO (train.objective=dpo) end to end through the CLI on the demo model's architecture (configs/demo.yaml at PP=1,
small batches): from one short SFT checkpoint (module fixture), the step-1 loss is ln 2 (policy = reference), the
loss falls on the synthetic preference pairs, a resumed DPO run continues exactly (its reference reloaded), PP=2
gives the TP=1 losses (one torchrun launch), the per-pair log-prob sums the trainer logs equal transformers' on the
exported HF folder, and `megavlm eval --task pope` runs on the model."""

from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import ROOT, losses, metrics, run, train  # noqa: E402

DEMO = os.path.join(ROOT, "configs", "demo.yaml")
LN2 = math.log(2.0)
BASE = ["parallel.pp=1", "train.global_batch=8", "train.micro_batch=2", "logging.tensorboard=false",
        "checkpoint.keep=0", "data.eval_samples=24"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A demo-architecture checkpoint after 20 SFT steps on the synthetic set with existence questions."""
    root = tmp_path_factory.mktemp("dpo")
    run_dir = str(root / "sft")
    train(run_dir, *BASE, "train.steps=20", "data.source=synthetic", "data.num_samples=128",
          "data.existence_share=0.3", "train.warmup_steps=2", config=DEMO)
    return root, os.path.join(run_dir, "checkpoints", "iter_0000020")


def _dpo(ckpt: str) -> list[str]:
    # 8 pairs, all of them in every step: the loss on them must fall
    return [*BASE, "train.objective=dpo", f"checkpoint.load={ckpt}", "checkpoint.finetune=true", "train.lr=2e-3",
            "train.warmup_steps=0", "train.lr_schedule=constant", "data.num_samples=8",
            "data.source=synthetic_shards"]


@pytest.fixture(scope="module")
def dpo_run(sft):
    root, ckpt = sft
    run_dir = str(root / "dpo")
    train(run_dir, *_dpo(ckpt), "train.steps=6", "checkpoint.save_interval=3", config=DEMO)
    return run_dir, ckpt


@pytest.mark.slow
def test_step1_is_ln2_the_loss_falls_and_resume_continues(dpo_run, tmp_path):
    run_dir, ref_ckpt = dpo_run
    m = metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    first = m[0]
    assert abs(first["loss"] - LN2) <= 1e-5  # policy = reference: every margin is 0
    assert abs(first["reward_margin"]) <= 1e-6 and first["reward_accuracy"] == 0.0 and first["pairs"] == 8
    assert first["chosen_logp"] < 0 and first["rejected_logp"] < 0
    assert first["chosen_logp"] != first["rejected_logp"]
    last = m[-1]
    assert last["loss"] < LN2 - 0.05 and last["loss"] < min(r["loss"] for r in m[:3])
    assert last["reward_margin"] > 0.1 and last["reward_accuracy"] > 0.5
    # the chosen answers gain on the rejected ones relative to the reference
    assert last["chosen_logp"] - last["rejected_logp"] > first["chosen_logp"] - first["rejected_logp"]
    # every DPO checkpoint names the reference it started from; a resume reloads it and continues exactly
    common = torch.load(os.path.join(run_dir, "checkpoints", "iter_0000003", "common.pt"), weights_only=False)
    assert common["dpo_reference"] == os.path.abspath(ref_ckpt)
    resumed = str(tmp_path / "resumed")
    train(resumed, *[o for o in _dpo(ref_ckpt) if not o.startswith("checkpoint.")], "train.steps=6",
          f"checkpoint.load={os.path.join(run_dir, 'checkpoints', 'iter_0000003')}",
          f"data.shards={os.path.join(run_dir, 'shards')}", config=DEMO)
    want = losses(run_dir)
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_losses_equal_tp1(dpo_run, tmp_path):
    run_dir, ref_ckpt = dpo_run
    pp = str(tmp_path / "pp2")
    train(pp, *_dpo(ref_ckpt), "train.steps=6", "parallel.pp=2", f"data.shards={os.path.join(run_dir, 'shards')}",
          nproc=2, config=DEMO)
    want, got = metrics(run_dir), metrics(pp)
    assert len(got) == 6
    for a, b in zip(want, got):
        for k in ("loss", "reward_margin", "chosen_logp", "rejected_logp"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
        assert a["reward_accuracy"] == b["reward_accuracy"]


@pytest.mark.slow
def test_logged_logps_equal_transformers_on_the_exported_model(sft, tmp_path):
    """One pair per step and a learning rate of 1e-12 (the weights stay the reference's to ~1e-12): each step's
    logged chosen/rejected log-probs are that pair's sums, which transformers' LlavaForConditionalGeneration on the
    exported HF folder must give too (log-softmax of its logits, gathered at the answer tokens by hand)."""
    from transformers import LlavaForConditionalGeneration

    from megavlm import families
    from megavlm.config import load_config
    from megavlm.data.batch import normalize_images
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.training.data import SyntheticTrainData

    root, ckpt = sft
    run_dir = str(tmp_path / "one_pair")
    overrides = [*[o for o in _dpo(ckpt) if not o.startswith(("train.lr=", "data.source", "train.global_batch",
                                                                 "train.micro_batch"))],
                 "train.lr=1e-12", "data.source=synthetic", "train.global_batch=1", "train.micro_batch=1",
                 "train.steps=3"]
    train(run_dir, *overrides, config=DEMO)
    logged = metrics(run_dir)
    hf = str(tmp_path / "hf")
    run(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", hf])
    model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()

    cfg = load_config(DEMO, [f"run_dir={run_dir}", *overrides])
    tok = load_tokenizer(None, existence=True)
    data = SyntheticTrainData(cfg, tok, SimpleNamespace(dp=1, dp_rank=0, device=torch.device("cpu")))
    img = families.of(cfg).image_processor(cfg)
    for step, rec in enumerate(logged):
        (batch,) = data.microbatches(step)
        assert batch["input_ids"].shape[0] == 2  # chosen, rejected
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"],
                           pixel_values=normalize_images(batch["images"], img.mean, img.std)).logits
        logp = torch.log_softmax(logits.double(), dim=-1)
        sums = []
        for row in range(2):
            mask = batch["loss_mask"][row].bool()
            targets = batch["labels"][row][mask]
            sums.append(float(logp[row][mask].gather(-1, targets[:, None]).sum()))
        assert mask.sum() > 0
        assert abs(rec["chosen_logp"] - sums[0]) <= 1e-4, (step, rec["chosen_logp"], sums[0])
        assert abs(rec["rejected_logp"] - sums[1]) <= 1e-4, (step, rec["rejected_logp"], sums[1])
        assert abs(rec["loss"] - LN2) <= 1e-5


@pytest.mark.slow
def test_eval_pope_runs_on_the_demo_model(dpo_run):
    from megavlm.data.synthetic import generate_split
    from megavlm.inference.pope import SETTINGS, build_questions, parse_answer, pope_metrics

    run_dir, _ = dpo_run
    proc = run(["eval", DEMO, f"run_dir={run_dir}", *BASE, "--task", "pope"])
    out = json.load(open(os.path.join(run_dir, "eval_pope.json")))
    _, meta = generate_split(24, 32, split="eval", seed=1234)
    objects = [m["object_names"] for m in meta]
    for setting in SETTINGS:
        r = out[setting]
        qs = build_questions(objects, setting, seed=1234, vocabulary=out["vocabulary"])
        assert r["questions"] == len(qs) == 2 * sum(map(len, objects))
        answers = out["answers"][setting]
        assert [(a["image"], a["object"], a["truth"] == "yes") for a in answers] == qs
        want = pope_metrics([parse_answer(a["answer"]) for a in answers], [t for _, _, t in qs])
        assert {k: r[k] for k in want} == want
        assert setting in proc.stdout
    assert "accuracy" in proc.stdout and "yes-ratio" in proc.stdout


def test_config_checks_name_the_key():
    from megavlm.config import ConfigError, load_config, validate

    for bad, key in (("train.objective=ppo", "train.objective"), ("train.dpo_beta=0", "train.dpo_beta"),
                     ("data.existence_share=1.5", "data.existence_share")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(load_config(DEMO, [bad, "parallel.pp=1"]), 1)
    with pytest.raises(ConfigError, match="data.packing"):
        validate(load_config(DEMO, ["train.objective=dpo", "data.packing=true", "data.source=synthetic_shards",
                                    "train.micro_batch=1", "parallel.pp=1"]), 1)
