"""Embedded synthetic VLM data: rendered shapes + questions about them.

Every image is a mid-grey (128,128,128) canvas with 1..3 shapes, each a
distinct type from {square, circle, triangle} and a distinct colour from a
palette of six clearly separable colours.  Each sample carries one
conversation:

* colour question (~60%): ``what color is the <shape> ?``  → ``<colour>``
* shape question  (~20%): ``what shape is <colour> ?``     → ``<shape>``
* caption         (~20%): ``describe the image .``         → ``a red square and a blue circle``
  (shapes listed left to right by centre)

With ``exist_share`` > 0 that share of the samples asks instead whether an object (a colour and a shape, one of
:data:`OBJECTS`) is in the image, half of them about a present object (``is there a red square in the image ?`` →
``yes``), half about an absent one (→ ``no``): the hallucination probe of POPE. Every sample also carries a
preference pair (``pair``: question, chosen, rejected) whose rejected answer names an absent object: a wrong yes/no
to an existence question, or a caption with one object replaced by an absent one. The words these need (``there``,
``in``, ``yes``, ``no``) are in the synthetic tokenizer only when asked for (``existence=True``), so the default
vocabulary, and every run trained on it, keeps its ids and size.

Everything is a pure function of ``(seed, split, index)``: sample ``i`` does not
depend on ``num_samples``, and different splits (``train``/``eval``) use
different random streams, so eval images are held out.

No megatron import here; nothing is downloaded.
"""

from __future__ import annotations

import os
import zlib
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megavlm.data.batch import collate
from megavlm.data.constants import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN
from megavlm.data.conversation import encode_conversation, encode_prompt
from megavlm.data.templates import TEMPLATES, get_template

BACKGROUND = (128, 128, 128)

# name -> RGB.  Far from each other and from the grey background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
COLORS = COLOURS  # alias
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
MAX_SHAPES = len(SHAPES)
KINDS: tuple[str, ...] = ("color", "shape", "caption", "exists")
KIND_PROBS: tuple[float, ...] = (0.6, 0.2, 0.2)  # of the first three; ``exists`` replaces them at ``exist_share``
#: The objects of the existence questions and of POPE: every colour-shape combination, in a fixed order.
OBJECTS: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)

# Placement: PLACEMENT_TRIES candidate positions per shape; the first one whose
# bounding box overlaps every shape drawn before it by at most OVERLAP_FRAC of
# the smaller bounding box is taken, else the candidate with the least overlap.
PLACEMENT_TRIES = 64
OVERLAP_FRAC = 0.1

# Randomness: sample i of (seed, split) uses the U_WIDTH doubles
# [i*U_WIDTH, (i+1)*U_WIDTH) of one PCG64 stream seeded with (seed, split), so
# it does not depend on num_samples and can be generated on its own.
_U_N, _U_KIND, _U_TARGET = 0, 1, 2
_U_SHAPE = slice(3, 3 + len(SHAPES))
_U_COLOUR = slice(6, 6 + len(COLOURS))
_U_SIZE = slice(12, 12 + MAX_SHAPES)
_U_POS = 15
# After the placement tries: the existence question (is it one, present or absent object, which object) and the
# preference pair (existence or caption, present or absent / which caption object, which absent object). New
# columns leave every earlier decision, so every sample without an existence question, as it was.
_U_EXIST, _U_EXIST_ASK, _U_EXIST_PICK, _U_PAIR_KIND, _U_PAIR_ASK, _U_PAIR_PICK = range(399, 405)
U_WIDTH = 512
assert _U_POS + MAX_SHAPES * PLACEMENT_TRIES * 2 <= _U_EXIST and _U_PAIR_PICK < U_WIDTH

_SPLIT_KEYS = {"train": 0, "eval": 1}


def color_question(shape: str) -> str:
    return f"what color is the {shape} ?"


def shape_question(colour: str) -> str:
    return f"what shape is {colour} ?"


CAPTION_QUESTION = "describe the image ."


def exists_question(obj: str) -> str:
    """The POPE question about object ``obj`` (``"red square"``)."""
    return f"is there a {obj} in the image ?"


#: Texts of the words the existence questions add to the synthetic tokenizer (``existence=True``).
EXISTENCE_TEXTS: tuple[str, ...] = (exists_question(""), "yes", "no")


def caption_text(objects_left_to_right: Sequence[tuple[str, str]]) -> str:
    """``[(colour, shape), ...]`` → ``"a red square and a blue circle"``."""
    return " and ".join(f"a {c} {s}" for c, s in objects_left_to_right)


def vocabulary_texts() -> list[str]:
    """Texts whose words make up the closed data vocabulary (fixed order)."""
    return [
        color_question(""),
        shape_question(""),
        CAPTION_QUESTION,
        caption_text([("", "")] * 2),
        *COLOURS,
        *SHAPES,
    ]


def shape_sizes(image_size: int) -> tuple[int, int]:
    """Inclusive range of shape sizes (px): 12..15 at 32², scaled proportionally."""
    lo = max(3, int(round(12 * image_size / 32)))
    hi = max(lo, min(image_size, int(round(15 * image_size / 32))))
    return lo, hi


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape filling its bounding box."""
    c = np.arange(size, dtype=np.float64) + 0.5
    ys, xs = c[:, None], c[None, :]
    half = size / 2.0
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = (xs - half) ** 2 + (ys - half) ** 2 <= half * half
    elif shape == "triangle":  # apex up, base at the bottom row
        m = np.abs(xs - half) <= (ys / size) * half + 0.25
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


@lru_cache(maxsize=None)
def shape_area(shape: str, size: int) -> int:
    return int(shape_mask(shape, size).sum())


def split_key(split: str) -> int:
    return _SPLIT_KEYS.get(split, zlib.crc32(split.encode("utf-8")) + 2)


def sample_uniforms(seed: int, split: str, start: int, count: int) -> np.ndarray:
    """``float64 [count, U_WIDTH]`` uniforms of samples ``start .. start+count-1``."""
    bitgen = np.random.PCG64(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, split_key(split)])
    )
    if start:
        bitgen.advance(int(start) * U_WIDTH)
    return np.random.Generator(bitgen).random((int(count), U_WIDTH))


def _plan(u: np.ndarray, image_size: int, min_shapes: int, max_shapes: int) -> dict:
    """Vectorised layout decisions for a block of samples (uniforms ``u``)."""
    N = u.shape[0]
    lo, hi = shape_sizes(image_size)
    n = min_shapes + np.floor(u[:, _U_N] * (max_shapes - min_shapes + 1)).astype(np.int64)
    n = np.minimum(n, max_shapes)
    shape_ids = np.argsort(u[:, _U_SHAPE], axis=1, kind="stable")[:, :MAX_SHAPES]
    colour_ids = np.argsort(u[:, _U_COLOUR], axis=1, kind="stable")[:, :MAX_SHAPES]
    sizes = np.minimum(lo + np.floor(u[:, _U_SIZE] * (hi - lo + 1)).astype(np.int64), hi)

    pos = u[:, _U_POS : _U_POS + MAX_SHAPES * PLACEMENT_TRIES * 2]
    pos = pos.reshape(N, MAX_SHAPES, PLACEMENT_TRIES, 2)
    room = (image_size - sizes + 1)[:, :, None]  # [N, 3, 1]
    cy = np.minimum(np.floor(pos[..., 0] * room).astype(np.int64), room - 1)  # [N, 3, K]
    cx = np.minimum(np.floor(pos[..., 1] * room).astype(np.int64), room - 1)

    rows = np.arange(N)
    y0 = np.zeros((N, MAX_SHAPES), dtype=np.int64)
    x0 = np.zeros((N, MAX_SHAPES), dtype=np.int64)
    y0[:, 0], x0[:, 0] = cy[:, 0, 0], cx[:, 0, 0]
    for j in range(1, MAX_SHAPES):
        sj = sizes[:, j, None]
        score = np.zeros((N, PLACEMENT_TRIES))
        for k in range(j):
            sk, yk, xk = sizes[:, k, None], y0[:, k, None], x0[:, k, None]
            ix = np.clip(np.minimum(cx[:, j] + sj, xk + sk) - np.maximum(cx[:, j], xk), 0, None)
            iy = np.clip(np.minimum(cy[:, j] + sj, yk + sk) - np.maximum(cy[:, j], yk), 0, None)
            score = np.maximum(score, ix * iy / np.minimum(sj, sk) ** 2)
        ok = score <= OVERLAP_FRAC
        choice = np.where(ok.any(axis=1), ok.argmax(axis=1), score.argmin(axis=1))
        y0[:, j], x0[:, j] = cy[rows, j, choice], cx[rows, j, choice]

    kind = np.searchsorted(np.cumsum(KIND_PROBS)[:-1], u[:, _U_KIND], side="right")
    target = np.minimum(np.floor(u[:, _U_TARGET] * n).astype(np.int64), n - 1)
    return dict(
        n=n, shape_ids=shape_ids, colour_ids=colour_ids, sizes=sizes, y0=y0, x0=x0,
        kind=kind, target=target, u_exist=u[:, _U_EXIST], u_exist_ask=u[:, _U_EXIST_ASK],
        u_exist_pick=u[:, _U_EXIST_PICK], u_pair_kind=u[:, _U_PAIR_KIND], u_pair_ask=u[:, _U_PAIR_ASK],
        u_pair_pick=u[:, _U_PAIR_PICK],
    )


_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.uint8)


def _paint(images: np.ndarray, plan: dict) -> np.ndarray:
    """Draw the planned shapes into ``images`` (background already set), in draw
    order (later shapes on top).  Returns visible pixels per shape ``[N, 3]``."""
    N, H, W, _ = images.shape
    owner = np.full((N, H, W), -1, dtype=np.int8)
    n, sizes = plan["n"], plan["sizes"]
    for j in range(MAX_SHAPES):
        drawn = n > j
        for t, shape in enumerate(SHAPES):
            for s in np.unique(sizes[drawn, j]):
                sel = np.flatnonzero(drawn & (plan["shape_ids"][:, j] == t) & (sizes[:, j] == s))
                if sel.size == 0:
                    continue
                dy, dx = np.nonzero(shape_mask(shape, int(s)))
                yy = plan["y0"][sel, j, None] + dy  # [m, P]
                xx = plan["x0"][sel, j, None] + dx
                ii = sel[:, None]
                images[ii, yy, xx] = _PALETTE_RGB[plan["colour_ids"][sel, j]][:, None, :]
                owner[ii, yy, xx] = j
    flat = owner.reshape(N, -1)
    return np.stack([(flat == j).sum(axis=1) for j in range(MAX_SHAPES)], axis=1)


def _left_to_right(objects: list[dict]) -> list[int]:
    return sorted(
        range(len(objects)),
        key=lambda k: (
            objects[k]["x"] + objects[k]["size"] / 2,
            objects[k]["y"] + objects[k]["size"] / 2,
            k,
        ),
    )


def _conversation(objects: list[dict], kind: str, target: int) -> tuple[str, str]:
    if kind == "color":
        return color_question(objects[target]["shape"]), objects[target]["colour"]
    if kind == "shape":
        return shape_question(objects[target]["colour"]), objects[target]["shape"]
    order = _left_to_right(objects)
    return CAPTION_QUESTION, caption_text([(objects[k]["colour"], objects[k]["shape"]) for k in order])


def _pick(items: Sequence, u: float):
    return items[min(int(u * len(items)), len(items) - 1)]


def _existence(present: list[str], ask: float, pick: float) -> tuple[str, str, str]:
    """``(question, answer, object)``: about a present object when ``ask`` < 0.5 (or when every object is present),
    else about an absent one."""
    absent = [o for o in OBJECTS if o not in present]
    if ask < 0.5 or not absent:
        obj = _pick(present, pick)
        return exists_question(obj), "yes", obj
    obj = _pick(absent, pick)
    return exists_question(obj), "no", obj


def preference_pair(objects: list[dict], kind: float, ask: float, pick: float) -> dict:
    """A preference pair for an image with ``objects`` whose rejected answer names an absent object: an existence
    question answered wrongly (``kind`` < 0.5; the asked object absent when ``ask`` >= 0.5, the rejected answer then
    ``yes``), else the caption with one object (``ask`` picks which) replaced by an absent one (``pick``)."""
    present = [f"{o['colour']} {o['shape']}" for o in objects]
    if kind < 0.5:
        question, answer, obj = _existence(present, ask, pick)
        return {"question": question, "chosen": answer, "rejected": "no" if answer == "yes" else "yes",
                "kind": "exists"}
    order = _left_to_right(objects)
    names = [present[k] for k in order]
    absent = [o for o in OBJECTS if o not in present]
    swap = _pick(range(len(names)), ask)
    wrong = list(names)
    wrong[swap] = _pick(absent, pick)
    return {"question": CAPTION_QUESTION, "chosen": " and ".join(f"a {o}" for o in names),
            "rejected": " and ".join(f"a {o}" for o in wrong), "kind": "caption"}


def generate_split(
    num_samples: int,
    image_size: int,
    *,
    min_shapes: int = 1,
    max_shapes: int = MAX_SHAPES,
    split: str = "train",
    seed: int = 1234,
    start: int = 0,
    chunk: int = 2048,
    exist_share: float = 0.0,
) -> tuple[np.ndarray, list[dict]]:
    """Images ``uint8 [N, H, W, 3]`` and metadata of samples ``start .. start+N-1``; ``exist_share`` of them ask an
    existence question (module docstring)."""
    if not 1 <= min_shapes <= max_shapes <= MAX_SHAPES:
        raise ValueError(
            f"need 1 <= min_shapes <= max_shapes <= {MAX_SHAPES}, got {min_shapes}, {max_shapes}"
        )
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    images = np.empty((num_samples, image_size, image_size, 3), dtype=np.uint8)
    images[...] = np.asarray(BACKGROUND, dtype=np.uint8)
    meta: list[dict] = []
    for c0 in range(0, num_samples, chunk):
        c1 = min(num_samples, c0 + chunk)
        u = sample_uniforms(seed, split, start + c0, c1 - c0)
        plan = _plan(u, image_size, min_shapes, max_shapes)
        visible = _paint(images[c0:c1], plan)
        cols = {k: v.tolist() for k, v in plan.items()}
        vis = visible.tolist()
        for r in range(c1 - c0):
            objects = []
            for j in range(cols["n"][r]):
                shape = SHAPES[cols["shape_ids"][r][j]]
                s = cols["sizes"][r][j]
                objects.append(
                    {
                        "shape": shape,
                        "colour": COLOURS[cols["colour_ids"][r][j]],
                        "x": cols["x0"][r][j],
                        "y": cols["y0"][r][j],
                        "size": s,
                        "area": shape_area(shape, s),
                        "pixels": vis[r][j],
                    }
                )
            kind = KINDS[cols["kind"][r]]
            target = cols["target"][r]
            names = [f"{o['colour']} {o['shape']}" for o in objects]
            if cols["u_exist"][r] < exist_share:
                kind = "exists"
                question, answer, asked = _existence(names, cols["u_exist_ask"][r], cols["u_exist_pick"][r])
                target = names.index(asked) if asked in names else None
            else:
                question, answer = _conversation(objects, kind, target)
            meta.append(
                {
                    "index": start + c0 + r,
                    "kind": kind,
                    "question": question,
                    "answer": answer,
                    "target": target if kind != "caption" else None,
                    "colours_present": [o["colour"] for o in objects],
                    "shapes_present": [o["shape"] for o in objects],
                    "objects": objects,
                    "object_names": names,
                    "pair": preference_pair(objects, cols["u_pair_kind"][r], cols["u_pair_ask"][r],
                                            cols["u_pair_pick"][r]),
                }
            )
    return images, meta


# --------------------------------------------------------------------------------------------------------------
# The synthetic tokenizer: a tiny word-level tokenizer over the closed vocabulary of this data set plus the words of
# the registered conversation templates, built in-process from HF ``tokenizers`` (nothing is downloaded) and wrapped
# as a ``transformers`` fast tokenizer, so that the rest of the code treats it exactly like a real LLM tokenizer.
# --------------------------------------------------------------------------------------------------------------


def _split_words(text: str, specials: set[str]) -> list[str]:
    """Pieces the Whitespace pre-tokenizer makes of ``text`` (special tokens removed)."""
    from tokenizers import pre_tokenizers

    for s in specials:
        text = text.replace(s, " ")
    return [piece for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def _synthetic_templates(templates=None) -> tuple[list, list]:
    """(default templates, extra templates): the default ones are the registered templates with
    ``in_synthetic_vocab``; ``templates`` (names or objects) adds others after them."""
    default = [t for t in TEMPLATES.values() if t.in_synthetic_vocab]
    names = {t.name for t in default}
    extra = []
    for t in templates or ():
        t = get_template(t)
        if t.name not in names:
            names.add(t.name)
            extra.append(t)
    return default, extra


def synthetic_special_tokens(templates=None) -> list[str]:
    """Special tokens of the synthetic tokenizer: the fixed ones, then template ones
    (those of ``templates`` last)."""
    default, extra = _synthetic_templates(templates)
    specials = list(SPECIAL_TOKENS)
    for tmpl in default + extra:
        for t in tmpl.special_tokens:
            if t not in specials:
                specials.append(t)
    return specials


def synthetic_vocabulary(templates=None, existence: bool = False) -> list[str]:
    """The ordered vocabulary (special tokens first) of the synthetic tokenizer.

    Order is deterministic: special tokens, then the data-set words, then the
    template words in registration order of the templates; each word once.
    Adding a template later only appends words, existing ids never move.
    ``templates`` names templates that are not in the default vocabulary
    (``in_synthetic_vocab=False``, e.g. ``chatml``): their special tokens and
    words are appended after everything else, so the ids of the default
    vocabulary stay the same.
    """
    default, extra = _synthetic_templates(templates)
    base_specials = synthetic_special_tokens()
    specials = synthetic_special_tokens(templates)
    special_set = set(specials)

    words: list[str] = list(base_specials)
    seen = set(words)

    def add(text: str) -> None:
        for w in _split_words(text, special_set):
            if w not in seen:
                seen.add(w)
                words.append(w)

    for text in vocabulary_texts():
        add(text)
    for tmpl in default:
        for text in tmpl.texts():
            add(text)
    for t in specials:
        if t not in seen:
            seen.add(t)
            words.append(t)
    for tmpl in extra:
        for text in tmpl.texts():
            add(text)
    if existence:  # last: every other id stays where it is
        for text in EXISTENCE_TEXTS:
            add(text)
    return words


def build_synthetic_tokenizer(out_dir: str | None = None, templates=None, existence: bool = False):
    """Build the word-level tokenizer of the synthetic data.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` = 0,
    ``<s>`` (bos), ``</s>`` (eos), ``<unk>`` and ``<image>`` as special tokens.
    No post-processor: nothing is added implicitly; the conversation template
    writes ``<s>``/``</s>`` explicitly.  If ``out_dir`` is given the tokenizer
    is also ``save_pretrained`` there (loadable with :func:`load_tokenizer`).
    ``templates``: extra conversation templates whose words and special tokens
    are appended (see :func:`synthetic_vocabulary`); without it the vocabulary
    is the default one. ``load_tokenizer(None)`` returns it. ``existence``: add the words of the existence
    questions and preference pairs (:data:`EXISTENCE_TEXTS`), after every other word.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = synthetic_vocabulary(templates, existence)
    vocab = {w: i for i, w in enumerate(words)}
    assert vocab[PAD_TOKEN] == 0

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = synthetic_special_tokens(templates)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in specials]
    )

    extra = [t for t in specials if t not in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=extra,
        padding_side="right",
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok


class SyntheticVLMDataset(Dataset):
    """Deterministic rendered-shapes VQA/caption data set (see module docstring).

    ``__getitem__(i)`` → ``input_ids`` LongTensor[max_seq_len], ``labels``
    LongTensor[max_seq_len] (unshifted, -100 = ignored), ``images`` uint8
    ``[1, H, W, 3]``.  Use :meth:`collate_fn` (or ``batch.collate`` with
    ``image_mean``/``image_std``) to batch and normalize.
    """

    def __init__(
        self,
        tokenizer,
        *,
        num_samples: int,
        image_size: int,
        num_image_tokens: int,
        max_seq_len: int,
        min_shapes: int = 1,
        max_shapes: int = 3,
        split: str = "train",
        seed: int = 1234,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        template: str = "vicuna",
        expand=None,
        image_token: str = IMAGE_TOKEN,
        exist_share: float = 0.0,
    ):
        """``num_image_tokens``, ``expand`` and ``image_token``: how the model family expands an image (one square crop
        each: the rendered image is already the encoder's size). ``exist_share``: the share of existence questions
        (the tokenizer then needs the existence words: ``build_synthetic_tokenizer(existence=True)``)."""
        self.tokenizer = tokenizer
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.max_seq_len = int(max_seq_len)
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.split, self.seed = split, int(seed)
        self.image_mean = tuple(float(v) for v in np.broadcast_to(image_mean, (3,)))
        self.image_std = tuple(float(v) for v in np.broadcast_to(image_std, (3,)))
        self.template = template
        self.num_images_per_sample = 1
        self._image_text = {"expand": expand, "image_token": image_token}

        self.images, self._meta = generate_split(
            self.num_samples,
            self.image_size,
            min_shapes=self.min_shapes,
            max_shapes=self.max_shapes,
            split=split,
            seed=self.seed,
            exist_share=exist_share,
        )
        # Few distinct conversations: encode each once (also fails fast with
        # SampleTooLong at construction rather than in a DataLoader worker).
        self._encoded: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._prompts: dict[str, torch.Tensor] = {}
        for m in self._meta:
            key = (m["question"], m["answer"])
            if key not in self._encoded:
                self._encoded[key] = encode_conversation(
                    tokenizer,
                    [key],
                    self.num_images_per_sample,
                    self.num_image_tokens,
                    self.max_seq_len,
                    template=template,
                    **self._image_text,
                )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = self._check_index(i)
        m = self._meta[i]
        enc = self._encoded[(m["question"], m["answer"])]
        return {
            "input_ids": enc["input_ids"].clone(),
            "labels": enc["labels"].clone(),
            "images": torch.from_numpy(self.images[i : i + 1].copy()),
        }

    def pair(self, i: int) -> dict:
        """Sample ``i``'s preference pair (``meta["pair"]``) encoded: ``chosen`` and ``rejected`` (each
        ``input_ids`` / ``labels`` LongTensor[max_seq_len], the same prompt and image), ``images`` uint8
        ``[1, H, W, 3]``."""
        i = self._check_index(i)
        p = self._meta[i]["pair"]
        out = {}
        for side in ("chosen", "rejected"):
            key = (p["question"], p[side])
            if key not in self._encoded:
                self._encoded[key] = encode_conversation(
                    self.tokenizer, [key], self.num_images_per_sample, self.num_image_tokens, self.max_seq_len,
                    template=self.template, **self._image_text)
            out[side] = {k: v.clone() for k, v in self._encoded[key].items()}
        out["images"] = torch.from_numpy(self.images[i : i + 1].copy())
        return out

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return i

    def question(self, i: int) -> dict:
        """Metadata of sample ``i``: ``kind`` ('color'|'shape'|'caption'),
        ``question``, ``answer``, ``colours_present``, ``shapes_present``,
        ``objects`` (draw order: shape, colour, x, y, size, area, pixels
        visible), ``target``, ``index``."""
        m = self._meta[self._check_index(i)]
        return {
            **m,
            "colours_present": list(m["colours_present"]),
            "shapes_present": list(m["shapes_present"]),
            "objects": [dict(o) for o in m["objects"]],
        }

    def prompt_ids(self, i: int) -> torch.Tensor:
        """Unpadded prompt ids (through ``ASSISTANT:``) of sample ``i``."""
        q = self._meta[self._check_index(i)]["question"]
        if q not in self._prompts:
            self._prompts[q] = encode_prompt(
                self.tokenizer,
                q,
                self.num_images_per_sample,
                self.num_image_tokens,
                self.max_seq_len,
                template=self.template,
                **self._image_text,
            )
        return self._prompts[q].clone()

    def eval_items(self, kind: str = "color") -> list[dict]:
        """Greedy-eval items for the questions of ``kind`` in this split.

        Each: ``prompt_ids`` LongTensor (unpadded), ``image`` uint8 [H, W, 3],
        ``answer`` str, ``choices`` (the 6 colours for 'color', the 3 shapes for
        'shape', yes/no for 'exists', None for 'caption'), ``question`` str, ``index`` int.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
        choices = {"color": list(COLOURS), "shape": list(SHAPES), "caption": None, "exists": ["yes", "no"]}[kind]
        items = []
        for m in self._meta:
            if m["kind"] != kind:
                continue
            i = m["index"]
            items.append(
                {
                    "prompt_ids": self.prompt_ids(i),
                    "image": torch.from_numpy(self.images[i].copy()),
                    "answer": m["answer"],
                    "choices": list(choices) if choices is not None else None,
                    "question": m["question"],
                    "index": i,
                }
            )
        return items

    def collate_fn(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``batch.collate`` with this data set's image mean/std."""
        return collate(samples, self.image_mean, self.image_std)


def write_synthetic_shards(
    out_dir: str,
    num_samples: int,
    image_size: int = 32,
    seed: int = 1234,
    *,
    split: str = "train",
    min_shapes: int = 1,
    max_shapes: int = MAX_SHAPES,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = False,
    exist_share: float = 0.0,
    preference: bool = False,
) -> dict:
    """Render samples ``0 .. num_samples-1`` of ``(seed, split)`` to PNG and write them as shards.

    Same writer (and layout) as ``megavlm data convert`` (:func:`megavlm.data.shards.write_shards`):
    each sample is ``{"conversations": [human "<image>\\n{question}", gpt "{answer}"], "images": [...]}``
    with its image as ``KEY.0.png``, and ``objects`` (the names of the objects in the image, for ``megavlm eval
    --task pope``). ``preference``: each sample's preference pair instead, as ``megavlm data convert --format
    preference`` writes it (``conversations`` = the question, ``chosen``, ``rejected``). Returns the writer's summary.
    """
    import io

    from PIL import Image

    from megavlm.data.shards import write_shards

    def records():
        for c0 in range(0, num_samples, 2048):
            n = min(2048, num_samples - c0)
            images, meta = generate_split(n, image_size, min_shapes=min_shapes, max_shapes=max_shapes,
                                          split=split, seed=seed, start=c0, exist_share=exist_share)
            for img, m in zip(images, meta):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                if preference:
                    p = m["pair"]
                    text = {"conversations": [{"from": "human", "value": "<image>\n" + p["question"]}],
                            "chosen": p["chosen"], "rejected": p["rejected"]}
                else:
                    text = {"conversations": [{"from": "human", "value": "<image>\n" + m["question"]},
                                              {"from": "gpt", "value": m["answer"]}]}
                yield {"id": f"synthetic-{split}-{m['index']}", **text, "images": [buf.getvalue()],
                       "objects": m["object_names"]}

    return write_shards(records(), out_dir, shard_size, workers=workers, progress=progress, total=num_samples,
                        extra_summary=_fingerprint(num_samples, image_size, seed, split, min_shapes, max_shapes,
                                                   exist_share, preference), preference=preference)


def _fingerprint(num_samples, image_size, seed, split, min_shapes, max_shapes, exist_share=0.0,
                 preference=False) -> dict:
    out = {"format": "synthetic", "split": split, "seed": int(seed), "image_size": int(image_size),
           "num_samples": int(num_samples), "min_shapes": int(min_shapes), "max_shapes": int(max_shapes)}
    # only when used: sets written before these existed keep matching
    if exist_share and not preference:
        out["exist_share"] = float(exist_share)
    if preference:
        out["preference"] = True
    return out


#: Fingerprint keys written only when they differ from these values.
_OPTIONAL = {"exist_share": 0.0, "preference": False}


def ensure_synthetic_shards(out_dir: str, num_samples: int, image_size: int, seed: int, *, min_shapes: int = 1,
                            max_shapes: int = MAX_SHAPES, workers: int = 1, progress: bool = False,
                            exist_share: float = 0.0, preference: bool = False) -> dict | None:
    """The training split of the synthetic set as shards in ``out_dir``, written unless a complete set with the same
    parameters is already there (its ``summary.json`` says so). Returns the new summary, or None when kept.

    A set written with other parameters is replaced (only one that ``summary.json`` marks as synthetic: anything
    else in ``out_dir`` raises UserError and is left alone). Writing goes to ``out_dir.tmp-PID`` and is renamed into
    place when complete, so an interrupted run leaves no set that looks complete."""
    import json
    import shutil

    from megavlm.errors import UserError

    want = _fingerprint(num_samples, image_size, seed, "train", min_shapes, max_shapes, exist_share, preference)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; give data.shards a directory for the synthetic data")
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            with open(summary_path) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = {}
        if have.get("format") != "synthetic":
            raise UserError(f"{out_dir} is not empty and holds no synthetic shard set; give data.shards a new "
                            "directory for the synthetic data")
        if all(have.get(k, v if k in _OPTIONAL else None) == v for k, v in want.items()) and all(
                have.get(k, _OPTIONAL[k]) == want.get(k, _OPTIONAL[k]) for k in _OPTIONAL):
            return None
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = write_synthetic_shards(tmp, num_samples, image_size, seed, min_shapes=min_shapes,
                                         max_shapes=max_shapes, workers=workers, progress=progress,
                                         exist_share=exist_share, preference=preference)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
