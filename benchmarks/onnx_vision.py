"""The exported vision graph (`megavlm export onnx`) on onnxruntime's CPU provider vs the PyTorch path it came from
(the same encoder + projector, SDPA spec, reference ops, ``torch.no_grad``), per batch of crops; and the export time.

Exports CKPT's vision side (fp32, no HF folder) into a temporary folder, then times each batch size REPEAT times
after a warm-up (median). Prints a Markdown table (docs/perf.md has it); nothing is asserted.

usage: python benchmarks/onnx_vision.py --ckpt DIR [--batches 1,8,32] [--repeat 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn, repeat: int, warmup: int = 5) -> float:
    for _ in range(warmup):  # the first calls of a shape are slow (allocations, kernel choice) on both sides
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="threads for both (0: each library's default)")
    args = p.parse_args()
    import onnxruntime as ort
    import torch

    from megavlm import runtime
    from megavlm.export.onnx import GRAPH_FILE, _random_crops, export_onnx, load_vision

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "onnx")
        t0 = time.perf_counter()
        info = export_onnx(args.ckpt, out, hf=False)
        export_s = time.perf_counter() - t0
        cfg, _, _, module = load_vision(args.ckpt, "fp32")
        v = cfg.model.vision
        batches = [int(b) for b in args.batches.split(",")]
        crops = {n: _random_crops(n, v.image_size, v.num_channels, seed=n) for n in batches}
        with torch.no_grad():  # all of PyTorch first, then onnxruntime: neither's threads disturb the other
            t_torch = {n: _median_ms(lambda: module(crops[n]), args.repeat) for n in batches}
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(os.path.join(out, GRAPH_FILE), opts, providers=["CPUExecutionProvider"])
        t_ort = {n: _median_ms(lambda: sess.run(None, {"pixels": crops[n].numpy()}), args.repeat) for n in batches}
        rows = [(n, t_torch[n], t_ort[n]) for n in batches]
        runtime.shutdown()
    print(f"export: {export_s:.1f} s in all ({info['export_seconds']:.1f} s in torch.onnx.export); graph "
          f"{info['inputs'][0]['shape']} -> {info['outputs'][0]['shape']}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    print("| crops | PyTorch (ms) | onnxruntime (ms) | PyTorch / onnxruntime |\n|---|---|---|---|")
    for n, a, b in rows:
        print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
