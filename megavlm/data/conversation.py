"""The (input_ids, labels) encoding of a conversation with a template (:mod:`megavlm.data.templates`).

The encoding is generic over templates:

    prefix
    [turn_separator]  user_prefix  <image>*k  question  user_suffix  assistant_prefix   (not supervised)
                      answer  answer_suffix                                            (supervised)
    ... repeated per turn ...

pieces are joined with ``template.sep``.  ``vicuna`` (the default) gives, for a
single-turn sample,

    <s> USER: <image> {question} ASSISTANT: {answer} </s>

Each ``<image>`` is expanded to the tokens its image takes (a count per image: the model family says how many, and
which ids — by default that many copies of the image token id); the model places the image features at exactly
those positions.

Labels are *not* shifted: ``labels[t] == input_ids[t]`` on the assistant
answers and their end-of-answer text (``</s>`` for vicuna), ``-100``
everywhere else (prompt, image tokens, padding). :func:`megavlm.data.batch.next_token_targets` turns them into
the next-token targets and loss mask training uses (the one place that does).

No megatron import here.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from megavlm.data.constants import IGNORE_INDEX, IMAGE_TOKEN, image_token_id, text_ids
from megavlm.data.templates import DEFAULT_TEMPLATE, ConversationTemplate, get_template
from megavlm.errors import UserError

__all__ = ["IGNORE_INDEX", "SampleTooLong", "encode_turns", "encode_conversation", "encode_prompt",
           "encode_document", "encode_record", "check_supervision", "record_turns", "get_template",
           "ConversationTemplate"]

#: The template of interleaved-document records (``{"document": text, "images": [...]}``, data/interleaved.py).
DOCUMENT_TEMPLATE = "document"


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


def _tokenize_runs(tok, runs: list[tuple[str, bool]], image_tokens: Sequence[int],
                   expand: Callable[[int], list[int]] | None = None,
                   image_token: str = IMAGE_TOKEN) -> tuple[list[int], list[int]]:
    """Token ids and (unshifted) labels of the runs; the k-th ``<image>`` becomes ``expand(image_tokens[k])`` (default:
    that many image-token ids), unsupervised. ``image_token``: the tokenizer's token the placeholder stands for (the
    model family's; ``<image>`` itself by default)."""
    img_id = image_token_id(tok, image_token) if image_tokens else None
    if expand is None:
        def expand(n: int) -> list[int]:
            return [img_id] * n
    ids: list[int] = []
    labels: list[int] = []
    seen_images = 0
    for text, supervised in runs:
        if not text:
            continue
        if image_token != IMAGE_TOKEN:
            text = text.replace(IMAGE_TOKEN, image_token)
        piece = text_ids(tok, text)
        if supervised:
            if img_id is not None and img_id in piece:
                raise ValueError(f"{IMAGE_TOKEN!r} token inside a supervised answer")
            ids.extend(piece)
            labels.extend(piece)
            continue
        for t in piece:
            if img_id is not None and t == img_id:
                if seen_images < len(image_tokens):
                    span = expand(image_tokens[seen_images])
                    ids.extend(span)
                    labels.extend([IGNORE_INDEX] * len(span))
                seen_images += 1
            else:
                ids.append(t)
                labels.append(IGNORE_INDEX)
    if seen_images != len(image_tokens):
        raise ValueError(
            f"expected {len(image_tokens)} {IMAGE_TOKEN!r} tokens after tokenization, found "
            f"{seen_images} (does the tokenizer keep {IMAGE_TOKEN!r} as one token?)"
        )
    return ids, labels


def _image_counts(num_images: int, num_image_tokens: int | Sequence[int]) -> list[int]:
    """Tokens of each image: one count for all, or one per image."""
    if isinstance(num_image_tokens, int):
        if num_image_tokens < 1 and num_images > 0:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        return [num_image_tokens] * num_images
    counts = [int(n) for n in num_image_tokens]
    if len(counts) != num_images:
        raise ValueError(f"{len(counts)} image token counts for {num_images} images")
    if any(n < 1 for n in counts):
        raise ValueError(f"num_image_tokens must be >= 1, got {counts}")
    return counts


def encode_turns(tok, turns: Sequence[tuple[str, str | None]], num_images: int,
                 num_image_tokens: int | Sequence[int], *, template=DEFAULT_TEMPLATE, with_last_answer: bool = True,
                 expand: Callable[[int], list[int]] | None = None,
                 image_token: str = IMAGE_TOKEN) -> tuple[list[int], list[int]]:
    """Unpadded ``(input_ids, labels)`` lists of a conversation (``labels`` aligned with the ids, -100 where not
    supervised); ``with_last_answer=False`` stops at the last assistant prefix (a prompt). ``num_image_tokens``: the
    tokens of every image, or one count per image; ``expand(n)`` the ids that replace one ``<image>`` of ``n`` tokens
    (the model family's image text; default: ``n`` image-token ids); ``image_token``: the tokenizer's token that
    ``<image>`` stands for (the family's)."""
    tmpl = get_template(template)
    runs = _runs(tmpl, [(q, a) for q, a in turns], num_images, with_last_answer=with_last_answer)
    return _tokenize_runs(tok, runs, _image_counts(num_images, num_image_tokens), expand, image_token)


def encode_document(tok, text: str, num_image_tokens: int | Sequence[int], *, template=DOCUMENT_TEMPLATE,
                    expand: Callable[[int], list[int]] | None = None,
                    image_token: str = IMAGE_TOKEN) -> tuple[list[int], list[int]]:
    """Unpadded ``(input_ids, labels)`` of an interleaved document: the template's prefix (unsupervised), the text
    pieces between the ``<image>`` placeholders (every token supervised), each image expanded to its tokens
    (unsupervised), then the template's ``answer_suffix`` (supervised: the model learns where a document ends)."""
    tmpl = get_template(template)
    pieces = text.split(IMAGE_TOKEN)
    runs: list[tuple[str, bool]] = [(tmpl.prefix, False)]
    for i, piece in enumerate(pieces):
        if i:
            runs.append((IMAGE_TOKEN, False))
        if piece.strip():
            runs.append((piece, True))
    runs.append((tmpl.answer_suffix, True))
    return _tokenize_runs(tok, runs, _image_counts(len(pieces) - 1, num_image_tokens), expand, image_token)


def encode_record(tok, record: dict, num_image_tokens: int | Sequence[int], max_seq_len: int, *,
                  template=DEFAULT_TEMPLATE, expand: Callable[[int], list[int]] | None = None,
                  image_token: str = IMAGE_TOKEN) -> dict[str, torch.Tensor]:
    """A shard record for training, padded to ``max_seq_len`` (:class:`SampleTooLong` if longer): a conversation
    (:func:`encode_conversation` with ``template``) or an interleaved document (:func:`encode_document`, always with
    the ``document`` template)."""
    n_images = len(record.get("images") or [])
    if "document" in record:
        if not isinstance(record["document"], str):
            raise ValueError("'document' is not a string")
        ids, labels = encode_document(tok, record["document"], num_image_tokens, expand=expand,
                                      image_token=image_token)
        return _pad(tok, ids, labels, max_seq_len)
    turns = record_turns(record)
    if not turns:
        raise ValueError("no (question, answer) turn")
    return encode_conversation(tok, turns, n_images, num_image_tokens, max_seq_len, template=template, expand=expand,
                               image_token=image_token)


def _pad(tok, ids: list[int], labels: list[int], max_seq_len: int) -> dict[str, torch.Tensor]:
    if len(ids) > max_seq_len:
        raise SampleTooLong(len(ids), max_seq_len)
    n_pad = max_seq_len - len(ids)
    return {"input_ids": torch.tensor(ids + [_pad_id(tok)] * n_pad, dtype=torch.long),
            "labels": torch.tensor(labels + [IGNORE_INDEX] * n_pad, dtype=torch.long)}


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
    num_image_tokens: int | Sequence[int],
    max_seq_len: int,
    *,
    template: Union[str, ConversationTemplate, None] = DEFAULT_TEMPLATE,
    expand: Callable[[int], list[int]] | None = None,
    image_token: str = IMAGE_TOKEN,
) -> dict[str, torch.Tensor]:
    """Encode a full conversation for training.

    ``turns`` is a list of ``(question, answer)``.  Unless the questions contain
    explicit ``<image>`` placeholders, ``num_images`` of them are put in front
    of the first question.  Returns ``input_ids`` and ``labels``, both
    ``LongTensor[max_seq_len]``, right-padded with the pad id / -100.  Raises
    :class:`SampleTooLong` if the sequence does not fit (never truncates).
    """
    ids, labels = encode_turns(tok, turns, num_images, num_image_tokens, template=template, expand=expand,
                               image_token=image_token)
    return _pad(tok, ids, labels, max_seq_len)


def encode_prompt(
    tok,
    turns: Union[str, Sequence[tuple[str, str | None]]],
    num_images: int,
    num_image_tokens: int | Sequence[int],
    max_seq_len: int | None = None,
    *,
    template: Union[str, ConversationTemplate, None] = DEFAULT_TEMPLATE,
    expand: Callable[[int], list[int]] | None = None,
    image_token: str = IMAGE_TOKEN,
) -> torch.Tensor:
    """Prompt ids for generation, up to and including the assistant prefix.

    ``turns`` is either the question string or a list of ``(question, answer)``
    whose last answer is ignored (may be ``None``); earlier turns are history.
    Returns an unpadded ``LongTensor[L]`` (image tokens expanded).  Raises
    :class:`SampleTooLong` if ``max_seq_len`` is given and exceeded.
    """
    if isinstance(turns, str):
        turns = [(turns, None)]
    ids, _ = encode_turns(tok, turns, num_images, num_image_tokens, template=template, with_last_answer=False,
                          expand=expand, image_token=image_token)
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
    ``(question, answer)`` pairs; for a preference record its chosen conversation (:func:`preference_turns`)."""
    pair = preference_turns(record)
    if pair is not None:
        return pair[0]
    conv = record.get("conversations") or []
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


def preference_turns(record: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """A preference record (``data convert --format preference``: ``conversations`` ending with the question,
    ``chosen`` and ``rejected`` answers to it) as the ``(question, answer)`` pairs of its chosen and of its rejected
    conversation; None for a record without both answers."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None
    conv = record.get("conversations") or []
    if len(conv) % 2 != 1:
        raise ValueError("a preference record's conversation must end with the question")
    turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
    q = conv[-1]["value"]
    return turns + [(q, chosen)], turns + [(q, rejected)]
