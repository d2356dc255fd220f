"""LoRA in one process (TP=1/PP=1) against transformers and peft on tiny random LLaVA (CLIP + LLaMA), InternVL
(InternViT + Qwen2), Qwen2-VL and Qwen2.5-VL models: a fresh adapter leaves the model unchanged; `convert mcore-to-hf`
merges the adapters (transformers on the merged folder gives megavlm's logits on the LoRA checkpoint); the PEFT
adapter folder loaded with peft onto the base export gives them too; generate/eval load the adapters."""

import json
import os
import sys

import pytest
import torch

import hf_models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "families"))

pytestmark = pytest.mark.slow


class Inputs:
    """A micro-batch of two prompts for our model and for transformers', and the first prompt's images alone."""

    def __init__(self, ids, pixels, n_first, grid=None, hf=None, hf_first=None, grid_first=None):
        self.ids, self.pixels, self.grid, self.hf = ids, pixels, grid, hf or {}
        self.first_pixels, self.first_grid, self.hf_first = pixels[:n_first], grid_first, hf_first or {}

    def ours(self, model):
        with torch.no_grad():
            return model(input_ids=self.ids, images=self.pixels, image_grid=self.grid, runtime_gather_output=True,
                         position_ids=model.position_ids(self.ids, self.grid))

    def theirs(self, model):
        with torch.no_grad():
            return model(input_ids=self.ids, pixel_values=self.pixels, **self.hf).logits


def _llava(folder):
    from transformers import LlavaForConditionalGeneration

    model, tok = hf_models.make_llava(folder)
    # two prompts, one image each
    return model, tok, LlavaForConditionalGeneration, lambda seed: Inputs(
        *hf_models.sample_inputs(len(tok), 4, seed=seed), n_first=1)


def _internvl(folder):
    from transformers import InternVLForConditionalGeneration

    import test_internvl

    model, tok = test_internvl.make_internvl(folder, seed=2)
    # the first prompt's image is 3 tiles (2×1 + thumbnail), the second's 1
    return model, tok, InternVLForConditionalGeneration, lambda seed: Inputs(
        *test_internvl.sample_inputs(tok, seed=seed), n_first=3)


def _qwen(variant):
    def make(folder):
        import test_qwen2_vl

        model, tok = test_qwen2_vl.make_qwen(folder, variant, seed=2)

        def inputs(seed):  # the first prompt holds two images of different sizes, the second one
            ids, pixels, grids, mm = test_qwen2_vl.sample_inputs(tok, seed=seed)
            return Inputs(ids, pixels, int(grids[:2].prod(-1).sum()), grid=grids,
                          hf={"image_grid_thw": grids, "mm_token_type_ids": mm}, grid_first=grids[:2],
                          hf_first={"image_grid_thw": grids[:2], "mm_token_type_ids": mm[:1]})
        return model, tok, type(model), inputs
    return make


TEXT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: family → (HF model maker, HF module names of one decoder layer and one vision layer that get an adapter)
FAMILIES = {
    "llava": (_llava, TEXT, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "internvl": (_internvl, TEXT, ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")),
    "qwen2_vl": (_qwen("qwen2_vl"), TEXT, ("qkv", "proj", "fc1", "fc2")),
    "qwen2_5_vl": (_qwen("qwen2_5_vl"), TEXT, ("qkv", "proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def lora_ckpt(rt, request, tmp_path_factory):
    """A converted tiny model, loaded into a LoRA model (adapters on the LLM and the vision tower), the adapters given
    random values (as training would), saved as a megavlm checkpoint. Returns a dict."""
    from megavlm import families
    from megavlm.config import load_config, to_dict
    from megavlm.convert import engine as conv
    from megavlm.data.constants import image_token_id
    from megavlm.models import lora
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    hf_dir = str(root / "hf")
    hf_model, tok, hf_cls, inputs = FAMILIES[request.param][0](hf_dir)
    out = str(root / "mcore")
    base = conv.hf_to_mcore(out, hf=hf_dir)
    cfg = load_config(os.path.join(out, "config.yaml"),
                      ["model.spec=local", "model.kernels=reference", "model.lora.rank=4", "model.lora.alpha=8",
                       "model.lora.vision=true", "model.lora.targets=[qkv,proj,fc1,fc2]"])
    model = build_model(cfg, rt, cfg.model.language.vocab_size,
                        image_token_id(tok, families.of(cfg).image_token))
    ckpt.load(base, model, None, same_layout=False)
    model.eval()
    vocab = cfg.model.language.vocab_size
    x = inputs(0)
    fresh, want = x.ours(model)[..., :vocab], x.theirs(hf_model)
    # B = 0 at the start: the adapted model computes the base model's logits
    assert (fresh - want).abs().max().item() <= 1e-4
    adapted = lora.adapted(model)
    n_vision = families.of(cfg).vision_arch(cfg).num_layers  # layers built
    assert len(adapted) == 4 * (cfg.model.language.num_layers + n_vision)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, lin in adapted:
            assert torch.count_nonzero(lin.lora_b) == 0 and lin.lora_a.abs().max() > 0
            lin.lora_b.copy_(0.05 * torch.randn(lin.lora_b.shape, generator=g))
    common = dict(ckpt.load_common(base), config=to_dict(cfg))
    for k in ("format_version", "step", "has_optimizer", "has_data_state", "state_blobs"):
        common.pop(k, None)
    path = ckpt.save(os.path.join(out, "lora_checkpoints"), 1, model, None, common, rng=False)
    return dict(family=request.param, hf_model=hf_model, hf_cls=hf_cls, tok=tok, inputs=inputs, out=out, path=path,
                model=model, vocab=vocab, n_text=cfg.model.language.num_layers, n_vision=n_vision)


def test_merged_export_and_peft_adapter_match_megavlm(rt, lora_ckpt, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from megavlm.convert import engine as conv

    c = lora_ckpt
    x = c["inputs"](1)
    ours = x.ours(c["model"])[..., :c["vocab"]]
    base_logits = x.theirs(c["hf_model"])
    assert (ours - base_logits).abs().max() > 1e-2  # the adapters change the model: not a degenerate comparison

    merged_dir = conv.mcore_to_hf(c["path"], str(tmp_path / "merged"))
    merged = c["hf_cls"].from_pretrained(merged_dir).eval()
    diff = (x.theirs(merged) - ours).abs().max().item()
    assert diff <= 1e-4, diff

    adapter = str(tmp_path / "adapter")
    base_dir = conv.mcore_to_hf(c["path"], str(tmp_path / "base"), merge_lora=False, lora_adapter=adapter)
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        acfg = json.load(f)
    assert (acfg["peft_type"], acfg["r"], acfg["lora_alpha"]) == ("LORA", 4, 8.0)
    assert acfg["base_model_name_or_path"] == base_dir
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # the fused qkv / fc1 adapters as HF's separate projections, the LLM's and the vision tower's
    _, text_names, vision_names = FAMILIES[c["family"]]
    for name in text_names + vision_names:
        assert any(f".{name}.lora_A.weight" in k for k in keys) and any(f".{name}.lora_B.weight" in k for k in keys)
    base = c["hf_cls"].from_pretrained(base_dir).eval()
    diff_base = (x.theirs(base) - base_logits).abs().max().item()
    assert diff_base <= 1e-4, diff_base  # --no-merge: the base weights
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert n_lora == len(acfg["target_modules"]) == len(text_names) * c["n_text"] + len(vision_names) * c["n_vision"]
    diff_peft = (x.theirs(peft_model) - ours).abs().max().item()
    assert diff_peft <= 1e-4, diff_peft


def test_generate_and_eval_load_the_adapters(rt, lora_ckpt, tmp_path):
    """The inference loader (generate, eval, serve) on the LoRA checkpoint, given a config that does not mention LoRA
    (eval's run config), builds the adapters: greedy tokens equal transformers' generate on the merged export."""
    from megavlm.config import load_config, single_layout
    from megavlm.convert import engine as conv
    from megavlm.inference.generate import generate
    from megavlm.inference.load import build_and_load

    c = lora_ckpt
    cfg = load_config(os.path.join(c["out"], "config.yaml"), ["model.spec=local", "model.kernels=reference"])
    assert cfg.model.lora.rank == 0
    icfg = single_layout(cfg)
    model = build_and_load(icfg, c["path"], c["tok"], rt)
    assert icfg.model.lora.rank == 4
    x = c["inputs"](2)
    vocab = c["vocab"]
    torch.testing.assert_close(x.ours(model)[..., :vocab], x.ours(c["model"])[..., :vocab], rtol=0, atol=1e-6)
    n = 8
    extra = {} if x.first_grid is None else {"image_grid": x.first_grid}
    got = generate(model, [x.ids[0]], x.first_pixels, n, None, vocab_size=vocab, **extra).tokens[0]
    merged = c["hf_cls"].from_pretrained(conv.mcore_to_hf(c["path"], str(tmp_path / "m"))).eval()
    merged.generation_config.eos_token_id = None
    with torch.no_grad():
        want = merged.generate(input_ids=x.ids[:1], pixel_values=x.first_pixels, do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0, **x.hf_first)[0, x.ids.shape[1]:].tolist()
    assert got == want, (got, want)
