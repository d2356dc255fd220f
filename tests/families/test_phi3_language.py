"""A Phi-3 decoder (transformers' ``Phi3ForCausalLM``: fused ``qkv_proj`` / ``gate_up_proj``, partial rotary,
LongRoPE) as ``--language`` of the LLaVA path: text logits equal transformers' at a length below and one above
``original_max_position_embeddings`` (short and long LongRoPE factors; megatron-core has no LongRoPE, models/rope.py
is ours), and the decoder's tensors come back bit-identical in the exported LLaVA with a ``Phi3Config`` text config."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

from hf_models import make_clip_llama, randomize  # noqa: E402

ORIG = 32  # original_max_position_embeddings


def make_phi3(folder: str, vocab: int, seed: int = 3):
    from transformers import Phi3Config, Phi3ForCausalLM

    g = torch.Generator().manual_seed(seed)
    rot = 16 * 3 // 4  # head dim 16, partial rotary 0.75 → 12 rotary channels, 6 frequencies
    short = (1.0 + torch.rand(rot // 2, generator=g)).tolist()
    long = (2.0 + 6.0 * torch.rand(rot // 2, generator=g)).tolist()
    cfg = Phi3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=ORIG,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                      "short_factor": short, "long_factor": long},
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(cfg)
    randomize(model, seed)
    model.save_pretrained(folder)
    return model.eval()


def test_phi3_language_longrope_matches_transformers_and_round_trips(rt, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megavlm.config import load_config
    from megavlm.convert import engine
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    clip_dir, lang_dir = str(tmp_path / "clip"), str(tmp_path / "phi3")
    _, _, tok = make_clip_llama(clip_dir, lang_dir)  # (its LLaMA is replaced by the Phi-3 below; tokenizer kept)
    for f in os.listdir(lang_dir):
        if f.startswith("model") or f == "config.json":
            os.remove(os.path.join(lang_dir, f))
    phi3 = make_phi3(lang_dir, len(tok))
    out = str(tmp_path / "mcore")
    engine.hf_to_mcore(out, vision=clip_dir, language=lang_dir)
    cfg = load_config(os.path.join(out, "config.yaml"), ["model.spec=local", "model.kernels=reference"])
    lm = cfg.model.language
    assert lm.rope_attention_factor > 1.1  # sqrt(1 + ln(128/32) / ln 32): the factor on cos and sin is exercised
    assert (lm.hf_layout, lm.rope_type, lm.rotary_percent, lm.rope_original_max_positions) == ("phi3", "longrope",
                                                                                             0.75, ORIG)
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, rt, lm.vocab_size, image_token_id(tok))
    ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = phi3.config.vocab_size
    ids = torch.randint(5, vocab, (2, 48), generator=g)
    for s in (24, 48):  # below and above original_max_position_embeddings
        with torch.no_grad():
            want = phi3(input_ids=ids[:, :s]).logits
            got = model(input_ids=ids[:, :s], images=None, runtime_gather_output=True)[..., :vocab]
        assert (got - want).abs().max() <= 1e-4, s
    with torch.no_grad():  # a real check of the switch: the long factors move even the first 24 positions
        assert (phi3(input_ids=ids).logits[:, :24] - phi3(input_ids=ids[:, :24]).logits).abs().max() > 1e-2

    back = engine.mcore_to_hf(out, str(tmp_path / "back"))
    a = load_file(os.path.join(lang_dir, "model.safetensors"))
    b = load_file(os.path.join(back, "model.safetensors"))
    for k, t in a.items():
        name = "language_model." + k  # (transformers 5's LLaVA layout as megavlm writes it: language_model.model.*)
        assert torch.equal(b[name][:t.shape[0]], t), k
    tc = AutoConfig.from_pretrained(back).text_config
    rp = tc.rope_parameters
    assert tc.model_type == "phi3" and rp["rope_type"] == "longrope" and rp["partial_rotary_factor"] == 0.75
    assert rp["short_factor"] == phi3.config.rope_parameters["short_factor"]
    assert rp["original_max_position_embeddings"] == ORIG


def test_phi3_vision_from_clip_and_phi3(rt, tmp_path):
    """Phi-3-Vision from its parts (model.family=phi4mm, --vision CLIP --language Phi3ForCausalLM): the CLIP tower on
    HD crops (class token, pre-LayerNorm, read at layer -2, the class token dropped) equals transformers'
    CLIPVisionModel's hidden_states[-2][:, 1:], the decoder's text logits equal Phi3ForCausalLM's, the fresh projector
    takes the 2×2 concatenation (4× the vision width), an image of HD crops runs through, and the export is refused
    (there is no transformers class for Phi-3-Vision)."""
    import pytest
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from megavlm.config import load_config
    from megavlm.convert import engine
    from megavlm.data.synthetic import build_synthetic_tokenizer
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.errors import UserError
    from megavlm.models.hd import crop_masks
    from megavlm.models.vlm import build_model
    from megavlm.shapes import hd_tokens
    from megavlm.training import checkpoint as ckpt

    clip_dir, lang_dir = str(tmp_path / "clip"), str(tmp_path / "phi3")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=32, patch_size=4,
                                            hidden_act="quick_gelu"))
    randomize(clip, 1)
    clip.save_pretrained(clip_dir)
    clip.eval()
    tok = build_synthetic_tokenizer(lang_dir)
    phi3 = make_phi3(lang_dir, len(tok))
    out = str(tmp_path / "mcore")
    engine.hf_to_mcore(out, vision=clip_dir, language=lang_dir, family="phi4mm")
    cfg = load_config(os.path.join(out, "config.yaml"), ["model.spec=local", "model.kernels=reference"])
    v = cfg.model.vision
    assert (cfg.model.family, v.flavour, v.feature_layer, cfg.model.projector.pool) == ("phi4mm", "clip", -2,
                                                                                      "shuffle2x2")
    tok = load_tokenizer(cfg.data.tokenizer)
    img = image_token_id(tok, "<|endoftext10|>")
    model = build_model(cfg, rt, cfg.model.language.vocab_size, img)
    ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    model.eval()
    assert model.projector.encoder.linear_fc1.weight.shape[1] == 4 * 32
    g = torch.Generator().manual_seed(1)
    crops = torch.randn(7, 3, 32, 32, generator=g)
    grid = (2, 3, 16, 24)  # a whole 2×3 grid: Phi-3-Vision pads with pixels, not with a mask
    with torch.no_grad():
        want = clip(pixel_values=crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = model.vision_model(crops, crop_masks(grid, 8))
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
        ids = torch.randint(5, 28, (1, 20), generator=g)
        vocab = phi3.config.vocab_size
        assert (model(input_ids=ids, images=None, runtime_gather_output=True)[..., :vocab]
                - phi3(input_ids=ids).logits).abs().max() <= 1e-4
        n = hd_tokens(grid, 8)
        with_image = torch.cat([ids[:, :3], torch.full((1, n), img), ids[:, 3:]], dim=1)
        logits = model(input_ids=with_image, images=crops, image_grid=torch.tensor([grid]),
                       runtime_gather_output=True)
        assert logits.shape[1] == 20 + n and bool(torch.isfinite(logits).all())
    with pytest.raises(UserError, match="no transformers class"):
        engine.mcore_to_hf(out, str(tmp_path / "back"))


def test_longrope_config_errors_name_the_key():
    import pytest

    from megavlm.config import ConfigError, load_config, validate

    base = ["model.language.rope_type=longrope", "model.language.rope_original_max_positions=32"]
    # head dim 128/4 = 32 → 16 frequencies
    for extra, needle in ((["model.language.rope_short_factor=[1.0, 2.0]", "model.language.rope_long_factor=[1.0]"],
                           r"model\.language\.rope_short_factor must list 16 factors"),
                          (["model.language.rope_type=yarn"], r"model\.language\.rope_type='yarn'"),
                          (["model.language.hf_layout=gpt2"], r"model\.language\.hf_layout='gpt2'")):
        with pytest.raises(ConfigError, match=needle):
            validate(load_config(None, base + extra), 1)
    ok = base + [f"model.language.rope_{k}_factor=[{', '.join(['1.5'] * 16)}]" for k in ("short", "long")]
    validate(load_config(None, ok), 1)
    with pytest.raises(ConfigError, match=r"rope_original_max_positions=0"):
        validate(load_config(None, ok + ["model.language.rope_original_max_positions=0"]), 1)
