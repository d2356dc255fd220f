"""SigLIP vision towers and Qwen2 language models: HF ↔ megatron conversion checked against transformers (TP=1/PP=1,
tiny random fp32 models)."""

import os

import pytest
import torch

from hf_models import N_IMG, make_llava, qwen2_config, randomize, sample_inputs, save_processor, siglip_config
from test_convert import greedy, load_ours


def _tensors(d):
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _cfg_dict(d):
    from transformers import LlavaConfig

    c = LlavaConfig.from_pretrained(d).to_dict()
    for k in ("transformers_version", "_name_or_path"):
        c.pop(k, None)
    return c


def _round_trip(hf_dir, out, back):
    """HF → mcore → HF: every tensor bit-identical (dtype included), equal configs; returns the reloaded model."""
    from transformers import LlavaForConditionalGeneration

    from megavlm.convert import engine as conv

    conv.mcore_to_hf(out, back)
    a, b = _tensors(hf_dir), _tensors(back)
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _cfg_dict(back) == _cfg_dict(hf_dir)
    return LlavaForConditionalGeneration.from_pretrained(back).eval()


@pytest.fixture(scope="module")
def siglip_llava(rt, tmp_path_factory):  # noqa: F811
    from megavlm.convert import engine as conv

    d = str(tmp_path_factory.mktemp("hf_siglip_llava"))
    model, tok = make_llava(d, vision="siglip")
    out = str(tmp_path_factory.mktemp("conv_siglip") / "mcore")
    conv.hf_to_mcore(out, hf=d)
    return d, model, tok, out


def test_siglip_llava_logits_and_greedy_match_transformers(rt, siglip_llava):  # noqa: F811
    _, hf_model, tok, out = siglip_llava
    cfg, model, _ = load_ours(rt, out)
    v = cfg.model.vision
    assert (v.flavour, v.select_strategy, v.feature_layer, v.layernorm_eps) == ("siglip", "default", -2, 1e-3)
    assert model.vision_model.class_embedding is None and model.vision_model.ln_pre is None
    assert os.path.isfile(os.path.join(out, "hf_extra.safetensors"))
    vocab = cfg.model.language.vocab_size
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        # every patch position reaches the projector (HF 'full' = ours 'default': no class token to drop)
        want = hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        assert (model.vision_model(pixels) - want).abs().max() <= 1e-5
        want = hf_model(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids, images=pixels, runtime_gather_output=True)[..., :vocab]
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, diff
        assert want.abs().max() > 0.5
        ours = greedy(lambda x: model(input_ids=x, images=pixels, runtime_gather_output=True)[..., :vocab], ids)
        theirs = greedy(lambda x: hf_model(input_ids=x, pixel_values=pixels).logits, ids)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_siglip_llava_round_trip_bit_identical(rt, siglip_llava, tmp_path):  # noqa: F811
    hf_dir, hf_model, tok, out = siglip_llava
    reloaded = _round_trip(hf_dir, out, str(tmp_path / "hf"))
    assert reloaded.config.vision_config.vision_use_head and reloaded.config.vision_feature_select_strategy == "full"
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits,
                           hf_model(input_ids=ids, pixel_values=pixels).logits)


def test_qwen2_llava_matches_and_round_trips(rt, tmp_path):  # noqa: F811
    from megavlm.convert import engine as conv

    hf_dir = str(tmp_path / "hf_qwen2_llava")
    hf_model, tok = make_llava(hf_dir, text="qwen2", seed=3)
    out = str(tmp_path / "mcore")
    conv.hf_to_mcore(out, hf=hf_dir)
    cfg, model, _ = load_ours(rt, out)
    lm = cfg.model.language
    assert lm.qkv_bias is True and lm.rope_theta == 1e6 and lm.norm_eps == 1e-6
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids, images=pixels, runtime_gather_output=True)[..., :lm.vocab_size]
        assert (got - want).abs().max() <= 1e-4
    reloaded = _round_trip(hf_dir, out, str(tmp_path / "back"))
    assert reloaded.config.text_config.model_type == "qwen2"


def test_siglip_vision_model_plus_qwen2(rt, tmp_path):  # noqa: F811
    """SiglipVisionModel + tied Qwen2ForCausalLM: features are hidden_states[feature_layer] (nothing dropped), text
    logits match Qwen2ForCausalLM; the export is a LLaVA with a SigLIP tower and a Qwen2 text model computing ours."""
    from transformers import LlavaForConditionalGeneration, Qwen2ForCausalLM, SiglipVisionModel

    from megavlm.convert import engine as conv
    from megavlm.data.tokenizer import build_synthetic_tokenizer

    vdir, ldir = str(tmp_path / "siglip"), str(tmp_path / "qwen2")
    torch.manual_seed(0)
    siglip = SiglipVisionModel(siglip_config())
    randomize(siglip, 7)
    siglip.save_pretrained(vdir)
    save_processor(vdir)
    tok = build_synthetic_tokenizer(ldir)
    qwen = Qwen2ForCausalLM(qwen2_config(len(tok), tie_word_embeddings=True))
    randomize(qwen, 8)
    qwen.save_pretrained(ldir)
    qwen.eval()

    out = str(tmp_path / "mcore")
    conv.hf_to_mcore(out, vision=vdir, language=ldir, feature_layer=-2)
    cfg, model, _ = load_ours(rt, out)
    assert cfg.model.vision.flavour == "siglip" and cfg.model.language.qkv_bias
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        want = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = model.vision_model(pixels)
        assert got.shape == want.shape == (2, N_IMG, 32)
        assert (got - want).abs().max() <= 1e-5
        text = ids[:, N_IMG + 6:]
        want = qwen(input_ids=text).logits
        got = model(input_ids=text, images=None, runtime_gather_output=True)[..., :len(tok)]
        assert (got - want).abs().max() <= 1e-4
        assert want.abs().max() > 0.5

        back = conv.mcore_to_hf(out, str(tmp_path / "hf"))
        exported = LlavaForConditionalGeneration.from_pretrained(back).eval()
        c = exported.config
        assert (c.vision_config.model_type, c.text_config.model_type) == ("siglip_vision_model", "qwen2")
        assert c.vision_feature_select_strategy == "full" and c.vision_config.hidden_act == "gelu_pytorch_tanh"
        want = model(input_ids=ids, images=pixels, runtime_gather_output=True)[..., :len(tok)]
        assert (exported(input_ids=ids, pixel_values=pixels).logits - want).abs().max() <= 1e-4


def test_error_siglip_llava_default_strategy(rt, siglip_llava, tmp_path):  # noqa: F811
    """HF's 'default' would drop a SigLIP patch token (there is no class token): refused, nothing written."""
    import json
    import shutil

    from megavlm.convert import engine as conv
    from megavlm.errors import UserError

    d = tmp_path / "bad"
    shutil.copytree(siglip_llava[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    with pytest.raises(UserError, match=r"vision_feature_select_strategy='default' with a SigLIP tower"):
        conv.hf_to_mcore(str(out), hf=str(d))
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith("o.tmp")]
