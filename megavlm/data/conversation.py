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

To add a template (``plain``, ``llama_2``, ``chatml``, ...) add an entry to
:data:`TEMPLATES` (or call :func:`register_template`); the synthetic tokenizer
picks up its words and special tokens automatically.

No megatron import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from megavlm.data.tokenizer import IMAGE_TOKEN, image_token_id

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

    def texts(self) -> list[str]:
        """All literal text of the template (for building a closed vocabulary)."""
        return [
            self.prefix,
            self.user_prefix,
            self.user_suffix,
            self.assistant_prefix,
            self.answer_suffix,
            self.turn_separator,
        ]


TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna": ConversationTemplate(
        name="vicuna",
        prefix="<s>",
        user_prefix="USER:",
        assistant_prefix="ASSISTANT:",
        answer_suffix="</s>",
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
        prompt.append(tmpl.user_prefix)
        if i == 0 and not explicit and num_images > 0:
            prompt.extend([IMAGE_TOKEN] * num_images)
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
        runs.append((tmpl.sep.join(p for p in (a, tmpl.answer_suffix) if p), True))
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
