"""Tiny stand-ins, at the relative paths README.md's "A real LLaVA-1.5 run" block uses, for what that block says to
fetch beforehand: CLIP ViT-L/14-336 (``models/clip-vit-large-patch14-336``), Vicuna-7B v1.5 with its tokenizer
(``models/vicuna-7b-v1.5``), LLaVA-Pretrain (``data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json`` + ``images/``), the
LLaVA-1.5 instruction mix (``data/llava_v1_5_mix665k.json`` + ``data/images/``) and ``cat.jpg``.

The models are tests/convert/hf_models.py's tiny random CLIP (16×16 pixels, patch 8: 4 image tokens) and LLaMA with
the synthetic word-level tokenizer; the texts use that tokenizer's words so that every sample has supervised tokens."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert"))

import hf_models

VISION = "models/clip-vit-large-patch14-336"
LANGUAGE = "models/vicuna-7b-v1.5"
PRETRAIN_JSON = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
PRETRAIN_IMAGES = "data/LLaVA-Pretrain/images"
INSTRUCT_JSON = "data/llava_v1_5_mix665k.json"
INSTRUCT_IMAGES = "data/images"
CAT = "cat.jpg"

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
       "purple": (140, 40, 170), "orange": (240, 140, 20)}


def _image(path: str, color: str, seed: int, size=(20, 14)) -> None:
    """A JPEG of one colour with a little noise, not square (so image_mode=pad has something to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(RGB[color], np.int16) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)


def _turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def make_models(root: str) -> None:
    hf_models.make_clip_llama(os.path.join(root, VISION), os.path.join(root, LANGUAGE), seed=0)


def make_pretrain(root: str, n: int = 16) -> int:
    """LLaVA-Pretrain's layout: {"id", "image": "00000/NNN.jpg", "conversations": [human "<image>\\n...", gpt
    caption]}; returns the number of records."""
    recs = []
    for i in range(n):
        color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        rel = f"{i // 8:05d}/{i:09d}.jpg"
        _image(os.path.join(root, PRETRAIN_IMAGES, rel), color, seed=i)
        recs.append({"id": f"{i:09d}", "image": rel,
                     "conversations": [_turn("human", "<image>\ndescribe the image ."),
                                       _turn("gpt", f"a {color} {shape} .")]})
    _write_json(os.path.join(root, PRETRAIN_JSON), recs)
    return n


def make_instruct(root: str, n: int = 16) -> int:
    """llava_v1_5_mix665k's layout: images under coco/ and gqa/ sub-folders of data/images, multi-turn
    conversations, and a text-only record (no "image" key) as in the ShareGPT part."""
    recs = []
    for i in range(n):
        color, shape = COLORS[(i + 1) % len(COLORS)], SHAPES[(i + 2) % len(SHAPES)]
        if i % 8 == 7:
            recs.append({"id": f"text-{i}", "conversations": [_turn("human", "what is a circle ?"),
                                                              _turn("gpt", "a shape .")]})
            continue
        rel = f"{'coco/train2017' if i % 2 else 'gqa/images'}/{i:012d}.jpg"
        _image(os.path.join(root, INSTRUCT_IMAGES, rel), color, seed=100 + i)
        recs.append({"id": f"{i:012d}", "image": rel,
                     "conversations": [_turn("human", "<image>\nwhat color is the shape ?"), _turn("gpt", color),
                                       _turn("human", "what shape is the image ?"), _turn("gpt", f"a {shape} .")]})
    _write_json(os.path.join(root, INSTRUCT_JSON), recs)
    return n


def _write_json(path: str, recs: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(recs, f)


def make_all(root: str) -> None:
    make_models(root)
    make_pretrain(root)
    make_instruct(root)
    _image(os.path.join(root, CAT), "orange", seed=999, size=(24, 18))
