"""A model family written here, in the test, and nowhere else: a LLaVA variant with a linear projector, its own HF
``model_type`` and its own conversation template. Registered through ``megavlm.families`` alone, it converts (HF →
megatron → HF bit-identical), trains (from shards, with its template), and generates through ``megavlm generate``'s
code path the tokens a reference assembled from transformers' own CLIP and LLaMA modules decodes greedily.

This is the test to copy for a new family (docs/families.md)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

import hf_models  # noqa: E402

TOY = "toy_linear"
N_NEW = 6


def _toy_family():
    """The family: LLaVA's sections with a projector section whose default is ``linear``, LLaVA's mappings, and an
    HF format of its own (LLaVA's tensor names, one projector layer, config.json with ``model_type: toy_linear``)."""
    from dataclasses import dataclass

    from megavlm.config import LanguageConfig
    from megavlm.families.llava import LlavaFamily, ProjectorConfig, VisionConfig

    @dataclass
    class ToyProjectorConfig(ProjectorConfig):
        #: one Linear, no GELU
        type: str = "linear"

    class _ConfigFile:
        def __init__(self, d: dict):
            self.d = d

        def save_pretrained(self, folder: str) -> None:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(self.d, f, indent=1)

    class ToyFamily(LlavaFamily):
        name = TOY
        model_types = (TOY,)
        sections = {"vision": VisionConfig, "projector": ToyProjectorConfig, "language": LanguageConfig}
        default_template = "toy_chat"

        def read_hf(self, inputs, options, tp, pp):
            from transformers import LlavaConfig

            with open(os.path.join(inputs["hf"], "config.json")) as f:
                d = json.load(f)
            d.pop("model_type")
            return self.read_llava_config(LlavaConfig.from_dict(d), inputs["hf"], tp, pp)

        def export_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
            d = self.llava_config(cfg, stored, tok, vocab_size, image_token_id, dtype, extras).to_dict()
            d.update(model_type=TOY, architectures=["ToyLinearVLM"])
            return _ConfigFile(d)

    return ToyFamily()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Registers the toy template and family; writes the toy HF folder (from a random tiny LLaVA: linear_2 dropped,
    model_type renamed), a 16×16 image and synthetic shards. Unregisters both afterwards."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from megavlm import families
    from megavlm.data.synthetic import build_synthetic_tokenizer, write_synthetic_shards
    from megavlm.data.templates import TEMPLATES, ConversationTemplate, register_template

    register_template(ConversationTemplate(name="toy_chat", prefix="<s>", user_prefix="Q:", assistant_prefix="A:",
                                           answer_suffix="</s>", in_synthetic_vocab=False))
    families.register(_toy_family())
    root = tmp_path_factory.mktemp("toy")
    hf = str(root / "hf")
    hf_models.make_llava(hf, seed=1)
    build_synthetic_tokenizer(hf, templates=["toy_chat"])  # the toy's tokenizer knows its template's words
    sd = load_file(os.path.join(hf, "model.safetensors"))
    sd = {k: v for k, v in sd.items() if ".linear_2." not in k}
    save_file(sd, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf, "config.json")) as f:
        d = json.load(f)
    d["model_type"] = TOY
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(d, f)
    png = str(root / "image.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (hf_models.IMAGE_SIZE, hf_models.IMAGE_SIZE, 3), dtype=np.uint8)).save(png)
    shards = str(root / "shards")
    write_synthetic_shards(shards, 16, hf_models.IMAGE_SIZE, shard_size=16)
    yield {"root": root, "hf": hf, "png": png, "shards": shards, "sd": sd}
    families.unregister(TOY)
    TEMPLATES.pop("toy_chat", None)


def _tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_registry_finds_the_family(toy):
    from megavlm import families
    from megavlm.config import ConfigError, load_config

    assert families.for_model_type(TOY).name == TOY
    cfg = load_config(None, [f"model.family={TOY}"])
    assert cfg.model.projector.type == "linear"  # the family's own section
    assert families.of(cfg).projector_arch(cfg).kind == "affine"
    with pytest.raises(ConfigError, match="model.family='toy_lineer' is not a known model family; did you mean"):
        load_config(None, ["model.family=toy_lineer"])


def test_converts_trains_and_generates(rt, toy):
    """HF → megatron → HF bit-identical; then three training steps from shards with the toy template; then the
    trained checkpoint generates (megavlm generate's code path) what transformers' modules, loaded with the exported
    weights, decode greedily."""
    from megavlm.config import load_config
    from megavlm.convert import engine
    from megavlm.inference.command import Request, run
    from megavlm.training import checkpoint as ckpt
    from megavlm.training.trainer import Trainer

    root = toy["root"]
    mc = str(root / "mcore")
    engine.hf_to_mcore(mc, hf=toy["hf"])  # the family comes from config.json's model_type
    cfg = load_config(os.path.join(mc, "config.yaml"))
    assert (cfg.model.family, cfg.model.projector.type, cfg.data.template) == (TOY, "linear", "toy_chat")
    back = engine.mcore_to_hf(mc, str(root / "back"))
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["model_type"] == TOY
    got = _tensors(back)
    assert set(got) == set(toy["sd"]) and all(torch.equal(got[k], toy["sd"][k]) for k in got)

    # ---- train: shards encoded with the family's template, stage 2 (the vision tower frozen) ----
    run_dir = str(root / "run")
    cfg = load_config(os.path.join(mc, "config.yaml"), [
        "data.source=shards", f"data.shards={toy['shards']}", "train.steps=3", "train.global_batch=4",
        "train.micro_batch=2", "train.warmup_steps=0", "train.lr=1e-2", "model.spec=local",
        "model.kernels=reference", f"run_dir={run_dir}", "logging.tensorboard=false"])
    out = Trainer(cfg).run()
    assert len(out["losses"]) == 3 and all(np.isfinite(out["losses"]))
    trained = ckpt.find_checkpoint(run_dir)
    assert ckpt.saved_config(trained).model.family == TOY
    exported = _tensors(engine.mcore_to_hf(run_dir, str(root / "trained_hf"),
                                           hf_extra=os.path.join(mc, engine.EXTRA_FILE)))  # the tower's unused rest
    proj = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(exported[proj], toy["sd"][proj])  # trained
    tower = [k for k in exported if k.startswith("vision_tower.")]
    assert tower and all(torch.equal(exported[k], toy["sd"][k]) for k in tower)  # frozen in stage 2

    # ---- generate, against a reference built from transformers' CLIP and LLaMA modules ----
    res = run(Request(ckpt=run_dir, image=toy["png"], prompt="what color is the square ?", max_new_tokens=N_NEW,
                      ignore_eos=True, output="json"))
    prompt = res["prompt_ids"]
    from megavlm.data.tokenizer import load_tokenizer

    text = load_tokenizer(os.path.join(run_dir, "tokenizer")).decode(prompt)
    assert text.startswith("<s>") and "Q" in text and text.rstrip().endswith("A :")  # the toy template
    want, margins = _reference_greedy(str(root / "trained_hf"), toy["png"], prompt, N_NEW)
    assert min(margins) > 1e-3, margins  # a real comparison: no near-tie that rounding could flip
    assert res["generated_ids"] == want


def _reference_greedy(folder: str, png: str, prompt: list[int], n: int):
    """Greedy decoding with transformers' ``CLIPVisionModel`` (hidden_states[feature_layer], class token dropped),
    the linear projector as ``F.linear``, and ``LlamaForCausalLM`` on ``inputs_embeds``; image normalized as the HF
    processor does (the image is already 16×16). Returns the tokens and each step's top-1 margin."""
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    sd = _tensors(folder)
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    vision = CLIPVisionModel(CLIPVisionConfig(**c["vision_config"])).eval()
    vision.load_state_dict({k[len("vision_tower."):]: v for k, v in sd.items()
                            if k.startswith("vision_tower.")})
    lm = LlamaForCausalLM(LlamaConfig(**c["text_config"])).eval()
    lm.load_state_dict({k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")})
    x = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0)
    x = ((x - torch.tensor(hf_models.MEAN)) / torch.tensor(hf_models.STD)).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        feats = vision(pixel_values=x, output_hidden_states=True).hidden_states[c["vision_feature_layer"]][:, 1:]
        image = torch.nn.functional.linear(feats, sd["multi_modal_projector.linear_1.weight"],
                                           sd["multi_modal_projector.linear_1.bias"])[0]
        ids = torch.tensor([prompt])
        is_image = ids[0] == c["image_token_index"]
        out, margins = [], []
        for _ in range(n):
            emb = lm.get_input_embeddings()(ids)
            emb[0, is_image] = image
            logits = lm(inputs_embeds=emb).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            nxt = int(logits.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            is_image = torch.cat([is_image, torch.tensor([False])])
    return out, margins
