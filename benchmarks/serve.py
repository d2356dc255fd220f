"""`megavlm serve` under load: requests/s, time to first token and tokens/s at 1, 4 and 16 concurrent clients.

Starts the server on CKPT (a subprocess on a free localhost port), then for each concurrency C runs C client threads
(the official openai client, streaming), each sending REQUESTS chat completions one after another: an image (random
pixels at the model's image size, as a base64 data: URL) and a question, greedy, exactly MAX_TOKENS new tokens
(``ignore_eos``). Time to first token is measured by the client (request sent → first content chunk). Prints a
Markdown table (docs/perf.md has it); nothing is asserted.

usage: python benchmarks/serve.py --ckpt DIR [--clients 1,4,16] [--requests 4] [--max-tokens 16] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(size: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _start(ckpt: str, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "megavlm", "serve", "--ckpt", ckpt, "--port", str(port),
                             "--model-name", "bench", "--max-batch", str(max_batch), "--log-level", "warning"],
                            cwd=ROOT, env=env)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def _one(client, url: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, new tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model="bench", stream=True, max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}],
        extra_body={"ignore_eos": True})
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            tokens = ch.usage.completion_tokens
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, tokens


def run(port: int, clients: int, requests: int, url: str, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def worker():
        for _ in range(requests):
            r = _one(client, url, "what color is the circle ?", max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    decode = [(r[2] - 1) / (r[1] - r[0]) for r in results if r[2] > 1 and r[1] > r[0]]
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_per_s": len(results) / wall,
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_max_ms": 1000 * max(ttft),
            "tok_per_s": sum(r[2] for r in results) / wall,
            "stream_tok_per_s": statistics.median(decode) if decode else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args()
    from megavlm import families
    from megavlm.training.checkpoint import find_checkpoint, saved_config

    cfg = saved_config(find_checkpoint(args.ckpt))
    url = _image_url(families.of(cfg).vision_arch(cfg).image_size)
    port = _free_port()
    proc = _start(args.ckpt, port, args.max_batch)
    try:
        run(port, 1, 1, url, args.max_tokens)  # warm-up
        rows = [run(port, int(c), args.requests, url, args.max_tokens) for c in args.clients.split(",")]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as r:
            stats = r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print("| clients | requests | requests/s | TTFT p50 (ms) | TTFT max (ms) | new tokens/s (all) | "
          "tokens/s per stream |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_max_ms']:.0f} | {r['tok_per_s']:.1f} | {r['stream_tok_per_s']:.1f} |")
    print(f"\nbatches: {stats}  ({args.max_tokens} new tokens per request, --max-batch {args.max_batch})")


if __name__ == "__main__":
    main()
