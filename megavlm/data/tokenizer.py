"""Tokenizers for megavlm.

The default tokenizer is a tiny word-level tokenizer over the closed
vocabulary of the embedded synthetic data set (see ``synthetic.py``) plus the
words of the registered conversation templates (see ``conversation.py``).  It
is built in-process from HF ``tokenizers`` (nothing is downloaded) and wrapped
as a ``transformers`` fast tokenizer so that the rest of the code base can
treat it exactly like a real LLM tokenizer loaded with ``AutoTokenizer``.

No megatron import here.
"""

from __future__ import annotations

import os

from ..errors import UserError

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"

# Fixed order: <pad> must be id 0.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)


def _split_words(text: str, specials: set[str]) -> list[str]:
    """Pieces the Whitespace pre-tokenizer makes of ``text`` (special tokens removed)."""
    from tokenizers import pre_tokenizers

    for s in specials:
        text = text.replace(s, " ")
    return [piece for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def _synthetic_templates(templates=None) -> tuple[list, list]:
    """(default templates, extra templates): the default ones are the registered templates with
    ``in_synthetic_vocab``; ``templates`` (names or objects) adds others after them."""
    from megavlm.data import conversation

    default = [t for t in conversation.TEMPLATES.values() if t.in_synthetic_vocab]
    names = {t.name for t in default}
    extra = []
    for t in templates or ():
        t = conversation.get_template(t)
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


def synthetic_vocabulary(templates=None) -> list[str]:
    """The ordered vocabulary (special tokens first) of the synthetic tokenizer.

    Order is deterministic: special tokens, then the data-set words, then the
    template words in registration order of the templates; each word once.
    Adding a template later only appends words, existing ids never move.
    ``templates`` names templates that are not in the default vocabulary
    (``in_synthetic_vocab=False``, e.g. ``chatml``): their special tokens and
    words are appended after everything else, so the ids of the default
    vocabulary stay the same.
    """
    # Local imports: conversation.py imports this module at top level.
    from megavlm.data import synthetic

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

    for text in synthetic.vocabulary_texts():
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
    return words


def build_synthetic_tokenizer(out_dir: str | None = None, templates=None):
    """Build the word-level tokenizer of the synthetic data.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` = 0,
    ``<s>`` (bos), ``</s>`` (eos), ``<unk>`` and ``<image>`` as special tokens.
    No post-processor: nothing is added implicitly; the conversation template
    writes ``<s>``/``</s>`` explicitly.  If ``out_dir`` is given the tokenizer
    is also ``save_pretrained`` there (loadable with :func:`load_tokenizer`).
    ``templates``: extra conversation templates whose words and special tokens
    are appended (see :func:`synthetic_vocabulary`); without it the vocabulary
    is the default one.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = synthetic_vocabulary(templates)
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


def load_tokenizer(path: str | None):
    """``None`` → the synthetic tokenizer; else ``AutoTokenizer`` from a local dir.

    Never touches the network (``local_files_only=True``).  A missing path gives
    a ``ValueError`` naming the path.
    """
    if path is None:
        return build_synthetic_tokenizer()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(
            f"tokenizer path {path!r} does not exist or is not a directory "
            "(expected a local directory written by save_pretrained; "
            "leave data.tokenizer unset (null) for the built-in synthetic tokenizer)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # e.g. directory without tokenizer files
        raise UserError(f"could not load a tokenizer from {path!r}: {e}") from e


def find_tokenizer(ckpt_path: str, configured: str | None, given: str | None = None):
    """The tokenizer of a checkpoint: ``given``, else the config's ``data.tokenizer`` (``configured``), else a
    ``tokenizer/`` folder beside the checkpoint or up to three levels above it (a run dir, a convert output), else the
    synthetic tokenizer when the config names none. Returns ``(tokenizer, where)``."""
    if given:
        cands = [given]
    else:
        up, parents = os.path.abspath(ckpt_path), []
        for _ in range(3):
            up = os.path.dirname(up)
            parents.append(os.path.join(up, "tokenizer"))
        cands = ([configured] if configured else []) + parents
    for c in cands:
        if c and os.path.isdir(c):
            try:
                return load_tokenizer(c), c
            except ValueError as e:
                raise UserError(str(e)) from e
    if given or configured:
        raise UserError(f"tokenizer not found (looked in {', '.join(cands)}); pass --tokenizer DIR")
    return load_tokenizer(None), "synthetic"


def image_token_id(tok) -> int:
    """Id of the ``<image>`` token; ValueError if the tokenizer has none."""
    ids = tok.convert_tokens_to_ids([IMAGE_TOKEN])
    tid = ids[0] if ids else None
    unk = getattr(tok, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk):
        raise UserError(
            f"tokenizer {type(tok).__name__} has no {IMAGE_TOKEN!r} token; add it as a "
            f"special token (tok.add_special_tokens({{'additional_special_tokens': "
            f"['{IMAGE_TOKEN}']}})) and resize the embedding, or use the synthetic tokenizer"
        )
    return int(tid)
