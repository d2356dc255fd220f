"""Tiny random HF models for the conversion tests (fp32, CPU), saved with save_pretrained."""

from __future__ import annotations

import os

import torch

IMAGE_SIZE, PATCH = 16, 8
N_IMG = (IMAGE_SIZE // PATCH) ** 2  # image tokens per image (select_strategy=default)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")


def siglip_config():
    from transformers import SiglipVisionConfig

    # layer_norm_eps differs from our default (1e-5) and SigLIP's (1e-6) so that the mapping is exercised
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-3,
                              hidden_act="gelu_pytorch_tanh")


def qwen2_config(vocab_size: int, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6, **kw)


def text_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5, **kw)


def randomize(model, seed: int) -> None:
    """Every parameter random (norm weights around 1), so a wrong mapping cannot hide behind an init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "layrnorm" in name:
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def save_processor(folder: str) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=MEAN, image_std=STD).save_pretrained(folder)


def make_llava(folder: str, extra_vocab: int = 3, seed: int = 0, vision: str = "clip", text: str = "llama",
               **text_kw):
    """A LlavaForConditionalGeneration with the synthetic tokenizer (``<image>`` = 4); the embeddings have
    ``extra_vocab`` rows more than the tokenizer (like llava-hf's padding to 64). ``vision``: clip | siglip
    (select strategy 'full': SigLIP has no class token); ``text``: llama | qwen2."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megavlm.data.tokenizer import build_synthetic_tokenizer, image_token_id

    tok = build_synthetic_tokenizer(folder)
    text_cfg = {"llama": text_config, "qwen2": qwen2_config}[text](len(tok) + extra_vocab, **text_kw)
    cfg = LlavaConfig(vision_config=siglip_config() if vision == "siglip" else vision_config(), text_config=text_cfg,
                      image_token_index=image_token_id(tok), vision_feature_layer=-2,
                      vision_feature_select_strategy="full" if vision == "siglip" else "default",
                      image_seq_length=N_IMG)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    randomize(model, seed)
    model.save_pretrained(folder)
    save_processor(folder)
    return model.eval(), tok


def make_clip_llama(vision_dir: str, language_dir: str, seed: int = 0):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from megavlm.data.tokenizer import build_synthetic_tokenizer

    torch.manual_seed(seed)
    clip = CLIPVisionModel(vision_config())
    randomize(clip, seed)
    clip.save_pretrained(vision_dir)
    save_processor(vision_dir)
    tok = build_synthetic_tokenizer(language_dir)
    llama = LlamaForCausalLM(text_config(len(tok)))
    randomize(llama, seed + 1)
    llama.save_pretrained(language_dir)
    return clip.eval(), llama.eval(), tok


def sample_inputs(vocab: int, image_token: int, seq: int = 20, seed: int = 0):
    """Two sequences with one image each (N_IMG image tokens) and normalized float pixel_values (2, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, seq), generator=g)
    ids[0, 1:1 + N_IMG] = image_token
    ids[1, 5:5 + N_IMG] = image_token
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, pixels


def newest_dir(path: str) -> str:
    return os.path.join(path, sorted(os.listdir(path))[-1])
