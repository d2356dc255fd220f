"""HF LLaVA ↔ megatron conversion in one process (TP=1/PP=1), checked against transformers on tiny random models."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_models import IMAGE_SIZE, MEAN, N_IMG, STD, make_clip_llama, make_llava, sample_inputs
from megavlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_RUNTIME_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")




@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_llava"))
    model, tok = make_llava(d)
    return d, model, tok


@pytest.fixture(scope="module")
def converted(rt, llava, tmp_path_factory):
    from megavlm.convert import engine as conv

    out = str(tmp_path_factory.mktemp("conv") / "mcore")
    path = conv.hf_to_mcore(out, hf=llava[0], tp=2, pp=2)
    return out, path


def load_ours(rt, out_dir):
    """Our VLM from a convert output at TP=1/PP=1 (as `megavlm train OUT/config.yaml` would build it)."""
    from megavlm.config import load_config
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    cfg = load_config(os.path.join(out_dir, "config.yaml"),
                      ["parallel.tp=1", "parallel.pp=1", "model.spec=local", "model.kernels=reference"])
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, rt, cfg.model.language.vocab_size, image_token_id(tok))
    common = ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    return cfg, model.eval(), common


def greedy(step_fn, ids, n=8):
    ids = ids.clone()
    out = []
    for _ in range(n):
        nxt = step_fn(ids)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(out, 1)


def test_output_layout_and_config(converted, llava):
    from megavlm.config import load_config, validate
    from megavlm.training import checkpoint as ckpt

    out, path = converted
    assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "hf_extra.safetensors", "tokenizer"]
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp" in n]
    common = ckpt.load_common(path)
    assert common["has_optimizer"] is False and common["step"] == 0 and "layout" not in common
    cfg = load_config(os.path.join(out, "config.yaml"))
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    validate(cfg, 4)
    v, lm = cfg.model.vision, cfg.model.language
    assert (v.feature_layer, v.select_strategy, v.num_layers) == (-2, "default", 3)
    assert v.image_mean == MEAN and v.image_std == STD and v.image_size == IMAGE_SIZE
    assert lm.vocab_size == len(llava[2]) + 3 and lm.num_kv_heads == 2
    assert cfg.checkpoint.load == path and ckpt.latest_checkpoint(os.path.join(out, "checkpoints")) == path


def test_logits_and_greedy_match_transformers(rt, converted, llava):
    _, hf_model, tok = llava
    cfg, model, _ = load_ours(rt, converted[0])
    vocab = cfg.model.language.vocab_size
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        want = hf_model(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids, images=pixels, runtime_gather_output=True)[..., :vocab]
        assert got.shape == want.shape
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, diff
        assert want.abs().max() > 0.5  # not a degenerate comparison
        # greedy decoding, 8 steps, same tokens
        ours = greedy(lambda x: model(input_ids=x, images=pixels, runtime_gather_output=True)[..., :vocab], ids)
        theirs = greedy(lambda x: hf_model(input_ids=x, pixel_values=pixels).logits, ids)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_round_trip_bit_identical(rt, converted, llava, tmp_path):
    from safetensors import safe_open
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megavlm.convert import engine as conv

    hf_dir, hf_model, tok = llava
    back = conv.mcore_to_hf(converted[0], str(tmp_path / "hf"))

    def tensors(d):
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = tensors(hf_dir), tensors(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    def cfg_dict(d):
        c = LlavaConfig.from_pretrained(d).to_dict()
        for k in ("transformers_version", "_name_or_path"):
            c.pop(k, None)
        return c

    assert cfg_dict(back) == cfg_dict(hf_dir)
    assert json.load(open(os.path.join(back, "preprocessor_config.json")))["image_mean"] == MEAN
    reloaded = LlavaForConditionalGeneration.from_pretrained(back).eval()
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=pixels).logits,
                           hf_model(input_ids=ids, pixel_values=pixels).logits)
        gen = reloaded.generate(input_ids=ids[:1], pixel_values=pixels[:1], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(back)) == len(tok)


def test_export_without_extras_cuts_the_tower(rt, converted, llava, tmp_path):
    """A checkpoint without hf_extra (e.g. trained from scratch): the exported tower stops at the feature layer and
    computes the same logits."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    from megavlm.convert import engine as conv

    src = tmp_path / "noextra"
    shutil.copytree(converted[0], src)
    os.remove(src / "hf_extra.safetensors")
    back = conv.mcore_to_hf(str(src), str(tmp_path / "hf"))
    m = LlavaForConditionalGeneration.from_pretrained(back).eval()
    assert m.config.vision_config.num_hidden_layers == 2 and m.config.vision_feature_layer == -1
    ids, pixels = sample_inputs(len(llava[2]), 4)
    with torch.no_grad():
        diff = (m(input_ids=ids, pixel_values=pixels).logits - llava[1](input_ids=ids, pixel_values=pixels).logits)
    assert diff.abs().max() <= 1e-5


def test_clip_plus_llama(rt, tmp_path):
    from megavlm.convert import engine as conv

    clip, llama, tok = make_clip_llama(str(tmp_path / "clip"), str(tmp_path / "llama"))
    out = str(tmp_path / "mcore")
    conv.hf_to_mcore(out, vision=str(tmp_path / "clip"), language=str(tmp_path / "llama"), feature_layer=-2)
    cfg, model, _ = load_ours(rt, out)
    ids, pixels = sample_inputs(len(tok), 4)
    with torch.no_grad():
        want = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = model.vision_model(pixels)
        assert got.shape == want.shape == (2, N_IMG, 32)
        assert (got - want).abs().max() <= 1e-5
        text = ids[:, N_IMG + 6:]
        want = llama(input_ids=text).logits
        got = model(input_ids=text, images=None, runtime_gather_output=True)[..., :len(tok)]
        assert (got - want).abs().max() <= 1e-4
        assert model.projector(got.new_zeros(3, 1, 32)).shape[-1] == 64  # fresh projector in place


def test_clip_plus_llama_adds_image_token(rt, tmp_path):
    """A LLaMA tokenizer without <image>: the token is added and the embeddings grow by one (mean-initialised)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_models import randomize, text_config
    from megavlm.convert import engine as conv

    make_clip_llama(str(tmp_path / "clip"), str(tmp_path / "unused"))
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(13)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    lang = str(tmp_path / "llama")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(lang)
    llama = LlamaForCausalLM(text_config(len(words)))
    randomize(llama, 5)
    llama.save_pretrained(lang)
    out = str(tmp_path / "mcore")
    conv.hf_to_mcore(out, vision=str(tmp_path / "clip"), language=lang)
    cfg, model, _ = load_ours(rt, out)
    assert cfg.model.language.vocab_size == len(words) + 1
    emb = model.language_model.embedding.word_embeddings.weight
    torch.testing.assert_close(emb[len(words)], llama.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(emb[: len(words)], llama.model.embed_tokens.weight)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer")).convert_tokens_to_ids("<image>") == len(words)


# --------------------------------------------------------------------------------------
# Errors: a clear message naming the key, nothing under --out
# --------------------------------------------------------------------------------------


def _assert_no_output(out):
    parent = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(parent) if n.startswith(os.path.basename(out))]


def test_error_wrong_architecture(rt, llava, tmp_path):
    from megavlm.convert import engine as conv

    out = str(tmp_path / "o1")
    with pytest.raises(UserError, match=r"model_type='llama' is not supported; expected 'llava'"):
        conv.hf_to_mcore(out, hf=_llama_dir(tmp_path))
    _assert_no_output(out)


def _llama_dir(tmp_path):
    from transformers import LlamaForCausalLM

    from hf_models import text_config

    d = str(tmp_path / "llama_only")
    LlamaForCausalLM(text_config(50)).save_pretrained(d)
    return d


def test_error_bad_shape(rt, llava, tmp_path):
    from safetensors.torch import load_file, save_file

    from megavlm.convert import engine as conv
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(llava[0], d)
    sd = load_file(str(d / "model.safetensors"))
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    sd[key] = sd[key][:-1]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "o2")
    with pytest.raises(UserError, match=rf"tensor '{key}' has shape \[31, 64\] but the config implies \[32, 64\]"):
        conv.hf_to_mcore(out, hf=str(d))
    _assert_no_output(out)


def test_error_tokenizer_larger_than_embeddings(rt, tmp_path):
    from megavlm.convert import engine as conv

    d = str(tmp_path / "small_vocab")
    _, tok = make_llava(d, extra_vocab=-2)
    out = str(tmp_path / "o3")
    n = len(tok)
    with pytest.raises(UserError, match=rf"has {n} tokens but the embeddings "
                                        rf"\(language_model\.model\.embed_tokens\.weight\) have {n - 2} rows"):
        conv.hf_to_mcore(out, hf=d)
    _assert_no_output(out)


def test_error_out_exists_and_cli_exit_status(llava, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in _RUNTIME_ENV:
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megavlm", "convert", "hf-to-mcore", "--hf", llava[0], "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --out ")
    assert os.listdir(out) == ["x"]
