"""Peak resident memory of `megavlm convert` against the checkpoint's size, on a generated random LLaVA.

    python benchmarks/convert_memory.py [--hidden 1024 --layers 12 --vocab 32000 --dtype bfloat16]

Builds an HF LlavaForConditionalGeneration (tiny CLIP + a LLaMA of the given size) with random weights, saves it,
then runs hf-to-mcore and mcore-to-hf as child processes and reads their peak RSS (ru_maxrss). Also measures a child
that only imports what the converter imports, so the table separates the libraries' own footprint. Prints a
markdown table; nothing here is a test.
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


_WRAP = ("import atexit, resource, runpy, sys\n"
         "out = sys.argv.pop(1)\n"
         "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
         "if len(sys.argv) > 1:\n"
         "    runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n")


def child(module_args, extra_imports=""):
    """Run ``python -m MODULE ARGS`` in a child that records its own peak RSS at exit; returns (seconds, bytes)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        code = extra_imports + "\n" + _WRAP
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, f.name, *module_args], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0, int(open(f.name).read()) * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
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
        base_t, base = child([], "import megavlm.convert.llava, megavlm.cli, transformers, megatron.core")
        t1, rss1 = child(["megavlm", "convert", "hf-to-mcore", "--hf", hf, "--out", mc])
        t2, rss2 = child(["megavlm", "convert", "mcore-to-hf", "--ckpt", mc, "--out", back])
        gib = 2 ** 30
        print(f"model: {info}, HF safetensors {size / gib:.2f} GiB; imports alone: {base / gib:.2f} GiB peak RSS")
        print("| step | wall s | peak RSS GiB | peak RSS / checkpoint size | peak above imports / size |")
        print("|---|---:|---:|---:|---:|")
        for name, t, rss in (("hf-to-mcore", t1, rss1), ("mcore-to-hf", t2, rss2)):
            print(f"| {name} | {t:.1f} | {rss / gib:.2f} | {rss / size:.2f} | {(rss - base) / size:.2f} |")


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
