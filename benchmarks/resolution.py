"""Resolution vs compute: image tokens and vision-side FLOPs per image for real model shapes, computed from the same
descriptions the model builds from (the family's ``ViTArch`` / ``ProjectorArch``, ``megavlm/shapes.py``) — torch-free,
nothing run. Prints a Markdown table (docs/perf.md has it).

usage: python benchmarks/resolution.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavlm import families  # noqa: E402
from megavlm.config import load_config  # noqa: E402
from megavlm.shapes import decoder_forward_flops  # noqa: E402

#: CLIP ViT-L/14 (LLaVA-1.5's tower, penultimate layer) at the four resolutions of the square-image trade-off, into a
#: 7B-shaped decoder (4096 × 32 layers, LLaMA-2-7B / Vicuna-7B).
CLIP_L = ["model.vision.patch_size=14", "model.vision.hidden_size=1024", "model.vision.num_layers=24",
          "model.vision.num_heads=16", "model.vision.ffn_hidden_size=4096", "model.vision.feature_layer=-2",
          "model.language.hidden_size=4096", "model.language.num_heads=32", "model.language.num_kv_heads=32",
          "model.language.ffn_hidden_size=11008", "model.language.num_layers=32", "data.max_seq_len=4096"]
#: InternViT-300M-448px (InternVL 2.5/3's small tower) into the same 7B-shaped decoder, tiles of 448².
INTERNVIT_300M = ["model.family=internvl", "model.vision.image_size=448", "model.vision.patch_size=14",
                  "model.vision.hidden_size=1024", "model.vision.num_layers=24", "model.vision.num_heads=16",
                  "model.vision.ffn_hidden_size=4096", "model.language.hidden_size=4096",
                  "model.language.num_heads=32", "model.language.num_kv_heads=32",
                  "model.language.ffn_hidden_size=11008", "model.language.num_layers=32", "data.max_seq_len=16384"]


def row(name: str, overrides: list[str], crops: int, pooled: bool = True) -> dict:
    cfg = load_config(None, overrides)
    fam = families.of(cfg)
    v, p = fam.vision_arch(cfg), fam.projector_arch(cfg)
    if not pooled:  # the same encoder without the projector's 2×2 merge (what pixel shuffle saves)
        from dataclasses import replace

        p = replace(p, merge=1)
    tokens = p.tokens(v.tokens) * crops
    encoder = v.forward_flops(crops)
    projector = p.forward_flops(tokens)
    # what the image tokens cost the decoder's forward (GEMMs + attention among themselves; no output layer)
    decoder = decoder_forward_flops(cfg.model.language, tokens, tokens, vocab_size=0)
    return {"model": name, "crops": crops, "crop_px": v.image_size, "patches_per_crop": v.patches,
            "image_tokens": tokens, "encoder_gflop": encoder / 1e9, "projector_gflop": projector / 1e9,
            "decoder_gflop": decoder / 1e9}


def rows() -> list[dict]:
    out = [row(f"CLIP-L/14 at {px}² (square, LLaVA-style)", CLIP_L + [f"model.vision.image_size={px}"], 1)
           for px in (224, 336, 448, 672)]
    # model.projector.pool: 4× fewer image tokens for the same encoder (NVILA's / Phi-3-Vision's 2×2 pooling)
    for px in (336, 672):
        for pool in ("avg2x2", "shuffle2x2"):
            out.append(row(f"CLIP-L/14 at {px}², pool={pool}", CLIP_L + [f"model.vision.image_size={px}",
                                                                         f"model.projector.pool={pool}"], 1))
    for tiles in (1, 6, 12):
        crops = tiles + (1 if tiles > 1 else 0)  # the thumbnail
        out.append(row(f"InternViT-300M, {tiles} tile(s) of 448², pixel shuffle", INTERNVIT_300M, crops))
        out.append(row(f"InternViT-300M, {tiles} tile(s) of 448², no pixel shuffle", INTERNVIT_300M, crops,
                       pooled=False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    table = rows()
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("| model | crops | px per crop | patches per crop | image tokens | encoder GFLOP | projector GFLOP | "
          "decoder GFLOP (image tokens) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['model']} | {r['crops']} | {r['crop_px']} | {r['patches_per_crop']} | {r['image_tokens']:,} | "
              f"{r['encoder_gflop']:,.1f} | {r['projector_gflop']:,.1f} | {r['decoder_gflop']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
