"""``megavlm generate``: decode from any megavlm checkpoint (see docs/generate.md).

Every user mistake (no checkpoint, an unreadable image, an empty prompt, a bad sampling flag) is found before any
process group starts and raised as :class:`~megavlm.errors.UserError`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from .. import families
from ..errors import UserError
from .generate import Sampling


@dataclass
class Request:
    ckpt: str
    image: str | None = None
    prompt: str | None = None
    input_ids: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    tokenizer: str | None = None
    template: str | None = None
    tp: int | None = None
    output: str = "text"


def parse_input_ids(text: str) -> list[int]:
    """``"1, 5 9"`` → ``[1, 5, 9]`` (commas and/or spaces)."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise UserError("--input-ids is empty; give token ids separated by commas or spaces")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--input-ids {text!r}: not a list of integers (e.g. --input-ids 1,5,9)") from None
    if min(ids) < 0:
        raise UserError(f"--input-ids: token ids must be >= 0, got {min(ids)}")
    return ids


@dataclass
class ImageInputs:
    """What one image gives the model: uint8 ``crops`` ``(n, H, W, 3)`` (or patches), its ``grid`` row
    (``Family.image_grid``; None when the model takes crops alone) and the ``tokens`` it occupies in the prompt."""

    crops: torch.Tensor
    grid: tuple[int, ...] | None
    tokens: int


def image_inputs(im, cfg, where: str) -> ImageInputs:
    """The one place an image becomes the model's inputs at inference (``generate``, ``eval``, ``serve``): the
    family's image processing (the PIL reference of the data pipeline's eval transform) on an RGB PIL image; an
    image the processing refuses is a UserError naming ``where``."""
    fam = families.of(cfg)
    channels = fam.vision_arch(cfg).num_channels
    if channels != 3:
        raise UserError(f"the model takes {channels}-channel images; {where} gives RGB")
    proc = fam.image_processor(cfg)
    im = im.convert("RGB")
    refused = proc.check(*im.size) if hasattr(proc, "check") else None  # (native resolution, HD crops)
    if refused:
        raise UserError(f"{where}: {im.size[0]}x{im.size[1]} cannot be used ({refused.replace('_', ' ')})")
    crops = torch.from_numpy(proc.reference(im, train=False))
    grid = fam.image_grid(cfg, *im.size)
    return ImageInputs(crops, grid, fam.image_tokens_of(cfg, int(crops.shape[0]), grid))


def load_image(path: str, cfg) -> torch.Tensor:
    """``--image``'s crops (:func:`load_image_inputs`)."""
    return load_image_inputs(path, cfg).crops


def load_image_inputs(path: str, cfg) -> ImageInputs:
    """``--image``: :func:`image_inputs` of the file."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UserError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise UserError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    return image_inputs(im, cfg, f"--image {path}")


def _prompt_ids(req: Request, cfg, tok, crops: list[int], tokens: list[int] | None = None) -> torch.Tensor:
    """The prompt's ids with each image expanded to its tokens; ``crops``: the crops of each image (``load_image``'s
    first dimension; [] without an image), ``tokens``: the tokens each occupies (:class:`ImageInputs`; default: by
    its crops)."""
    from ..data.constants import image_token_id
    from ..data.conversation import encode_prompt

    fam = families.of(cfg)
    n_images = len(crops)
    if tokens is None:
        tokens = [fam.image_tokens_per_image(cfg, int(c)) for c in crops]
    n_img = tokens[0] if tokens else fam.image_tokens(cfg)  # (generate takes one --image)
    if req.input_ids is not None:
        ids = parse_input_ids(req.input_ids)
        vocab = cfg.model.language.vocab_size or len(tok)
        if max(ids) >= vocab:
            raise UserError(f"--input-ids: id {max(ids)} is past the vocabulary ({vocab} tokens)")
        try:
            tid = image_token_id(tok, fam.image_token)
        except UserError:
            tid = None
        count = ids.count(tid) if tid is not None else 0
        if count and not n_images:
            raise UserError(f"--input-ids holds {count} image-token ids ({tid}) but no --image was given")
        if n_images and count == 1 and n_img > 1:  # one image-token id: expand it as the template encoder does
            k = ids.index(tid)
            expand = fam.expand_image(tok) or (lambda n: [tid] * n)
            full = expand(n_img)
            first, last = full.index(tid), len(full) - 1 - full[::-1].index(tid)
            before, after = full[:first], full[last + 1:]  # e.g. <|vision_start|> ... <|vision_end|>
            if before and ids[max(0, k - len(before)):k] == before and ids[k + 1:k + 1 + len(after)] == after:
                full = full[first:last + 1]  # the prompt has them around its one image token already
            ids = ids[:k] + full + ids[k + 1:]
        elif n_images and count != n_img:
            tiled = crops[0] > 1 and n_img == crops[0] * fam.image_tokens(cfg)  # (not native-resolution patches)
            per = f" ({crops[0]} crops × {fam.image_tokens(cfg)})" if tiled else ""
            raise UserError(f"--input-ids holds {count} image-token ids ({tid}); with --image give one (expanded "
                            f"here) or exactly {n_img}, the tokens this image occupies{per}")
        return torch.tensor(ids, dtype=torch.long)
    template = req.template or families.template(cfg)
    try:
        return encode_prompt(tok, req.prompt, num_images=n_images, num_image_tokens=tokens, template=template,
                             expand=fam.expand_image(tok), image_token=fam.image_token)
    except ValueError as e:
        raise UserError(f"--prompt: {e}") from None


def fit_context(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """``max_new_tokens``, capped so that the prompt and the new tokens fit the model's ``context``
    (``data.max_seq_len`` of its config: the sequence length it was built and trained for), with a note on stderr
    when it is capped; UserError when the prompt alone leaves no room for a new token."""
    if prompt_tokens >= context:
        raise UserError(f"the prompt is {prompt_tokens} tokens (image tokens included), but the model's context is "
                        f"{context} tokens (data.max_seq_len of its config), which leaves no room for a new token; "
                        "shorten the prompt")
    if prompt_tokens + max_new_tokens <= context:
        return max_new_tokens
    room = context - prompt_tokens
    if os.environ.get("RANK", "0") == "0":
        print(f"note: --max-new-tokens {max_new_tokens} capped at {room}: the prompt's {prompt_tokens} tokens and "
              f"the new ones must fit the model's context of {context} tokens (data.max_seq_len of its config)",
              file=sys.stderr, flush=True)
    return room


def check(req: Request) -> Sampling:
    if (req.prompt is None) == (req.input_ids is None):
        raise UserError("give exactly one of --prompt TEXT and --input-ids IDS")
    if req.prompt is not None and not req.prompt.strip():
        raise UserError("--prompt is empty; give the question to answer")
    if req.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {req.max_new_tokens}: must be >= 1")
    if req.output not in ("text", "json"):
        raise UserError(f"--output {req.output}: choose text or json")
    sampling = Sampling(req.temperature, req.top_k, req.top_p, req.seed)
    try:
        sampling.check()
    except ValueError as e:
        raise UserError(e.args[0].replace("temperature", "--temperature").replace("top_k", "--top-k")
                        .replace("top_p", "--top-p")) from None
    if req.tp is not None and req.tp < 1:
        raise UserError(f"--tp {req.tp}: must be >= 1")
    return sampling


def run(req: Request) -> dict:
    """Load, decode, print (on rank 0); returns the result dict that ``--output json`` prints."""
    from .. import runtime
    from ..config import single_layout
    from ..data.tokenizer import find_tokenizer
    from .generate import generate
    from .load import build_and_load, open_checkpoint

    sampling = check(req)
    path, cfg, tp = open_checkpoint(req.ckpt, req.template, req.tp)
    inputs = load_image_inputs(req.image, cfg) if req.image is not None else None
    image = inputs.crops if inputs is not None else None
    grid = torch.tensor([inputs.grid]) if inputs is not None and inputs.grid is not None else None
    tok, _ = find_tokenizer(path, cfg.data.tokenizer, req.tokenizer)
    prompt = _prompt_ids(req, cfg, tok, [int(image.shape[0])] if inputs else [], [inputs.tokens] if inputs else [])
    max_new = fit_context(int(prompt.numel()), req.max_new_tokens, cfg.data.max_seq_len)

    cfg = single_layout(cfg, tp)
    rt = runtime.initialize(tp, 1, cfg.train.seed)
    model = build_and_load(cfg, path, tok, rt)
    eos = None if req.ignore_eos else tok.eos_token_id
    res = generate(model, [prompt], image, max_new, eos, sampling,
                   **({"image_grid": grid} if grid is not None else {}))
    new = res.tokens[0]
    total = res.prefill_s + res.decode_s
    out = {
        "checkpoint": path,
        "prompt_ids": prompt.tolist(),
        "generated_ids": new,
        "text": tok.decode(new, skip_special_tokens=True),
        "finish_reason": res.finish[0],
        "prompt_tokens": int(prompt.numel()),
        "new_tokens": len(new),
        "max_new_tokens": max_new,
        "prefill_s": round(res.prefill_s, 6),
        "decode_s": round(res.decode_s, 6),
        "tokens_per_s": round(len(new) / total, 3) if total > 0 else None,
        "sampling": asdict(sampling),
        "tp": tp,
    }
    if rt.rank == 0:
        if req.output == "json":
            print(json.dumps(out), flush=True)
        else:
            print(out["text"], flush=True)
            print(f"[megavlm] {len(new)} new tokens ({out['finish_reason']}) after {out['prompt_tokens']} prompt "
                  f"tokens in {total:.3f} s: {out['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    return out
