"""``megavlm eval``: greedy answers to the held-out colour questions from a checkpoint, loaded at TP=1/PP=1 in one
process whatever layout it was saved at (KV-cache decoding, :mod:`megavlm.inference.generate`); accuracy printed
next to chance level and written to ``{run_dir}/eval.json``."""

from __future__ import annotations

import json
import os

import torch

from .. import families, runtime
from ..config import Config, checkpoint_dir, single_layout
from ..data.synthetic import SyntheticVLMDataset
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..training import checkpoint as ckpt
from .generate import generate
from .load import build_and_load


def load_for_inference(cfg: Config):
    """Runtime (TP=1/PP=1), tokenizer, and the model with the checkpoint's weights; returns (rt, tok, model, path)."""
    rt = runtime.initialize(1, 1, cfg.train.seed)
    run_tok = os.path.join(cfg.run_dir, "tokenizer")
    tok = load_tokenizer(cfg.data.tokenizer or (run_tok if os.path.isdir(run_tok) else None))
    load = cfg.checkpoint.load if cfg.checkpoint.load != "none" else "auto"
    path = ckpt.resolve_load_path(load, checkpoint_dir(cfg))
    if path is None:
        raise UserError(f"no checkpoint under {checkpoint_dir(cfg)}; train first (megavlm train ...) or pass "
                        "checkpoint.load=PATH")
    saved = ckpt.load_common(path).get("config", {})
    cfg.model.language.vocab_size = (cfg.model.language.vocab_size
                                     or saved.get("model", {}).get("language", {}).get("vocab_size") or len(tok))
    model = build_and_load(single_layout(cfg), path, tok, rt)
    return rt, tok, model, path


def evaluate(cfg: Config, limit: int | None = None, show: int = 5, batch_size: int = 32) -> dict:
    from ..data.images import NativeImages, patchify

    rt, tok, model, path = load_for_inference(cfg)
    fam = families.of(cfg)
    img = fam.image_processor(cfg)
    native = isinstance(img, NativeImages)  # the square images as patches of their own size, with their grid
    n_tokens = (fam.image_tokens_per_image(cfg, img.crops(img.size, img.size)) if native
                else fam.image_tokens(cfg))
    ds = SyntheticVLMDataset(
        tok, num_samples=cfg.data.eval_samples, image_size=img.size, num_image_tokens=n_tokens,
        max_seq_len=cfg.data.max_seq_len, min_shapes=cfg.data.min_shapes, max_shapes=cfg.data.max_shapes,
        split="eval", seed=cfg.train.seed, image_mean=img.mean, image_std=img.std, expand=fam.expand_image(tok),
        image_token=fam.image_token)
    items = ds.eval_items("color")[:limit]
    if not items:
        raise UserError("no colour questions among the eval samples; raise data.eval_samples")
    correct, rows = 0, []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = torch.stack([it["image"] for it in chunk])  # uint8 (n, H, W, 3)
        extra = {}
        if native:
            grid = img.grid(img.size, img.size)
            images = torch.cat([patchify(im, img.patch_size, img.merge) for im in images])
            extra["image_grid"] = torch.tensor([grid] * len(chunk))
        answers = generate(model, [it["prompt_ids"] for it in chunk], images.to(rt.device), max_new_tokens=8,
                           eos_id=tok.eos_token_id, vocab_size=len(tok), pad_id=tok.pad_token_id, **extra).tokens
        for it, ans in zip(chunk, answers):
            text = tok.decode(ans, skip_special_tokens=True).strip()
            ok = text == it["answer"]
            correct += ok
            rows.append({"question": it["question"], "answer": it["answer"], "predicted": text, "correct": ok})
    n = len(rows)
    chance = 1.0 / len(items[0]["choices"])
    result = {"checkpoint": path, "questions": n, "accuracy": correct / n, "chance": chance}
    print(f"[megavlm] eval of {path} on {n} held-out colour questions (greedy):")
    for r in rows[:show]:
        mark = "ok " if r["correct"] else "WRONG"
        print(f"  {mark} {r['question']!r:40} -> {r['predicted']!r} (expected {r['answer']!r})")
    print(f"accuracy {correct}/{n} = {correct / n:.1%}   (chance {chance:.1%})", flush=True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "eval.json"), "w") as f:
        json.dump(dict(result, examples=rows[:50]), f, indent=1)
    return result
