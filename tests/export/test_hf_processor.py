"""Issue 19, item 0: an HF export that serving stacks can load. `convert mcore-to-hf` writes the processor
(processor_config.json) and the chat template of the family's conversation template, so that
`AutoProcessor.from_pretrained(export)` → `apply_chat_template` → the HF model's `generate` gives exactly the prompt
ids and tokens of `megavlm generate --image --prompt`, for every family."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "convert"))
sys.path.insert(0, os.path.join(TESTS, "families"))

from hf_models import IMAGE_SIZE, make_llava  # noqa: E402
from test_internvl import make_internvl  # noqa: E402

PROMPT = "what color is the circle ?"
NEW = 6


def _png(path: str, w: int, h: int, seed: int = 0) -> str:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _convert_both_ways(hf: str, root) -> tuple[str, str]:
    from megavlm.convert import engine

    mv, back = str(root / "mv"), str(root / "back")
    engine.hf_to_mcore(mv, hf=hf)
    engine.mcore_to_hf(mv, back)
    return mv, back


def _megavlm_generate(mv: str, png: str) -> dict:
    from megavlm.inference.command import Request, run

    return run(Request(ckpt=mv, image=png, prompt=PROMPT, max_new_tokens=NEW, ignore_eos=True, output="json"))


def _hf_generate(model, inputs) -> list[int]:
    """Greedy tokens of the HF model, with each step's top-1 margin checked (a tie could flip either way)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
    assert min(margins) > 1e-3, margins
    return gen.sequences[0, inputs["input_ids"].shape[1]:].tolist()


def _messages(png: str) -> list[dict]:
    from PIL import Image

    return [{"role": "user", "content": [{"type": "image", "image": Image.open(png).convert("RGB")},
                                         {"type": "text", "text": PROMPT}]}]


def test_llava_export_loads_in_autoprocessor_and_generates_as_megavlm(rt, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    hf = str(tmp_path / "hf")
    make_llava(hf, seed=3)
    mv, back = _convert_both_ways(hf, tmp_path)
    files = set(os.listdir(back))
    assert {"processor_config.json", "chat_template.jinja", "preprocessor_config.json"} <= files, files
    pc = json.load(open(os.path.join(back, "processor_config.json")))
    assert (pc["processor_class"], pc["patch_size"], pc["vision_feature_select_strategy"],
            pc["num_additional_image_tokens"], pc["image_token"]) == ("LlavaProcessor", 8, "default", 1, "<image>")

    png = _png(str(tmp_path / "img.png"), IMAGE_SIZE, IMAGE_SIZE)
    want = _megavlm_generate(mv, png)
    proc = AutoProcessor.from_pretrained(back)
    assert isinstance(proc, LlavaProcessor) and proc.patch_size == 8
    text = proc.apply_chat_template(_messages(png), add_generation_prompt=True)
    assert text == "<s> USER: <image> " + PROMPT + " ASSISTANT:"  # vicuna, the image where training puts it
    inputs = proc.apply_chat_template(_messages(png), add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == want["prompt_ids"]
    model = LlavaForConditionalGeneration.from_pretrained(back).eval()
    assert _hf_generate(model, inputs) == want["generated_ids"]


def test_siglip_processor_counts_the_image_tokens_megavlm_gives(rt, tmp_path):
    """SigLIP has no class token: HF's strategy 'full' with no additional token = (size/patch)² = ours."""
    from transformers import AutoProcessor

    from megavlm import families
    from megavlm.config import load_config

    hf = str(tmp_path / "hf")
    make_llava(hf, seed=1, vision="siglip")
    mv, back = _convert_both_ways(hf, tmp_path)
    cfg = load_config(os.path.join(mv, "config.yaml"))
    proc = AutoProcessor.from_pretrained(back)
    png = _png(str(tmp_path / "img.png"), IMAGE_SIZE, IMAGE_SIZE)
    from PIL import Image

    ids = proc(images=Image.open(png), text="<image> hi", return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(proc.image_token_id) == families.of(cfg).image_tokens(cfg) == (IMAGE_SIZE // 8) ** 2


def _internvl_processor(back: str, monkeypatch):
    """``AutoProcessor.from_pretrained`` of an InternVL export. transformers 5 builds InternVLProcessor with a video
    processor, which needs torchvision (not installed here: serving stacks have it); the test stands None in for the
    video processor and lets transformers do everything else — read the files, the tokenizer's named image tokens,
    the template, the tiling and the expansion of each image."""
    from transformers import AutoProcessor
    from transformers import processing_utils as pu
    from transformers.models.auto import video_processing_auto

    try:
        import torchvision  # noqa: F401
    except ImportError:
        check = pu.ProcessorMixin.check_argument_for_proper_class
        monkeypatch.setattr(pu.ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: (
            None if name == "video_processor" and arg is None else check(self, name, arg)))
        monkeypatch.setattr(video_processing_auto.AutoVideoProcessor, "from_pretrained",
                            classmethod(lambda cls, *a, **k: None))
    return AutoProcessor.from_pretrained(back)


def test_internvl_export_tiles_and_generates_as_megavlm(rt, tmp_path, monkeypatch):
    """A 40×20 image: 2×1 tiles + thumbnail, <img> + 3 × 4 context tokens + </img>, through transformers' own
    InternVLProcessor and the exported chat template (chatml)."""
    from transformers import InternVLForConditionalGeneration

    hf = str(tmp_path / "hf")
    make_internvl(hf, seed=7)
    mv, back = _convert_both_ways(hf, tmp_path)
    pc = json.load(open(os.path.join(back, "processor_config.json")))
    assert pc == {"image_seq_length": 4, "processor_class": "InternVLProcessor"}
    png = _png(str(tmp_path / "img.png"), 40, 20)
    want = _megavlm_generate(mv, png)
    proc = _internvl_processor(back, monkeypatch)
    assert type(proc).__name__ == "InternVLProcessor"
    text = proc.apply_chat_template(_messages(png), add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<IMG_CONTEXT>\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"), text
    inputs = proc.apply_chat_template(_messages(png), add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids == want["prompt_ids"] and ids.count(proc.image_token_id) == 12
    assert inputs["pixel_values"].shape[0] == 3
    model = InternVLForConditionalGeneration.from_pretrained(back).eval()
    assert _hf_generate(model, inputs) == want["generated_ids"]
    # the tokenizer was not grown past the embeddings, and the video token is its own
    assert len(proc.tokenizer) <= model.config.text_config.vocab_size
    assert proc.video_token not in (proc.image_token, proc.start_image_token)


def test_internvl_tokenizer_without_spare_rows_keeps_its_size(rt, tmp_path):
    """With no spare embedding row the export adds no <video> token (</img> stands in for it)."""
    from megavlm import families
    from megavlm.config import Config, ModelConfig
    from megavlm.data.tokenizer import load_tokenizer

    hf = str(tmp_path / "hf")
    _, tok = make_internvl(hf, seed=1)
    cfg = Config(model=ModelConfig(family="internvl"))
    cfg.model.language.vocab_size = len(tok)
    cfg.data.template = "chatml"
    out = tmp_path / "out"
    out.mkdir()
    families.of(cfg).export_processor(cfg, str(out), load_tokenizer(hf))
    again = load_tokenizer(str(out))
    assert len(again) == len(tok) and again.video_token == "</img>"
