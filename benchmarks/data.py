"""DALI image loader vs a torch DataLoader with PIL, over the same WebDataset shards (CPU).

    python benchmarks/data.py [--images 1500] [--size 336] [--batch 32] [--workdir DIR]

Writes ~N JPEGs of random size (400-640 px a side) into shards with the repo's shard writer, then reads them once
with each loader (resize mode, float normalized CHW output, CLIP mean/std) and prints a markdown table: images/s and
CPU-ms per image (process + children CPU time / images).  The DataLoader reads the same tars through the .idx offsets
(2 workers, PIL decode + bilinear resize + normalize).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavlm.data.batch import normalize_images  # noqa: E402
from megavlm.data.shards import read_index, shard_paths, write_shards  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


_NOISE = np.random.default_rng(1).normal(0, 12, (700, 700, 3)).astype(np.float32)


def _photo(rng, w, h):
    y = np.arange(h, dtype=np.float32)[:, None, None]
    x = np.arange(w, dtype=np.float32)[None, :, None]
    fx, fy, ph = rng.uniform(0.01, 0.05, 3), rng.uniform(0.01, 0.05, 3), np.arange(3, dtype=np.float32)
    img = 127 + 80 * np.sin(x * fx + ph) * np.cos(y * fy)
    oy, ox = (int(v) for v in rng.integers(0, 700 - 640, 2))
    img += _NOISE[oy:oy + h, ox:ox + w]  # texture, so the JPEGs have realistic sizes
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shards(out, n, seed=0):
    rng = np.random.default_rng(seed)

    def records():
        for i in range(n):
            w, h = (int(v) for v in rng.integers(400, 641, 2))
            buf = io.BytesIO()
            Image.fromarray(_photo(rng, w, h)).save(buf, format="JPEG", quality=90)
            yield {"conversations": [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "x"}],
                   "images": [buf.getvalue()]}

    write_shards(records(), out, 250, progress=False)


class TarImages(torch.utils.data.Dataset):
    def __init__(self, shards, size):
        self.items = []
        for tar in shard_paths(shards):
            for sample in read_index(tar[:-4] + ".idx"):
                for ext, off, sz, _ in sample:
                    if ext != "json":
                        self.items.append((tar, off, sz))
        self.size = size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        tar, off, sz = self.items[i]
        with open(tar, "rb") as f:
            f.seek(off)
            data = f.read(sz)
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy())


def _cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def bench_dataloader(shards, size, batch, workers):
    ds = TarImages(shards, size)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    t0, c0, n = time.perf_counter(), _cpu(), 0
    for imgs in dl:
        x = normalize_images(imgs, MEAN, STD)
        n += x.shape[0]
    del dl  # workers exit, their CPU time lands in RUSAGE_CHILDREN
    return n, time.perf_counter() - t0, _cpu() - c0


def bench_dali(shards, size, batch, threads):
    from megavlm.data.pipeline import ImageTextLoader

    loader = ImageTextLoader(shards, image_size=size, mode="resize", output="float", mean=MEAN, std=STD,
                             batch_size=batch, num_threads=threads, device="cpu")
    t0, c0, n = time.perf_counter(), _cpu(), 0
    for b in loader:
        n += sum(len(s["images"]) for s in b)
    return n, time.perf_counter() - t0, _cpu() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers and DALI threads")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="megavlm-bench-data-")
    shards = os.path.join(work, "shards")
    if not shard_paths(shards):
        t = time.perf_counter()
        make_shards(shards, a.images)
        print(f"wrote {a.images} JPEGs into {shards} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    torch.set_num_threads(1)
    bench_dali(shards, a.size, a.batch, a.workers)  # warm the page cache
    rows = [("torch DataLoader + PIL", *bench_dataloader(shards, a.size, a.batch, a.workers)),
            ("DALI (cpu)", *bench_dali(shards, a.size, a.batch, a.workers))]
    base = rows[0][1] / rows[0][2]
    print(f"\n| loader ({a.size}², resize + normalize, batch {a.batch}, {a.workers} workers/threads) | images | "
          "images/s | CPU-ms / image | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, n, wall, cpu in rows:
        print(f"| {name} | {n} | {n / wall:.1f} | {1000 * cpu / n:.2f} | {n / wall / base:.2f}× |")
    if a.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
