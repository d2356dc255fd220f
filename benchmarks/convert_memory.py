"""Peak resident memory of `megavlm convert` against the checkpoint's size, on a generated random LLaVA.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 12 --vocab 32000 --dtype bfloat16]
                                        [--max-shard-size 5GB]

Builds an HF LlavaForConditionalGeneration (tiny CLIP + a LLaMA of the given size) with random weights, saves it,
then runs hf-to-mcore and mcore-to-hf as child processes and reads their peak RSS (ru_maxrss) and, with the peak
reset after the imports, the memory the conversion itself adds. Also measures a child that only imports what the
converter imports. Prints a markdown table; nothing here is a test.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


IMPORTS = ("import megavlm.convert.engine, megavlm.convert.stream, megavlm.cli, megavlm.models.vlm, transformers, "
           "megatron.core.dist_checkpointing, torch.distributed.checkpoint\n"
           "from transformers import LlavaConfig, AutoTokenizer, CLIPImageProcessor\n")
# The child imports what the converter uses, notes its RSS, resets its peak RSS to that (Linux: "5" >
# /proc/self/clear_refs resets VmHWM), runs the module, and at exit writes "<ru_maxrss> <RSS after imports> <VmHWM>"
# (KiB): the whole process's peak, and what the conversion itself added on top of its imports.
_WRAP = ("import atexit, resource, runpy, sys\n"
         "def status(field):\n"
         "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
         "out = sys.argv.pop(1)\n"
         "before = status('VmRSS')\n"
         "open('/proc/self/clear_refs', 'w').write('5')\n"
         "atexit.register(lambda: open(out, 'w').write('%d %d %d' % (resource.getrusage(resource.RUSAGE_SELF)"
         ".ru_maxrss, before, status('VmHWM'))))\n"
         "if len(sys.argv) > 1:\n"
         "    runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def child(module_args):
    """Run ``python -m MODULE ARGS`` (after IMPORTS) in a child; returns (seconds, peak RSS, RSS after imports,
    peak RSS from the end of the imports on), bytes."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        code = IMPORTS + _WRAP
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, f.name, *module_args], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
        return (time.perf_counter() - t0, *(int(x) * 1024 for x in open(f.name).read().split()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-shard-size", default="5GB", help="mcore-to-hf --max-shard-size")
    ap.add_argument("--generate", help=argparse.SUPPRESS)  # internal: write the model there and exit
    args = ap.parse_args()
    if args.generate:
        return generate(args)
    # The parent stays small (no torch): Linux carries a process's peak RSS across fork+exec into its children.
    with tempfile.TemporaryDirectory() as d:
        hf, mc, back = os.path.join(d, "hf"), os.path.join(d, "mc"), os.path.join(d, "back")
        info = subprocess.run([sys.executable, __file__, "--generate", hf, "--hidden", str(args.hidden), "--layers",
                               str(args.layers), "--vocab", str(args.vocab), "--dtype", args.dtype], check=True,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout.strip()
        size = dir_size(hf)
        _, base, _, _ = child([])
        r1 = child(["megavlm", "convert", "hf-to-mcore", "--hf", hf, "--out", mc])
        r2 = child(["megavlm", "convert", "mcore-to-hf", "--ckpt", mc, "--out", back, "--max-shard-size",
                    args.max_shard_size])
        shards = len([n for n in os.listdir(back) if n.endswith(".safetensors")])
        gib = 2 ** 30
        layer = largest_layer(hf)
        print(f"model: {info}, HF safetensors {size / gib:.3f} GiB, largest tensor {layer[1] / gib:.3f} GiB, "
              f"largest decoder layer {layer[0] / gib:.3f} GiB; import-only child: {base / gib:.2f} GiB peak RSS; "
              f"mcore-to-hf wrote {shards} shard(s)")
        print("| step | wall s | peak RSS GiB | peak / size | peak above import-only peak / size "
              "| RSS after imports GiB | added by the conversion GiB | added / size |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, (t, peak, before, hwm) in (("hf-to-mcore", r1), ("mcore-to-hf", r2)):
            print(f"| {name} | {t:.1f} | {peak / gib:.2f} | {peak / size:.2f} | {(peak - base) / size:.2f} "
                  f"| {before / gib:.2f} | {(hwm - before) / gib:.3f} | {(hwm - before) / size:.2f} |")


def largest_layer(folder):
    """(bytes of the largest decoder layer, bytes of the largest tensor) of an HF safetensors folder (headers only)."""
    import json
    import re
    import struct

    layers, biggest = {}, 0
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            n = v["data_offsets"][1] - v["data_offsets"][0]
            biggest = max(biggest, n)
            m = re.search(r"language_model.*layers\.(\d+)\.", k)
            if m:
                layers[m.group(1)] = layers.get(m.group(1), 0) + n
    return max(layers.values(), default=0), biggest


def generate(args):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    sys.path.insert(0, ROOT)
    from megavlm.data.tokenizer import build_synthetic_tokenizer, image_token_id

    tok = build_synthetic_tokenizer(args.generate)
    h = args.hidden
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=64, patch_size=16, hidden_act="quick_gelu"),
        text_config=LlamaConfig(hidden_size=h, intermediate_size=int(h * 2.75) // 64 * 64,
                                num_hidden_layers=args.layers, num_attention_heads=h // 64,
                                num_key_value_heads=h // 128, vocab_size=args.vocab, max_position_embeddings=512),
        image_token_index=image_token_id(tok), vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(args.generate)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
