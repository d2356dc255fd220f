"""What the checkpoint checksums (integrity.json, SHA-256 per file) cost on save and load.

    python benchmarks/checkpoint_checksums.py [--hidden 1024 --layers 8 --repeats 3]

One process (TP=1/PP=1), the tiny config's vision tower and a LLaMA-style decoder of the given size with its Adam
state (fp32 on CPU). Times ``training.checkpoint.save`` (of which: hashing the written files) and
``training.checkpoint.load`` with the check (``verified=False``: completeness and every file re-hashed) and without
it. Prints a markdown table of medians; nothing here is a test.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from megavlm import families, runtime
    from megavlm.config import load_config
    from megavlm.data.constants import image_token_id
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.training import checkpoint as ckpt
    from megavlm.training import ckpt_integrity as integrity
    from megavlm.training.trainer import build_training_objects

    h = args.hidden
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), [
        f"model.language.hidden_size={h}", f"model.language.num_layers={args.layers}",
        f"model.language.ffn_hidden_size={h * 11 // 4}", "model.language.num_heads=8", "model.language.num_kv_heads=8"])
    rt = runtime.initialize(1, 1, cfg.train.seed)
    tok = load_tokenizer(None)
    cfg.model.language.vocab_size = len(tok)
    model, optimizer, _ = build_training_objects(cfg, rt, len(tok), image_token_id(tok, families.of(cfg).image_token))
    optimizer.step()  # one step on the (zero) gradient buffer: the Adam state exists and is saved

    hashing = [0.0]
    hash_file = integrity.hash_file

    def timed_hash(path):
        t = time.perf_counter()
        try:
            return hash_file(path)
        finally:
            hashing[0] += time.perf_counter() - t

    integrity.hash_file = timed_hash
    rows = {k: [] for k in ("save", "hash", "load_checked", "load_unchecked", "verify")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        for i in range(args.repeats):
            hashing[0] = 0.0
            t = time.perf_counter()
            path = ckpt.save(d, i, model, optimizer, {"config": {}}, keep=1, run_id="bench")
            rows["save"].append(time.perf_counter() - t)
            rows["hash"].append(hashing[0])
            size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
            t = time.perf_counter()
            ckpt.load(path, model, optimizer, same_layout=False)
            rows["load_checked"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt.load(path, model, optimizer, same_layout=False, verified=True)
            rows["load_unchecked"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ckpt.verify(path)
            rows["verify"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in rows.items()}
    params = sum(p_.numel() for p_ in model.parameters())
    print(f"{params / 1e6:.0f}M parameters, checkpoint {size / 2**20:.0f} MiB (weights + Adam state), "
          f"median of {args.repeats}")
    print("| step | time | of which checksums |")
    print("|---|---:|---:|")
    print(f"| save | {med['save']:.2f} s | {med['hash']:.2f} s ({med['hash'] / med['save']:.0%}; "
          f"{size / 2**20 / med['hash']:.0f} MiB/s) |")
    print(f"| load, checked | {med['load_checked']:.2f} s | {med['verify']:.2f} s "
          f"({med['verify'] / med['load_checked']:.0%}) |")
    print(f"| load, unchecked | {med['load_unchecked']:.2f} s | - |")
    runtime.shutdown()


if __name__ == "__main__":
    main()
