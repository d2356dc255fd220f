"""Conversation templates plain / vicuna_v1 / llama_2 / chatml: exact text, supervised spans, and the
zero-supervision check, with a real (byte-level BPE, built here) HF tokenizer and the synthetic one."""

from __future__ import annotations

import pytest
import torch

from megavlm.data.conversation import (
    IGNORE_INDEX,
    check_supervision,
    encode_conversation,
    encode_prompt,
)
from megavlm.data.templates import TEMPLATES
from megavlm.data.tokenizer import IMAGE_TOKEN, build_synthetic_tokenizer, image_token_id
from megavlm.errors import UserError

NEW = ("plain", "vicuna_v1", "llama_2", "chatml")
N_IMG = 3  # image tokens per image
SYS_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
SYS_L2 = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")
IMG = IMAGE_TOKEN * N_IMG


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
    bk = Tokenizer(models.BPE(unk_token="<unk>"))
    bk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bk.train_from_iterator(["USER: What is in the image? ASSISTANT: A cat on a mat."] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=specials[4:], name_or_path="tiny-bpe")


def _dec(tok, ids):
    return tok.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _enc(tok, template, turns, num_images=1, seq=512):
    e = encode_conversation(tok, turns, num_images, N_IMG, seq, template=template)
    ids, labels = e["input_ids"], e["labels"]
    n = int((ids != tok.pad_token_id).sum())
    sup = labels != IGNORE_INDEX
    assert torch.equal(labels[sup], ids[sup])
    assert int((ids == image_token_id(tok)).sum()) == N_IMG * num_images
    assert not sup[ids == image_token_id(tok)].any()
    return _dec(tok, ids[:n]), _dec(tok, ids[sup]), e


ONE = [("<image>\nWhat is in the image?", "A cat.")]
TWO = [("<image>\nWhat is in the image?", "A cat."), ("And the colour?", "Black.")]

# (template, turns) -> (full text, supervised text), written out by hand.
EXPECTED_BPE = {
    ("plain", "one"): (f"<s>{IMG}A cat.</s>", "A cat.</s>"),
    ("vicuna_v1", "one"): (f"<s>{SYS_V1} USER: {IMG}\nWhat is in the image? ASSISTANT: A cat.</s>", " A cat.</s>"),
    ("vicuna_v1", "two"): (f"<s>{SYS_V1} USER: {IMG}\nWhat is in the image? ASSISTANT: A cat.</s>"
                           "USER: And the colour? ASSISTANT: Black.</s>", " A cat.</s> Black.</s>"),
    ("llama_2", "one"): (f"<s>[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\n{IMG}\nWhat is in the image? [/INST] A cat. </s>",
                         " A cat. </s>"),
    ("llama_2", "two"): (f"<s>[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\n{IMG}\nWhat is in the image? [/INST] A cat. </s>"
                         "<s>[INST] And the colour? [/INST] Black. </s>", " A cat. </s> Black. </s>"),
    ("chatml", "one"): ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        f"<|im_start|>user\n{IMG}\nWhat is in the image?<|im_end|>\n"
                        "<|im_start|>assistant\nA cat.<|im_end|>", "A cat.<|im_end|>"),
    ("chatml", "two"): ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        f"<|im_start|>user\n{IMG}\nWhat is in the image?<|im_end|>\n"
                        "<|im_start|>assistant\nA cat.<|im_end|>\n"
                        "<|im_start|>user\nAnd the colour?<|im_end|>\n"
                        "<|im_start|>assistant\nBlack.<|im_end|>", "A cat.<|im_end|>Black.<|im_end|>"),
}


@pytest.mark.parametrize("key", sorted(EXPECTED_BPE))
def test_templates_hf_bpe(bpe, key):
    template, which = key
    full, sup, _ = _enc(bpe, template, ONE if which == "one" else TWO)
    assert (full, sup) == EXPECTED_BPE[key]


def test_implicit_image_and_prompt(bpe):
    # no <image> in the question: LLaVA's "<image>\n" goes in front of the first question
    full, sup, e = _enc(bpe, "vicuna_v1", [("What is in the image?", "A cat.")])
    assert full == f"<s>{SYS_V1} USER: {IMG}\nWhat is in the image? ASSISTANT: A cat.</s>"
    full, _, _ = _enc(bpe, "plain", [("ignored question", "A cat.")])
    assert full == f"<s>{IMG}A cat.</s>"
    full, sup, _ = _enc(bpe, "chatml", [("Hi?", "Hello.")], num_images=0)
    assert "<image>" not in full and sup == "Hello.<|im_end|>"
    # the generation prompt is exactly the unsupervised prefix of the training sample
    for t in NEW:
        e = encode_conversation(bpe, TWO, 1, N_IMG, 512, template=t)
        first_sup = int((e["labels"] != IGNORE_INDEX).nonzero()[0])
        p = encode_prompt(bpe, ONE, 1, N_IMG, template=t)
        assert torch.equal(p, e["input_ids"][:first_sup]), t


EXPECTED_SYNTH = {  # the word-level synthetic tokenizer decodes with spaces between words
    "plain": "red </s>",
    "vicuna_v1": "red </s> circle </s>",
    "llama_2": "red </s> circle </s>",
    "chatml": "red <|im_end|> circle <|im_end|>",
}


def test_templates_synthetic_tokenizer():
    default = build_synthetic_tokenizer()
    tok = build_synthetic_tokenizer(templates=NEW)
    # the default vocabulary is unchanged (existing runs keep their vocab size and ids); extras are appended
    assert len(default) == 28
    assert all(tok.get_vocab()[w] == i for w, i in default.get_vocab().items())
    assert tok.convert_tokens_to_ids("<|im_end|>") >= len(default)
    turns = [("<image>\nwhat color is the square ?", "red"), ("what shape is blue ?", "circle")]
    for t in NEW:
        tt = turns[:1] if t == "plain" else turns
        e = encode_conversation(tok, tt, 1, N_IMG, 128, template=t)
        assert tok.unk_token_id not in e["input_ids"].tolist(), t
        sup = e["labels"] != IGNORE_INDEX
        assert tok.decode(e["input_ids"][sup].tolist()) == EXPECTED_SYNTH[t], t
    # vicuna (default) is unchanged by the new fields
    e = encode_conversation(default, turns, 1, 2, 64)
    n = int((e["input_ids"] != 0).sum())
    assert default.decode(e["input_ids"][:n].tolist()) == (
        "<s> USER : <image> <image> what color is the square ? ASSISTANT : red </s> "
        "USER : what shape is blue ? ASSISTANT : circle </s>")


def test_registered():
    assert set(NEW) | {"vicuna"} <= set(TEMPLATES)


def test_check_supervision(bpe):
    good = [encode_conversation(bpe, ONE, 1, N_IMG, 256, template="chatml") for _ in range(4)]
    assert check_supervision(good, 0.0) == {"samples": 4, "unsupervised": 0, "share": 0.0}
    # an empty answer with a template without end text -> no supervised token (what a template/tokenizer
    # mismatch looks like once the answer spans are masked away)
    from megavlm.data.conversation import ConversationTemplate

    bare = ConversationTemplate(name="bare", user_prefix="USER:", assistant_prefix="ASSISTANT:",
                                in_synthetic_vocab=False)
    empty = encode_conversation(bpe, [("<image>\nWhat?", "")], 1, N_IMG, 256, template=bare)
    assert not (empty["labels"] != IGNORE_INDEX).any()
    assert check_supervision(good * 3 + [empty], 0.1)["unsupervised"] == 1
    with pytest.raises(UserError) as e:
        check_supervision(good + [empty], 0.1, template="chatml", tokenizer=bpe)
    msg = str(e.value)
    assert "1 of 5 samples" in msg and "'chatml'" in msg and "tiny-bpe" in msg and "no supervised token" in msg
    with pytest.raises(UserError, match="'bare'"):
        check_supervision([{"labels": torch.full((8,), IGNORE_INDEX)}], 0.5, template=bare)


TEXTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", " A cat on a mat.</s>", "<|im_start|>user\n<image><image>x",
         "", "  spaces  and\ttabs\n", "ünïcödé ✓ 猫"]


@pytest.mark.parametrize("which", ["bpe", "synthetic"])
def test_text_ids_equal_the_tokenizer_call(bpe, which):
    """``text_ids`` (the Rust tokenizer read directly on the training path) gives ``tok(text,
    add_special_tokens=False)["input_ids"]`` exactly, also after a padded / truncated call left settings on the
    backend and with ``split_special_tokens`` on, where it must fall back to the wrapper."""
    from megavlm.data.constants import _plain_backend, text_ids

    tok = bpe if which == "bpe" else build_synthetic_tokenizer(existence=True)
    assert _plain_backend(type(tok))  # the direct path is the one under test

    def ref(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    for t in TEXTS:
        assert text_ids(tok, t) == ref(t), t
    tok._tokenizer.enable_padding(length=64, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    tok._tokenizer.enable_truncation(4)
    try:
        for t in TEXTS:
            got = text_ids(tok, t)
            assert got == ref(t), t
        assert len(text_ids(tok, TEXTS[0])) > 4  # neither padded nor cut
    finally:
        tok._tokenizer.no_padding()
        tok._tokenizer.no_truncation()
    tok.split_special_tokens = True
    try:
        assert text_ids(tok, TEXTS[0]) == ref(TEXTS[0])
        assert image_token_id(tok) not in text_ids(tok, TEXTS[0])  # really split
    finally:
        tok.split_special_tokens = False
