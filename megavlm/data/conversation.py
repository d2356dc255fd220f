"""Conversation templates and the (input_ids, labels) encoding of a sample.

A template is a table entry (:class:`ConversationTemplate`) that says which
text goes around the user questions and the assistant answers.  The encoding
is generic over templates:

    prefix
    [turn_separator]  user_prefix  <image>*k  question  user_suffix  assistant_prefix   (not supervised)
                      answer  answer_suffix                                            (supervised)
    ... repeated per turn ...

pieces are joined with ``template.sep``.  ``vicuna`` (the default) gives, for a
single-turn sample,

    <s> USER: <image> {question} ASSISTANT: {answer} </s>

Image tokens are expanded HF-LLaVA style: every ``<image>`` becomes
``num_image_tokens`` copies of the image token id; the model scatters the
image features into exactly those positions.

Labels are *not* shifted: ``labels[t] == input_ids[t]`` on the assistant
answers and their end-of-answer text (``</s>`` for vicuna), ``-100``
everywhere else (prompt, image tokens, padding).  The loss must predict
``labels[t+1]`` from position ``t`` (HF convention).

Built-in templates: ``vicuna`` (default, above), ``plain`` (LLaVA stage 1),
``vicuna_v1``, ``llama_2`` and ``chatml`` (LLaVA / LLaVA-NeXT's chat formats;
see docs/data.md for the exact text of each).  To add one, add an entry to
:data:`TEMPLATES` (or call :func:`register_template`); the synthetic tokenizer
picks up its words and special tokens automatically unless the template says
``in_synthetic_vocab=False`` (the built-ins past ``vicuna`` do, so that the
default synthetic vocabulary, and with it the model's vocab size, does not
change; ``build_synthetic_tokenizer(templates=[...])`` adds them).

No megatron import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from megavlm.data.tokenizer import IMAGE_TOKEN, image_token_id
from megavlm.errors import UserError

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "vicuna"


class SampleTooLong(ValueError):
    """The encoded sample does not fit ``max_seq_len``.

    Raised instead of truncating, because truncation could cut the image
    tokens (the model requires exactly ``num_image_tokens`` per image).
    """

    def __init__(self, length: int, max_seq_len: int, what: str = "sample"):
        self.length = int(length)
        self.max_seq_len = int(max_seq_len)
        super().__init__(
            f"{what} needs {self.length} tokens (image tokens included) but "
            f"max_seq_len is {self.max_seq_len}; increase max_seq_len or reduce "
            f"num_image_tokens (samples are never truncated)"
        )


@dataclass(frozen=True)
class ConversationTemplate:
    """Text around the turns of a conversation (see the module docstring)."""

    name: str
    prefix: str = ""  # once, at the very start (bos, system prompt)
    user_prefix: str = ""  # start of every user turn
    user_suffix: str = ""  # after the question, before assistant_prefix
    assistant_prefix: str = ""  # end of the prompt; generation starts after it
    answer_suffix: str = ""  # after every answer; supervised (e.g. "</s>")
    turn_separator: str = ""  # between turns; not supervised
    sep: str = " "  # joins the non-empty pieces
    include_question: bool = True  # False for caption-only ("plain") pretraining
    special_tokens: tuple[str, ...] = field(default_factory=tuple)  # never split
    # Optional refinements (their defaults keep the behaviour above):
    first_user_prefix: str | None = None  # user_prefix of the first turn (llama_2 puts the system prompt there)
    answer_prefix: str = ""  # supervised text right before every answer (e.g. " " after "ASSISTANT:")
    answer_sep: str | None = None  # joins answer and answer_suffix (None: sep)
    image_join: str | None = None  # implicit images: "<image>"*k + image_join + question, one piece (None: pieces)
    in_synthetic_vocab: bool = True  # words/special tokens go into the default synthetic tokenizer

    def texts(self) -> list[str]:
        """All literal text of the template (for building a closed vocabulary)."""
        return [
            self.prefix,
            self.user_prefix,
            self.user_suffix,
            self.assistant_prefix,
            self.answer_suffix,
            self.turn_separator,
            self.first_user_prefix or "",
            self.answer_prefix,
        ]


VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")
CHATML_SYSTEM = "You are a helpful assistant."


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna": ConversationTemplate(
        name="vicuna",
        prefix="<s>",
        user_prefix="USER:",
        assistant_prefix="ASSISTANT:",
        answer_suffix="</s>",
    ),
    # LLaVA stage 1 (conv_llava_plain): "<s><image>caption</s>"; the question text is dropped, no roles.
    "plain": ConversationTemplate(
        name="plain",
        prefix="<s>",
        sep="",
        answer_suffix="</s>",
        include_question=False,
        in_synthetic_vocab=False,
    ),
    # LLaVA conv_vicuna_v1: "<s>{sys} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>"
    "vicuna_v1": ConversationTemplate(
        name="vicuna_v1",
        prefix="<s>" + VICUNA_V1_SYSTEM,
        user_prefix="USER:",
        assistant_prefix="ASSISTANT:",
        answer_prefix=" ",
        answer_sep="",
        answer_suffix="</s>",
        image_join="\n",
        in_synthetic_vocab=False,
    ),
    # LLaVA conv_llava_llama_2:
    # "<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q} [/INST] {a} </s>"
    "llama_2": ConversationTemplate(
        name="llama_2",
        first_user_prefix=f"<s>[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n",
        user_prefix="<s>[INST] ",
        assistant_prefix=" [/INST]",
        answer_prefix=" ",
        answer_sep=" ",
        answer_suffix="</s>",
        sep="",
        image_join="\n",
        in_synthetic_vocab=False,
    ),
    # ChatML (LLaVA-NeXT / Qwen): "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
    # "<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n..."
    "chatml": ConversationTemplate(
        name="chatml",
        prefix=f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        answer_sep="",
        answer_suffix="<|im_end|>",
        turn_separator="\n",
        sep="",
        image_join="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        in_synthetic_vocab=False,
    ),
}


def register_template(template: ConversationTemplate, *, overwrite: bool = False) -> None:
    if template.name in TEMPLATES and not overwrite:
        raise ValueError(f"conversation template {template.name!r} already registered")
    TEMPLATES[template.name] = template


def get_template(template: Union[str, ConversationTemplate, None]) -> ConversationTemplate:
    if template is None:
        return TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(template, ConversationTemplate):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}"
        ) from None


Turns = Sequence[tuple[str, str]]


def _runs(
    tmpl: ConversationTemplate,
    turns: Sequence[tuple[str, str | None]],
    num_images: int,
    with_last_answer: bool,
) -> list[tuple[str, bool]]:
    """The conversation as alternating runs of (text, supervised)."""
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    explicit = sum(str(q).count(IMAGE_TOKEN) for q, _ in turns)
    if explicit and explicit != num_images:
        raise ValueError(
            f"the turns contain {explicit} {IMAGE_TOKEN!r} placeholders but num_images={num_images}"
        )
    for _, a in turns:
        if a is not None and IMAGE_TOKEN in a:
            raise ValueError(f"{IMAGE_TOKEN!r} is not allowed in an assistant answer")

    runs: list[tuple[str, bool]] = []
    prompt: list[str] = [tmpl.prefix]
    for i, (q, a) in enumerate(turns):
        last = i == len(turns) - 1
        if i > 0:
            prompt.append(tmpl.turn_separator)
        first_prefix = tmpl.first_user_prefix if tmpl.first_user_prefix is not None else tmpl.user_prefix
        prompt.append(first_prefix if i == 0 else tmpl.user_prefix)
        if i == 0 and not explicit and num_images > 0:
            if tmpl.image_join is None:
                prompt.extend([IMAGE_TOKEN] * num_images)
            else:
                images = IMAGE_TOKEN * num_images
                if not tmpl.include_question:
                    prompt.append(images)
                else:
                    q = images + tmpl.image_join + q if q else images
        if tmpl.include_question:
            prompt.append(q)
        elif IMAGE_TOKEN in q:  # keep explicit image placeholders even without question text
            prompt.extend([IMAGE_TOKEN] * q.count(IMAGE_TOKEN))
        prompt.append(tmpl.user_suffix)
        prompt.append(tmpl.assistant_prefix)
        if last and not with_last_answer:
            break
        if a is None:
            raise ValueError(f"turn {i} has no answer")
        runs.append((tmpl.sep.join(p for p in prompt if p), False))
        answer_sep = tmpl.sep if tmpl.answer_sep is None else tmpl.answer_sep
        runs.append((tmpl.answer_prefix + answer_sep.join(p for p in (a, tmpl.answer_suffix) if p), True))
        prompt = []
    if prompt:
        runs.append((tmpl.sep.join(p for p in prompt if p), False))
    return runs


def _tokenize_runs(
    tok, runs: list[tuple[str, bool]], num_images: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    img_id = image_token_id(tok) if num_images > 0 else None
    ids: list[int] = []
    labels: list[int] = []
    seen_images = 0
    for text, supervised in runs:
        if not text:
            continue
        piece = tok(text, add_special_tokens=False)["input_ids"]
        if supervised:
            if img_id is not None and img_id in piece:
                raise ValueError(f"{IMAGE_TOKEN!r} token inside a supervised answer")
            ids.extend(piece)
            labels.extend(piece)
            continue
        for t in piece:
            if img_id is not None and t == img_id:
                ids.extend([img_id] * num_image_tokens)
                labels.extend([IGNORE_INDEX] * num_image_tokens)
                seen_images += 1
            else:
                ids.append(t)
                labels.append(IGNORE_INDEX)
    if seen_images != num_images:
        raise ValueError(
            f"expected {num_images} {IMAGE_TOKEN!r} tokens after tokenization, found "
            f"{seen_images} (does the tokenizer keep {IMAGE_TOKEN!r} as one token?)"
        )
    return ids, labels


def _pad_id(tok) -> int:
    for attr in ("pad_token_id", "unk_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_conversation(
    tok,
    turns: Turns,
    num_images: int,
    num_image_tokens: int,
    max_seq_len: int,
    *,
    template: Union[str, ConversationTemplate, None] = DEFAULT_TEMPLATE,
) -> dict[str, torch.Tensor]:
    """Encode a full conversation for training.

    ``turns`` is a list of ``(question, answer)``.  Unless the questions contain
    explicit ``<image>`` placeholders, ``num_images`` of them are put in front
    of the first question.  Returns ``input_ids`` and ``labels``, both
    ``LongTensor[max_seq_len]``, right-padded with the pad id / -100.  Raises
    :class:`SampleTooLong` if the sequence does not fit (never truncates).
    """
    if num_image_tokens < 1 and num_images > 0:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    tmpl = get_template(template)
    runs = _runs(tmpl, [(q, a) for q, a in turns], num_images, with_last_answer=True)
    ids, labels = _tokenize_runs(tok, runs, num_images, num_image_tokens)
    if len(ids) > max_seq_len:
        raise SampleTooLong(len(ids), max_seq_len)
    n_pad = max_seq_len - len(ids)
    input_ids = torch.tensor(ids + [_pad_id(tok)] * n_pad, dtype=torch.long)
    label_t = torch.tensor(labels + [IGNORE_INDEX] * n_pad, dtype=torch.long)
    return {"input_ids": input_ids, "labels": label_t}


def encode_prompt(
    tok,
    turns: Union[str, Sequence[tuple[str, str | None]]],
    num_images: int,
    num_image_tokens: int,
    max_seq_len: int | None = None,
    *,
    template: Union[str, ConversationTemplate, None] = DEFAULT_TEMPLATE,
) -> torch.Tensor:
    """Prompt ids for generation, up to and including the assistant prefix.

    ``turns`` is either the question string or a list of ``(question, answer)``
    whose last answer is ignored (may be ``None``); earlier turns are history.
    Returns an unpadded ``LongTensor[L]`` (image tokens expanded).  Raises
    :class:`SampleTooLong` if ``max_seq_len`` is given and exceeded.
    """
    tmpl = get_template(template)
    if isinstance(turns, str):
        turns = [(turns, None)]
    runs = _runs(tmpl, [(q, a) for q, a in turns], num_images, with_last_answer=False)
    ids, _ = _tokenize_runs(tok, runs, num_images, num_image_tokens)
    if max_seq_len is not None and len(ids) > max_seq_len:
        raise SampleTooLong(len(ids), max_seq_len, what="prompt")
    return torch.tensor(ids, dtype=torch.long)


def _describe_tokenizer(tok) -> str:
    name = getattr(tok, "name_or_path", None)
    return f"{type(tok).__name__}({name!r})" if name else type(tok).__name__


def check_supervision(
    samples_encoded,
    max_unsupervised_share: float = 0.0,
    *,
    template: Union[str, ConversationTemplate, None] = None,
    tokenizer=None,
) -> dict:
    """Fail early when too many samples carry no supervised token.

    ``samples_encoded`` is an iterable of encoded samples (dicts with ``labels``, as
    :func:`encode_conversation` returns).  A sample whose labels are all ``-100``
    teaches nothing; many of them is LLaVA's classic "tokenization mismatch" failure
    (a template that does not fit the tokenizer, answers cut or masked away).  Raises
    :class:`~megavlm.errors.UserError` naming the template and the tokenizer when the share
    of such samples exceeds ``max_unsupervised_share``; returns
    ``{"samples", "unsupervised", "share"}`` otherwise.
    """
    n = bad = 0
    for s in samples_encoded:
        labels = torch.as_tensor(s["labels"])
        n += 1
        if not bool((labels != IGNORE_INDEX).any()):
            bad += 1
    share = bad / n if n else 0.0
    if n and share > max_unsupervised_share:
        tname = get_template(template).name if template is not None else "?"
        tokname = _describe_tokenizer(tokenizer) if tokenizer is not None else "?"
        raise UserError(
            f"{bad} of {n} samples ({share:.1%}) have no supervised token (all labels are {IGNORE_INDEX}), more "
            f"than the allowed {max_unsupervised_share:.1%}, with conversation template {tname!r} and tokenizer "
            f"{tokname}: the template probably does not fit the tokenizer (its end/role tokens are not the "
            f"tokenizer's, or answers are empty); pick the template made for this tokenizer"
        )
    return {"samples": n, "unsupervised": bad, "share": share}


def record_turns(record: dict) -> list[tuple[str, str]]:
    """A shard record's ``conversations`` (human/gpt alternating, as ``data convert`` writes them) as
    ``(question, answer)`` pairs."""
    conv = record.get("conversations") or []
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
