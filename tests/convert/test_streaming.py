"""The converter streams: its memory is about one layer's, not the model's (docs/convert.md, "Memory").

The first test measures it for real: both directions run as child processes on a generated bf16 LLaVA whose language
model has many small layers, and the memory each child adds on top of what its imports took (peak RSS at exit minus
its RSS after the imports, with the peak reset there) must stay below a third of the checkpoint's size (they add
~30 MB of 190 MB); a converter holding the model (as before: 2-3x the size) fails it. The others check, in process
on the tiny model, that no more HF tensors are alive at once than one parameter needs, and that sharded HF output
loads in transformers with equal tensors."""

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from hf_models import make_llava

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs megavlm's CLI in this process after importing everything the conversion will import, with the peak RSS
# reset to the current RSS after the imports (Linux: "5" > /proc/self/clear_refs resets VmHWM), then prints
# "RSS <RSS before converting> <peak RSS at the end>" in KiB.
_CHILD = """
import sys
import torch, transformers, megatron.core.dist_checkpointing, torch.distributed.checkpoint
import megavlm.cli, megavlm.convert.engine, megavlm.convert.stream, megavlm.models.vlm
from transformers import LlavaConfig, AutoTokenizer, CLIPImageProcessor  # noqa: F401

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
assert status("VmHWM") < before + 4096, "peak RSS was not reset"
rc = megavlm.cli.main(sys.argv[1:])
print("RSS", before, status("VmHWM"), flush=True)
sys.exit(rc)
"""


def _generate(folder: str) -> int:
    """A random bf16 LLaVA: tiny CLIP, LLaMA 512 wide × 32 layers, vocab 4096 (~100M parameters, ~190 MB); one
    decoder layer is ~1/35 of it. Written tensor by tensor (names from a meta-device transformers model), so this
    process never holds it either. Returns the size of its safetensors in bytes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from megavlm.convert.hf_io import write_safetensors
    from megavlm.data.tokenizer import build_synthetic_tokenizer, image_token_id

    tok = build_synthetic_tokenizer(folder)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=16, hidden_act="quick_gelu"),
        text_config=LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=32, num_attention_heads=8,
                                num_key_value_heads=4, vocab_size=4096, max_position_embeddings=256),
        image_token_index=image_token_id(tok), vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    path = os.path.join(folder, "model.safetensors")
    write_safetensors(path, [(k, s, torch.bfloat16) for k, s in names.items()],
                      ((k, torch.empty(s, dtype=torch.bfloat16).uniform_(-0.1, 0.1, generator=g))
                       for k, s in names.items()), metadata={"format": "pt"})
    cfg.save_pretrained(folder)
    return os.path.getsize(path)


def _child(args):
    # a fixed mmap threshold: glibc's dynamic one lets freed layer-sized blocks stay in the heap (resident) for a
    # while, which adds tens of MB of run-to-run noise to what is measured here (tensors alive at once)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(2**20))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    before, after = (int(x) * 1024 for x in p.stdout.split("RSS ")[-1].split())
    return before, after


def test_peak_memory_is_about_one_layer_not_the_model(tmp_path):
    hf, mc, back = str(tmp_path / "hf"), str(tmp_path / "mc"), str(tmp_path / "back")
    size = _generate(hf)
    assert size > 150 * 2**20
    b1, a1 = _child(["convert", "hf-to-mcore", "--hf", hf, "--out", mc])
    b2, a2 = _child(["convert", "mcore-to-hf", "--ckpt", mc, "--out", back, "--max-shard-size", "50MB"])
    added = {"hf-to-mcore": a1 - b1, "mcore-to-hf": a2 - b2}
    print(f"model {size / 2**20:.0f} MiB; added by the conversion: "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in added.items()))
    # one decoder layer is ~6 MB, the largest tensor (embedding, output layer) 4 MB; holding the model costs ≥ size
    for name, extra in added.items():
        assert extra < size / 3, f"{name} added {extra / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        assert len(json.load(f)["weight_map"]) > 200


def _track_reads(monkeypatch):
    """Counts HF source tensors alive at once (made by SafetensorsFile.get, freed when collected)."""
    from megavlm.convert import hf_io

    live = {"n": 0, "bytes": 0, "max_n": 0, "max_bytes": 0}
    orig = hf_io.SafetensorsFile.get

    def get(self, key):
        t = orig(self, key)
        n = t.numel() * t.element_size()
        live["n"] += 1
        live["bytes"] += n
        live["max_n"] = max(live["max_n"], live["n"])
        live["max_bytes"] = max(live["max_bytes"], live["bytes"])

        def free(n=n):
            live["n"] -= 1
            live["bytes"] -= n
        weakref.finalize(t, free)
        return t

    monkeypatch.setattr(hf_io.SafetensorsFile, "get", get)
    return live


def test_hf_tensors_are_read_one_parameter_at_a_time(rt, tmp_path, monkeypatch):
    from megavlm.convert import engine as conv
    from megavlm.convert import stream

    hf = str(tmp_path / "hf")
    make_llava(hf)
    live = _track_reads(monkeypatch)
    made = []
    orig_save = stream.save

    def save(*a, **kw):
        planner = orig_save(*a, **kw)
        made.extend(planner.materialized)
        return planner

    monkeypatch.setattr(stream, "save", save)
    gc.collect()
    conv.hf_to_mcore(str(tmp_path / "mc"), hf=hf)
    # q, k and v of one layer make one fused QKV: never more sources alive at once, whatever the model size
    assert 1 <= live["max_n"] <= 3, live
    assert any("linear_qkv.weight" in n for n in made) and len(made) >= 30
    assert live["n"] == 0, live


def test_sharded_export_loads_in_transformers(rt, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from megavlm.convert import engine as conv

    hf = str(tmp_path / "hf")
    model, _ = make_llava(hf)
    conv.hf_to_mcore(str(tmp_path / "mc"), hf=hf)
    back = conv.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), max_shard_size="40KB")
    shards = sorted(n for n in os.listdir(back) if n.endswith(".safetensors"))
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    # whole layers per shard: every tensor of a decoder layer sits in one file
    files = {}
    for k, f in index["weight_map"].items():
        if ".layers." in k:
            files.setdefault(k.split(".layers.")[0] + "." + k.split(".layers.")[1].split(".")[0], set()).add(f)
    assert files and all(len(v) == 1 for v in files.values())
    reloaded = LlavaForConditionalGeneration.from_pretrained(back)
    want, got = model.state_dict(), reloaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    with pytest.raises(Exception, match="max-shard-size"):
        conv.mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "bad"), max_shard_size="lots")
