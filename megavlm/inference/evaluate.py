"""``megavlm eval``: greedy answers from a checkpoint, loaded at TP=1/PP=1 in one process whatever layout it was saved
at (KV-cache decoding, :mod:`megavlm.inference.generate`). ``--task color`` (the default): the held-out colour
questions, accuracy printed next to chance level and written to ``{run_dir}/eval.json``. ``--task pope``: POPE-style
yes/no object probing (:mod:`megavlm.inference.pope`) on the synthetic eval split or on shards whose records carry
``objects``, written to ``{run_dir}/eval_pope.json``."""

from __future__ import annotations

import json
import os

import torch

from .. import families, runtime
from ..config import Config, checkpoint_dir, single_layout, synthetic_existence
from ..data.synthetic import SyntheticVLMDataset
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..training import checkpoint as ckpt
from .generate import generate
from .load import build_and_load


TASKS = ("color", "pope")


def load_for_inference(cfg: Config, existence: bool = False):
    """Runtime (TP=1/PP=1), tokenizer, and the model with the checkpoint's weights; returns (rt, tok, model, path).
    ``existence``: without a tokenizer of its own the run's is the synthetic one with the existence words."""
    rt = runtime.initialize(1, 1, cfg.train.seed)
    run_tok = os.path.join(cfg.run_dir, "tokenizer")
    tok = load_tokenizer(cfg.data.tokenizer or (run_tok if os.path.isdir(run_tok) else None),
                         existence=existence or synthetic_existence(cfg))
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


class _Answerer:
    """Greedy answers of a loaded model to prompts about the synthetic set's square images, in batches."""

    def __init__(self, cfg: Config, existence: bool = False):
        self.rt, self.tok, self.model, self.path = load_for_inference(cfg, existence)
        self.cfg, self.fam = cfg, families.of(cfg)
        self.img = self.fam.image_processor(cfg)
        size = self.img.size
        # a model that takes grids (native resolution, HD crops) gets the square images through image_inputs
        self.grid = self.fam.image_grid(cfg, size, size)
        self.n_tokens = self.fam.image_tokens_of(cfg, self.img.crops(size, size), self.grid)

    def dataset(self, exist_share: float = 0.0) -> SyntheticVLMDataset:
        cfg, img, fam, tok = self.cfg, self.img, self.fam, self.tok
        return SyntheticVLMDataset(
            tok, num_samples=cfg.data.eval_samples, image_size=img.size, num_image_tokens=self.n_tokens,
            max_seq_len=cfg.data.max_seq_len, min_shapes=cfg.data.min_shapes, max_shapes=cfg.data.max_shapes,
            split="eval", seed=cfg.train.seed, image_mean=img.mean, image_std=img.std, expand=fam.expand_image(tok),
            image_token=fam.image_token, exist_share=exist_share)

    def prompt(self, question: str, crops: int = 1) -> torch.Tensor:
        from ..data.conversation import encode_prompt

        fam = self.fam
        ids = encode_prompt(self.tok, question, 1, [fam.image_tokens_per_image(self.cfg, crops)] if crops != 1
                            else self.n_tokens, self.cfg.data.max_seq_len, template=families.template(self.cfg),
                            expand=fam.expand_image(self.tok), image_token=fam.image_token)
        unk = self.tok.unk_token_id
        if unk is not None and unk in ids.tolist():
            raise UserError(f"the tokenizer does not know every word of {question!r} (it reads some as "
                            f"{self.tok.unk_token!r}); a model trained on the synthetic set learns them with "
                            "data.existence_share > 0")
        return ids

    def answer(self, prompts: list[torch.Tensor], images: list[torch.Tensor], max_new_tokens: int = 8) -> list[str]:
        """``images``: uint8 ``(crops, H, W, 3)`` per prompt."""
        from PIL import Image

        from .command import image_inputs

        extra = {}
        stacked = torch.cat(images)
        if self.grid is not None:
            stacked = torch.cat([image_inputs(Image.fromarray(im.numpy()), self.cfg, "an eval image").crops
                                 for im in stacked])
            extra["image_grid"] = torch.tensor([self.grid] * len(images))
        out = generate(self.model, prompts, stacked.to(self.rt.device), max_new_tokens=max_new_tokens,
                       eos_id=self.tok.eos_token_id, vocab_size=len(self.tok), pad_id=self.tok.pad_token_id,
                       **extra).tokens
        return [self.tok.decode(a, skip_special_tokens=True).strip() for a in out]


def evaluate(cfg: Config, limit: int | None = None, show: int = 5, batch_size: int = 32, task: str = "color",
             shards: str | None = None) -> dict:
    """``megavlm eval --task TASK`` (module docstring)."""
    if task not in TASKS:
        raise UserError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if task == "pope":
        return evaluate_pope(cfg, limit=limit, show=show, batch_size=batch_size, shards=shards)
    if shards is not None:
        raise UserError("--shards is for --task pope; the colour questions are the synthetic set's")
    ans = _Answerer(cfg)
    path = ans.path
    items = ans.dataset().eval_items("color")[:limit]
    if not items:
        raise UserError("no colour questions among the eval samples; raise data.eval_samples")
    correct, rows = 0, []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = ans.answer([it["prompt_ids"] for it in chunk], [it["image"][None] for it in chunk])
        for it, text in zip(chunk, texts):
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


def _pope_items_synthetic(ans: _Answerer) -> tuple[list[torch.Tensor], list[list[str]], list[str]]:
    """The synthetic eval split: images ``(1, H, W, 3)``, their objects, and every object name."""
    from ..data.synthetic import OBJECTS

    ds = ans.dataset()
    images = [torch.from_numpy(ds.images[i:i + 1].copy()) for i in range(len(ds))]
    return images, [ds.question(i)["object_names"] for i in range(len(ds))], list(OBJECTS)


def _pope_items_shards(ans: _Answerer, shards: str, limit: int | None):
    """The samples of ``shards`` whose records carry ``objects`` (and one image), at most ``limit`` images: their
    images as the family's eval transform makes them, their objects, and the objects of the set in order of first
    appearance."""
    import io

    from PIL import Image

    from ..data.shards import iter_shards, shard_paths

    if ans.grid is not None:
        raise UserError("--task pope --shards: families whose images take a grid (native resolution, HD crops) are not "
                        "supported yet; use the synthetic set")
    if not shard_paths(shards):
        raise UserError(f"--shards {shards}: no shard-*.tar there (write them with `megavlm data convert`)")
    images, objects = [], []
    for _key, record, files in iter_shards(shards):
        if not isinstance(record, dict) or not record.get("objects") or len(files) != 1:
            continue
        try:
            with Image.open(io.BytesIO(next(iter(files.values())))) as im:
                crops = torch.from_numpy(ans.img.reference(im.convert("RGB"), train=False))
        except Exception:  # noqa: BLE001 - an image that does not decode is left out, as training skips it
            continue
        images.append(crops)
        objects.append([str(o) for o in record["objects"]])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise UserError(f"--shards {shards}: no record with an 'objects' list and one image; POPE needs the objects "
                        "each image holds")
    return images, objects, list(dict.fromkeys(o for objs in objects for o in objs))


def evaluate_pope(cfg: Config, limit: int | None = None, show: int = 5, batch_size: int = 32,
                  shards: str | None = None) -> dict:
    """POPE on the synthetic eval split (``data.eval_samples`` images) or on ``shards``: per setting the scores of
    :func:`megavlm.inference.pope.pope_metrics`; printed as a table, written to ``{run_dir}/eval_pope.json``.
    ``limit``: at most this many images."""
    from ..data.synthetic import exists_question
    from .pope import SETTINGS, build_questions, format_table, parse_answer, pope_metrics

    ans = _Answerer(cfg, existence=True)
    if shards is None:
        images, objects, vocabulary = _pope_items_synthetic(ans)
        images, objects = images[:limit], objects[:limit]
    else:
        images, objects, vocabulary = _pope_items_shards(ans, shards, limit)
    prompts: dict[tuple[str, int], torch.Tensor] = {}
    cache: dict[tuple[int, str], str] = {}  # a question asked in several settings is answered once
    results, examples = {}, {}
    for setting in SETTINGS:
        qs = build_questions(objects, setting, seed=cfg.train.seed, vocabulary=vocabulary)
        todo = [(i, o) for i, o, _ in qs if (i, o) not in cache]
        todo = list(dict.fromkeys(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ps = []
            for i, o in chunk:
                key = (o, int(images[i].shape[0]))
                if key not in prompts:
                    prompts[key] = ans.prompt(exists_question(o), key[1])
                ps.append(prompts[key])
            for (i, o), text in zip(chunk, ans.answer(ps, [images[i] for i, _ in chunk], max_new_tokens=4)):
                cache[(i, o)] = text
        results[setting] = pope_metrics([parse_answer(cache[(i, o)]) for i, o, _ in qs], [t for _, _, t in qs])
        examples[setting] = [{"image": i, "object": o, "truth": "yes" if t else "no", "answer": cache[(i, o)]}
                             for i, o, t in qs]
    where = shards or f"the synthetic eval split ({len(images)} images)"
    print(f"[megavlm] POPE of {ans.path} on {where}, {len(vocabulary)} object names (greedy):")
    for ex in examples["adversarial"][:show]:
        print(f"  is there a {ex['object']!r:24} in image {ex['image']:>4}?  truth {ex['truth']:3}  -> "
              f"{ex['answer']!r}")
    print(format_table(results), flush=True)
    out = {"checkpoint": ans.path, "data": where, "images": len(images), "objects": len(vocabulary), **results}
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "eval_pope.json"), "w") as f:  # every question and answer, per setting
        json.dump(dict(out, vocabulary=vocabulary, answers=examples), f)
    return out
