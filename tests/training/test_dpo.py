"""DPO (train.objective=dpo) end to end through the CLI on the demo model's architecture (configs/demo.yaml at PP=1,
small batches): from one short SFT checkpoint (module fixture), the step-1 loss is ln 2 (policy = reference), the
loss falls on the synthetic preference pairs, a resumed DPO run continues exactly (its reference reloaded), PP=2 and
TP=2 give the TP=1 losses (two torchrun launches), the per-pair log-prob sums the trainer logs equal a hand-written
computation on the model's logits (which equal transformers' on the exported HF folder), and `megavlm eval --task
pope` runs on the model."""

from __future__ import annotations

import json
import math
import os
import sys

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
    from megavlm.training.checkpoint import load_common

    common = load_common(os.path.join(run_dir, "checkpoints", "iter_0000003"))
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
@pytest.mark.parametrize("layout", ["parallel.pp=2", "parallel.tp=2"])
def test_pp2_and_tp2_losses_equal_tp1(dpo_run, tmp_path, layout):
    run_dir, ref_ckpt = dpo_run
    other = str(tmp_path / "other")
    train(other, *_dpo(ref_ckpt), "train.steps=6", layout, f"data.shards={os.path.join(run_dir, 'shards')}",
          nproc=2, config=DEMO)
    want, got = metrics(run_dir), metrics(other)
    assert len(got) == 6
    for a, b in zip(want, got):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        # sums of ~10 token log-probs (~-15) after 5 updates at lr 2e-3: TP's other summation order shows at ~1e-5
        for k in ("reward_margin", "chosen_logp", "rejected_logp"):
            assert abs(a[k] - b[k]) <= 5e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
        assert a["reward_accuracy"] == b["reward_accuracy"]


@pytest.mark.slow
def test_logged_logps_equal_an_independent_computation(sft, tmp_path):
    """One pair per step and a learning rate of 1e-12 (the weights stay the reference's to ~1e-12): each step's
    logged chosen/rejected log-probs are that pair's sums. They must equal a plain-PyTorch computation on the same
    model: log-softmax of the model's logits (over its padded vocabulary, as training normalizes), gathered at the
    answer tokens by hand; and those logits, over the tokenizer's vocabulary, must be transformers'
    LlavaForConditionalGeneration's on the exported HF folder."""
    from transformers import LlavaForConditionalGeneration

    from megavlm import families
    from megavlm.config import load_config
    from megavlm.data.batch import normalize_images

    _, ckpt = sft
    run_dir = str(tmp_path / "one_pair")
    keep = [o for o in _dpo(ckpt) if not o.startswith(("train.lr=", "data.source", "train.global_batch",
                                                       "train.micro_batch"))]
    overrides = [*keep, "train.lr=1e-12", "data.source=synthetic", "train.global_batch=1", "train.micro_batch=1",
                 "train.steps=3"]
    train(run_dir, *overrides, config=DEMO)
    logged = metrics(run_dir)
    saved = str(tmp_path / "logits.pt")
    run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_logits_worker.py"), ckpt, saved, "3",
         *[o for o in overrides if not o.startswith("checkpoint.")]])
    got = torch.load(saved, weights_only=False)
    hf = str(tmp_path / "hf")
    run(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", hf])
    model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    cfg = load_config(DEMO, overrides)
    img = families.of(cfg).image_processor(cfg)
    assert len(logged) == 3
    for rec, batch, logits in zip(logged, got["batches"], got["logits"]):
        assert batch["input_ids"].shape[0] == 2  # chosen, rejected
        with torch.no_grad():
            ref = model(input_ids=batch["input_ids"],
                        pixel_values=normalize_images(batch["images"], img.mean, img.std)).logits
        vocab = ref.shape[-1]
        assert (ref - logits[..., :vocab]).abs().max() <= 1e-4
        logp = torch.log_softmax(logits.double(), dim=-1)
        sums = []
        for row in range(2):
            mask = batch["loss_mask"][row].bool()
            assert mask.sum() > 0
            targets = batch["labels"][row][mask]
            sums.append(float(logp[row][mask].gather(-1, targets[:, None]).sum()))
        assert abs(rec["chosen_logp"] - sums[0]) <= 1e-4, (rec["step"], rec["chosen_logp"], sums[0])
        assert abs(rec["rejected_logp"] - sums[1]) <= 1e-4, (rec["step"], rec["rejected_logp"], sums[1])
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

    # the same images as shards whose records carry their objects: every question asked of both gets the same answer
    from megavlm.data.synthetic import write_synthetic_shards

    shards = os.path.join(run_dir, "eval_shards")
    write_synthetic_shards(shards, 24, 32, seed=1234, split="eval")
    run(["eval", DEMO, f"run_dir={run_dir}", *BASE, "--task", "pope", "--shards", shards])
    on_shards = json.load(open(os.path.join(run_dir, "eval_pope.json")))
    assert on_shards["images"] == 24 and sorted(on_shards["vocabulary"]) == sorted({o for x in objects for o in x})
    synthetic = {(a["image"], a["object"]): a["answer"] for s in SETTINGS for a in out["answers"][s]}
    common = 0
    for setting in SETTINGS:
        qs = build_questions(objects, setting, seed=1234, vocabulary=on_shards["vocabulary"])
        assert [(a["image"], a["object"], a["truth"] == "yes") for a in on_shards["answers"][setting]] == qs
        for a in on_shards["answers"][setting]:
            if (a["image"], a["object"]) in synthetic:
                common += 1
                assert a["answer"] == synthetic[(a["image"], a["object"])]
    assert common >= 3 * sum(map(len, objects))  # at least every present object, in each of the settings


def test_config_checks_name_the_key():
    from megavlm.config import ConfigError, load_config, validate

    for bad, key in (("train.objective=ppo", "train.objective"), ("train.dpo_beta=0", "train.dpo_beta"),
                     ("data.existence_share=1.5", "data.existence_share")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(load_config(DEMO, [bad, "parallel.pp=1"]), 1)
    with pytest.raises(ConfigError, match="data.packing"):
        validate(load_config(DEMO, ["train.objective=dpo", "data.packing=true", "data.source=synthetic_shards",
                                    "train.micro_batch=1", "parallel.pp=1"]), 1)


@pytest.mark.slow
def test_dpo_with_lora_trains_only_the_adapters(sft, tmp_path):
    """DPO on LoRA adapters (train.stage=2: projector + the LLM's adapters): step 1 is still ln 2, the loss falls, and
    the LLM's and the vision encoder's base weights are bit-identical to the starting checkpoint."""
    from helpers import checkpoint_tensors

    _, ckpt = sft
    run_dir = str(tmp_path / "dpo_lora")
    train(run_dir, *_dpo(ckpt), "train.steps=5", "model.lora.rank=4", "model.lora.alpha=8", "train.stage=2",
          "train.lr=1e-2", config=DEMO)
    m = metrics(run_dir)
    assert abs(m[0]["loss"] - LN2) <= 1e-5
    assert m[-1]["loss"] < LN2 - 0.01 and m[-1]["reward_margin"] > 0
    parts = ("language_model.", "vision_model.", "projector.")

    def weights(path):
        return {k: v for k, v in checkpoint_tensors(path).items()
                if k.startswith(parts) and isinstance(v, torch.Tensor) and "_extra_state" not in k}

    params, after = weights(ckpt), weights(os.path.join(run_dir, "checkpoints", "iter_0000005"))
    adapters = [k for k in after if k.endswith((".lora_a", ".lora_b"))]
    assert adapters and set(after) - set(params) == set(adapters)
    frozen = [k for k in params if k.startswith(("language_model.", "vision_model."))]
    assert any(k.startswith("language_model.") for k in frozen) and any(k.startswith("vision_model.") for k in frozen)
    for k in frozen:
        assert torch.equal(params[k], after[k]), k
    assert any(not torch.equal(params[k], after[k]) for k in params if k.startswith("projector."))
