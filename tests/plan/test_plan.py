"""``megavlm plan``: parameter counts equal built models', the memory formulas' pieces, the layout search, the CLI,
and one estimate against the measured tensor memory of a real (tiny, single-process) CPU training run."""

import copy
import json

import pytest

from megavlm import families, plan
from megavlm.config import ConfigError, load_config

TINY = "configs/tiny_cpu.yaml"

PARAM_CASES = {
    "default (clip, mlp, gqa)": [],
    "qkv_bias, no gqa": ["model.language.qkv_bias=true", "model.language.num_kv_heads=4"],
    "siglip, linear projector": ["model.vision.flavour=siglip", "model.projector.type=linear"],
    "clip penultimate, full select, mqa": ["model.vision.feature_layer=-2", "model.vision.select_strategy=full",
                                           "model.language.num_kv_heads=1", "model.language.num_layers=3"],
    "resampler (queries, heads)": ["model.projector.type=resampler", "model.projector.queries=9",
                                   "model.projector.heads=2"],
    "stage 1": ["train.stage=1"],
    "stage 3": ["train.stage=3"],
}


#: InternVL (no tiny config file: its sections differ): layer scale, q/k norm, RMSNorm, tied embeddings, pixel shuffle.
INTERNVL = ["model.family=internvl", "data.max_seq_len=128"]
PARAM_CASES.update({
    "internvl (layernorm, qkv bias, tied)": INTERNVL + ["model.language.tie_embeddings=true", "train.stage=3"],
    "internvl (rmsnorm, qk norm, no qkv bias)": INTERNVL + ["model.vision.norm_type=rms_norm",
                                                            "model.vision.qk_norm=true", "model.vision.qkv_bias=false",
                                                            "model.vision.feature_layer=-2"],
})


#: Qwen2-VL / Qwen2.5-VL: Conv3d patch embedding, no positions, gated MLP, the merger's token norm and 4d inner width.
QWEN = ["data.source=synthetic_shards", "data.max_seq_len=128"]
PARAM_CASES.update({
    "qwen2_vl (layernorm, quick_gelu)": ["model.family=qwen2_vl", *QWEN, "train.trainable=[vision, projector]"],
    "qwen2_5_vl (rmsnorm, gated, windows, tied)": ["model.family=qwen2_5_vl", *QWEN, "train.stage=3",
                                                   "model.language.tie_embeddings=true"],
})


@pytest.mark.parametrize("name", list(PARAM_CASES))
def test_parameter_counts_equal_built_model(rt, name):
    import torch

    from megavlm.models.vlm import VLM

    cfg = load_config(None if name.startswith(("internvl", "qwen")) else TINY, ["model.language.vocab_size=40"]
                      + PARAM_CASES[name])
    model = VLM(cfg, rt, 40, 5, torch.float32, pre_process=True, post_process=True)
    model.freeze_for_stage(cfg.train.stage, cfg.train.trainable)
    parts = {"vision": "vision_model.", "projector": "projector.", "language": "language_model."}
    built = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(pre))
             for k, pre in parts.items()}
    got = plan.stage_params(cfg, 40, tp=1, pp=1, rank=0)
    assert (got.vision, got.projector, got.language) == (built["vision"], built["projector"], built["language"])
    assert got.total == sum(p.numel() for p in model.parameters())
    assert got.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_pipeline_stages_split_the_language_model():
    cfg = load_config(TINY, ["model.language.vocab_size=40", "model.language.num_layers=5"])
    whole = plan.stage_params(cfg, 40, 1, 1, 0).total
    stages = [plan.stage_params(cfg, 40, 1, 2, r, first_stage_layers=1) for r in range(2)]
    assert sum(s.total for s in stages) == whole
    assert stages[1].vision == stages[1].projector == 0
    assert plan.decoder_layers_per_stage(5, 2, 1) == [1, 4]
    assert plan.decoder_layers_per_stage(8, 4, None) == [2, 2, 2, 2]


def test_tp_split_counts_sum_to_whole_plus_replicas():
    """Per-rank counts at TP=2: split tensors halve, replicated ones (norms, row-parallel biases, vision embeddings)
    repeat on both ranks."""
    cfg = load_config(TINY, ["model.language.vocab_size=40"])
    lm, v = cfg.model.language, cfg.model.vision
    one, two = plan.stage_params(cfg, 40, 1, 1, 0), plan.stage_params(cfg, 40, 2, 1, 0)
    h, d = lm.hidden_size, v.hidden_size
    replicated_lm = lm.num_layers * 2 * h + h  # RMSNorm weights
    assert 2 * two.language - replicated_lm == one.language
    replicated_proj = h  # fc2 bias
    assert 2 * two.projector - replicated_proj == one.projector
    n_patch = (v.image_size // v.patch_size) ** 2
    emb = d * 3 * v.patch_size ** 2 + d + (n_patch + 1) * d + 2 * d
    replicated_v = emb + v.num_layers * (2 * d + d + 2 * d + d)  # embeddings, 2 LNs, proj/fc2 biases
    assert 2 * two.vision - replicated_v == one.vision


def test_bytes_per_param_match_megatron_table():
    """megatron's distributed-optimizer doc: 18 bytes/param (bf16 params, fp32 grads, Adam) plain, 6 + 12/DP
    distributed; 16 and 8 + 8/DP in fp32."""
    cfg = load_config(TINY, ["model.language.vocab_size=40", "train.stage=3", "train.global_batch=8",
                             "train.micro_batch=1"])
    n = plan.stage_params(cfg, 40, 1, 1, 0).total
    for dtype, plain, dist in (("bf16", 18, lambda d: 6 + 12 / d), ("fp32", 16, lambda d: 8 + 8 / d)):
        cfg.model.dtype = dtype
        for dp in (1, 4):
            for distributed in (False, True):
                lay = plan.Layout(dp=dp, micro_batch=1, distributed_optimizer=distributed)
                st = plan.stage_memory(cfg, 40, lay, 0, plan.Env("gpu"))
                per = (st["weights"] + st["gradients"] + st["optimizer"]) / n
                want = dist(dp) if distributed else plain
                assert per == pytest.approx(want, rel=1e-3), (dtype, dp, distributed)


def test_frozen_parts_have_no_gradients_or_optimizer_state():
    cfg = load_config(TINY, ["model.language.vocab_size=40", "train.stage=1", "model.dtype=fp32"])
    st = plan.stage_memory(cfg, 40, plan.Layout(micro_batch=2), 0, plan.Env("cpu"))
    proj = plan.stage_params(cfg, 40, 1, 1, 0).projector
    assert st["gradients"] == 4 * proj and st["optimizer"] == 8 * proj


def test_korthikanti_closed_form():
    s, b, h, a = 2048, 1, 4096, 32
    assert plan.korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert plan.korthikanti_layer_bytes(s, b, h, a, 8, sp=True) == pytest.approx(s * b * h / 8 * (34 + 5 * a * s / h))
    assert plan.korthikanti_layer_bytes(s, b, h, a, 8, sp=True, recompute="selective") == pytest.approx(
        s * b * h * 34 / 8)


def test_decoder_layer_terms_by_hand():
    """fp32, local attention, GQA, trained, no SP: 6 T·h (norm region) + 3 T·h (q, repeated k, v) + T·h (context)
    + b·a·s² probs + 4 T·F (SwiGLU: fc1 out 2F, silu F, product F) + 4 s·d (RoPE tables); with TE's layers the
    SwiGLU keeps megatron's offset add (F) too."""
    cfg = load_config(TINY)
    lm = cfg.model.language  # h 128, 4 heads, 2 KV heads, F 352
    s, b = 48, 2
    T, h, F = s * b, 128, 352
    got = plan.decoder_layer_bytes(lm, s, b, tp=1, sp=False, e=4, backend="local", trained=True)
    assert got["total"] == 4 * (6 * T * h + 3 * T * h + T * h + b * 4 * s * s + 4 * T * F + 4 * s * 32)
    te = plan.decoder_layer_bytes(lm, s, b, tp=1, sp=False, e=4, backend="te", trained=True)
    assert te["saved"]["SwiGLU (fc1 out, silu, offset add, product)"] == 4 * 5 * T * F
    sp = plan.decoder_layer_bytes(lm, s, b, tp=2, sp=True, e=4, backend="local", trained=True)
    assert sp["saved"]["2 RMSNorms (input, normalized, output)"] == 2 * T // 2 * h * 3 * 4
    flash = plan.decoder_layer_bytes(lm, s, b, tp=1, sp=False, e=2, backend="sdpa", trained=True)
    assert not any("s²" in k for k in flash["saved"])
    full = plan.decoder_layer_bytes(lm, s, b, tp=1, sp=False, e=2, backend="local", trained=True, recompute="full")
    assert full["total"] == 2 * T * h


def test_pipeline_first_stage_holds_pp_micro_batches():
    cfg = load_config(TINY, ["model.language.vocab_size=40", "model.language.num_layers=4", "train.global_batch=16",
                             "train.micro_batch=2"])
    mem = plan.layout_memory(cfg, 40, plan.Layout(pp=4, micro_batch=2), plan.Env("gpu"))
    assert [st["activations"]["none"]["micro_batches_in_flight"] for st in mem["stages"]] == [4, 3, 2, 1]


def test_suggestions_fit_and_are_valid():
    cfg = load_config("configs/gpu_smoke.yaml")
    p = plan.make_plan(cfg, gpus=8, gpu_memory_gib=80, vocab_size=32000)
    assert p["suggestions"]
    for row in p["suggestions"]:
        assert row["peak"] <= (80 - p["reserve_gib"]) * plan.GIB
        lay = row["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 8
    # a budget nothing fits in gives no suggestion, not an error
    assert plan.make_plan(cfg, gpus=1, gpu_memory_gib=4.5, vocab_size=32000)["suggestions"] == []


def test_plan_rejects_bad_input():
    cfg = load_config(TINY, ["model.language.vocab_size=40"])
    with pytest.raises(ConfigError, match="gpus"):
        plan.make_plan(cfg, gpus=0, gpu_memory_gib=80)
    with pytest.raises(ConfigError, match="gpu-memory"):
        plan.make_plan(cfg, gpus=1, gpu_memory_gib=0)
    bad = copy.deepcopy(cfg)
    bad.parallel.tp = 3
    with pytest.raises(ConfigError, match="tp"):
        plan.make_plan(bad, gpus=3, gpu_memory_gib=80)


def test_cli_text_and_json(capsys):
    from megavlm.cli import main

    assert main(["plan", TINY, "model.language.vocab_size=40", "--gpus", "2", "--gpu-memory", "16"]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "layouts that fit" in text and "recompute=full" in text
    assert main(["plan", TINY, "model.language.vocab_size=40", "--gpus", "2", "--gpu-memory", "16",
                 "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == plan.stage_params(load_config(TINY), 40, 1, 1, 0).total
    assert data["config_layout"]["layout"]["dp"] == 2
    assert main(["plan", TINY, "parallel.tp=3", "--gpus", "2"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["plan", TINY, "no.such=1", "--gpus", "1"]) == 2


def test_estimate_within_15_percent_of_measured_cpu_run(tmp_path):
    """A real single-process CPU training run of the tiny model (fp32, local attention), every tensor storage
    counted by megavlm.plan.measure: the planner's weights, gradients and optimizer state are exact, and its saved
    activations and step peak are within 15% of what was measured."""
    import subprocess
    import sys

    from helpers import ROOT, _env

    overrides = ["data.source=synthetic", "data.num_samples=32", "data.eval_samples=0", "train.warmup_steps=0",
                 "logging.tensorboard=false"]
    env = {k: v for k, v in _env().items() if k not in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # rt's
    subprocess.run([sys.executable, "benchmarks/plan_memory.py", "--worker", str(tmp_path), "--steps", "2", "--",
                    *overrides], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    got = json.loads((tmp_path / "rank0.json").read_text())
    cfg = load_config(TINY, overrides + [f"model.language.vocab_size={got['vocab_size']}"])
    st = plan.stage_memory(cfg, got["vocab_size"], plan.Layout(micro_batch=cfg.train.micro_batch), 0,
                           plan.Env("cpu"))
    assert st["params"]["total"] == got["params"]
    assert (st["weights"], st["gradients"]) == (got["weights"], got["gradients"])
    assert st["optimizer"] == pytest.approx(got["optimizer"], rel=1e-3)
    assert st["activations"]["none"]["saved"] == pytest.approx(got["activations_end_of_forward"], rel=0.15)
    assert st["peak"] == pytest.approx(got["peak"], rel=0.15)


def test_train_recompute_is_validated_and_reaches_megatron(rt):
    import torch

    from megavlm.config import validate
    from megavlm.models import specs

    with pytest.raises(ConfigError, match="train.recompute"):
        validate(load_config(TINY, ["train.recompute=some"]), 1)
    for mode, want in (("none", (None, None, None)), ("selective", ("selective", None, None)),
                       ("full", ("full", "uniform", 1))):
        cfg = load_config(TINY, [f"train.recompute={mode}"])
        validate(cfg, 1)
        arch = families.of(cfg).vision_arch(cfg)
        for tc in (specs.language_config(cfg, rt, torch.float32), specs.vision_config(arch, cfg, rt, torch.float32)):
            assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == want


def test_plan_needs_no_data_or_tokenizer_on_disk():
    """A shards config plans on a machine without the shards; the tokenizer is only needed for vocab_size=0."""
    cfg = load_config("configs/llava15_7b_stage2.yaml", ["model.language.vocab_size=32001"])
    p = plan.make_plan(cfg, gpus=8, gpu_memory_gib=80)
    assert p["parameters"]["total"] > 7e9 and p["config_layout"]["fits"] in (True, False)
    from megavlm.errors import UserError

    with pytest.raises(UserError, match="vocab_size"):
        plan.make_plan(load_config("configs/llava15_7b_stage2.yaml"), gpus=8, gpu_memory_gib=80)
