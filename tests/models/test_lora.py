"""model.lora in one process: config errors name the key; an adapted layer computes ``W x + (alpha/r)·B A x`` (a
plain-PyTorch reference); what is frozen; plan's counts equal the built model's."""

import pytest
import torch

from megavlm import plan
from megavlm.config import ConfigError, load_config, validate

TINY = "configs/tiny_cpu.yaml"


@pytest.mark.parametrize("overrides,needle", [
    (["model.lora.rank=-1"], "model.lora.rank=-1 must be >= 0"),
    (["model.lora.rank=4", "model.lora.targets=[qkv, gate]"], "model.lora.targets[1]='gate' is not valid"),
    (["model.lora.rank=4", "model.lora.targets=[]"], "model.lora.targets=[] adapts nothing"),
    (["model.lora.rank=4", "model.lora.targets=[fc1, fc1]"], "model.lora.targets=['fc1', 'fc1'] names a layer twice"),
    (["model.lora.rank=4", "model.lora.alpha=0"], "model.lora.alpha=0.0 must be > 0"),
    (["model.lora.rank=4", "model.lora.dropout=1"], "model.lora.dropout=1.0 must satisfy"),
    (["model.lora.rank=4", "model.spec=te"], "model.lora.rank > 0 needs model.spec=auto, sdpa or local"),
    (["model.lora.rnak=4"], "did you mean 'model.lora.rank'"),
])
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as ei:
        validate(load_config(TINY, overrides), 1)
    assert needle in str(ei.value)


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    from helpers import run

    proc = run(["train", TINY, f"run_dir={tmp_path}", "model.lora.rank=-2"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.lora.rank=-2")
    assert "Traceback" not in proc.stderr


def _model(rt, *overrides):
    from megavlm.models.vlm import build_model

    cfg = load_config(TINY, ["model.language.vocab_size=40", "model.spec=local", "model.kernels=reference",
                             *overrides])
    return cfg, build_model(cfg, rt, 40, 5)


def test_adapted_linear_equals_plain_pytorch(rt):
    """Every adapted layer's output is its base output + (alpha/r)·x Aᵀ Bᵀ, on random factors; a fresh B is 0."""
    from megavlm.models import lora

    cfg, model = _model(rt, "model.lora.rank=3", "model.lora.alpha=6", "model.lora.vision=true")
    layers = lora.adapted(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in layers} == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    assert any(n.startswith("vision_model.") for n, _ in layers)
    g = torch.Generator().manual_seed(0)
    for name, lin in layers:
        assert torch.count_nonzero(lin.lora_b) == 0
        bound = 1 / lin.lora_a.shape[1] ** 0.5  # kaiming_uniform(a=√5) on (r, in)
        assert 0 < lin.lora_a.abs().max() <= bound
        with torch.no_grad():
            lin.lora_b.normal_(generator=g)
        x = torch.randn(5, 2, lin.lora_a.shape[1], generator=g)
        with torch.no_grad():
            got, _ = lin(x)
            want = x @ lin.weight.T + (lin.bias if lin.bias is not None and not lin.skip_bias_add else 0)
            want = want + 2.0 * (x @ lin.lora_a.T) @ lin.lora_b.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_seeded_init_is_per_layer_and_reproducible(rt):
    from megavlm.models import lora

    _, a = _model(rt, "model.lora.rank=2")
    _, b = _model(rt, "model.lora.rank=2")
    _, c = _model(rt, "model.lora.rank=2", "train.seed=7")
    fa, fb, fc = (dict(lora.adapted(m)) for m in (a, b, c))
    names = list(fa)
    assert all(torch.equal(fa[n].lora_a, fb[n].lora_a) for n in names)
    assert not any(torch.equal(fa[n].lora_a, fc[n].lora_a) for n in names)
    qkv = [fa[n].lora_a for n in names if n.endswith("linear_qkv")]
    assert len(qkv) == 2 and not torch.equal(qkv[0], qkv[1])  # each layer its own start


@pytest.mark.parametrize("stage,vision,trained", [
    (2, False, ("projector.",)),
    (3, False, ("projector.", "vision_model.")),
    (1, True, ("projector.",)),
])
def test_what_trains(rt, stage, vision, trained):
    """The adapters always train; the rest of an adapted part is frozen; train.stage decides the other parts."""
    from megavlm.models.lora import is_adapter_key

    cfg, model = _model(rt, "model.lora.rank=2", f"train.stage={stage}", f"model.lora.vision={str(vision).lower()}")
    adapted = ("language_model.", "vision_model.") if vision else ("language_model.",)
    for name, p in model.named_parameters():
        want = is_adapter_key(name) if name.startswith(adapted) else name.startswith(trained)
        assert p.requires_grad == want, name
    assert any(is_adapter_key(n) and n.startswith("vision_model.") for n, _ in model.named_parameters()) == vision


@pytest.mark.parametrize("overrides", [
    ["model.lora.rank=4"],
    ["model.lora.rank=2", "model.lora.targets=[qkv, fc2]", "model.lora.vision=true", "train.stage=3"],
])
def test_plan_counts_equal_built_model(rt, overrides):
    cfg, model = _model(rt, *overrides)
    got = plan.stage_params(cfg, 40, tp=1, pp=1, rank=0)
    assert got.total == sum(p.numel() for p in model.parameters())
    assert got.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got.language_lora == sum(p.numel() for n, p in model.named_parameters()
                                    if n.startswith("language_model.") and ".lora_" in n) > 0
    # at TP=2 a rank holds A whole and half of B for column-parallel targets, half of A and B whole for row ones
    lm, r = cfg.model.language, cfg.model.lora.rank
    two = plan.stage_params(cfg, 40, tp=2, pp=1, rank=0)
    h, f = lm.hidden_size, lm.ffn_hidden_size
    qkv = (lm.num_heads + 2 * lm.num_kv_heads) * (h // lm.num_heads)
    per = {"qkv": r * h + r * qkv // 2, "proj": r * h // 2 + r * h, "fc1": r * h + r * 2 * f // 2,
           "fc2": r * f // 2 + r * h}
    assert two.language_lora == lm.num_layers * sum(per[t] for t in cfg.model.lora.targets)


def test_plan_output_reports_lora(capsys):
    from megavlm.cli import main

    assert main(["plan", TINY, "model.lora.rank=4", "--gpus", "1", "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "trains projector+language[LoRA r=4: qkv,proj,fc1,fc2] (train.stage=2)" in out
    assert "(LoRA adapters; the" in out


def test_mfu_flops_count_no_weight_gradients_of_the_frozen_llm():
    """With LoRA on the LLM the decoder does forward + input gradients only (2·fwd, like stage 1's frozen LLM); the
    projector still trains in full."""
    from megavlm.shapes import decoder_forward_flops
    from megavlm.training.trainer import model_flops_per_step

    base = ["model.language.vocab_size=40"]
    full, lora, stage1 = (model_flops_per_step(load_config(TINY, base + ov), 100, 2)
                          for ov in ([], ["model.lora.rank=4"], ["train.stage=1"]))
    assert lora == stage1
    lm = load_config(TINY, base).model.language
    assert full - lora == decoder_forward_flops(lm, 100, load_config(TINY, base).data.max_seq_len, 40)
