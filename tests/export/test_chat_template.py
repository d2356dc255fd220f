"""The chat template written beside an HF export renders exactly what megavlm encodes: for every conversation
template, the Jinja template (run by transformers' own renderer) and megavlm's messages → turns → template text
agree on images first or in place, system text, history, and refuse the same malformed conversations."""

from __future__ import annotations

import pytest

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def T(s: str) -> dict:
    return {"type": "text", "text": s}


CASES = [
    [{"role": "user", "content": [IMG, T("what color is the circle ?")]}],
    [{"role": "user", "content": "what shape is blue ?"}],
    [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": [IMG, T("what color ?")]}],
    [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": [IMG]}],
    [{"role": "user", "content": [IMG, IMG, T("compare"), T("them")]}, {"role": "assistant", "content": "red"},
     {"role": "user", "content": "why ?"}],
    [{"role": "user", "content": [T("look"), IMG, T("now")]}, {"role": "assistant", "content": [T("a circle")]},
     {"role": "user", "content": [{"type": "image"}, T("and this")]}],
    [{"role": "developer", "content": "s1"}, {"role": "system", "content": [T("s2")]}, {"role": "user", "content": []},
     {"role": "assistant", "content": "x"}, {"role": "user", "content": [IMG]}],
]
BAD = [
    [],
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [IMG]}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "what is <image> ?"}],
    [{"role": "user", "content": [{"type": "audio"}]}],
]


def _render(messages, template_name: str, generation: bool = True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    from megavlm.export.chat_template import jinja_template

    out, _ = render_jinja_template(conversations=[messages], chat_template=jinja_template(template_name),
                                   add_generation_prompt=generation)
    return out[0]


@pytest.mark.parametrize("name", ["vicuna", "plain", "vicuna_v1", "llama_2", "chatml"])
def test_jinja_renders_what_megavlm_encodes(name):
    from megavlm.data.constants import IMAGE_TOKEN
    from megavlm.data.conversation import _runs, encode_prompt
    from megavlm.data.templates import get_template, template_names
    from megavlm.data.tokenizer import build_synthetic_tokenizer, image_token_id
    from megavlm.export.chat_template import to_conversation

    assert set(template_names()) >= {name}
    tok = build_synthetic_tokenizer()
    tid = image_token_id(tok)
    for messages in CASES:
        conv = to_conversation(messages)
        n = len(conv.images)
        text = "".join(r for r, _ in _runs(get_template(name), conv.turns, n, with_last_answer=False))
        got = _render(messages, name)
        assert got == text, (name, messages)
        # and as ids: megavlm's encoding of the turns (an image as one token) equals the rendered text's
        ids = encode_prompt(tok, conv.turns, n, 1, template=name).tolist()
        assert tok(got, add_special_tokens=False)["input_ids"] == ids
        assert ids.count(tid) == n and got.count(IMAGE_TOKEN) == n


def test_images_first_are_placed_as_generate_places_them():
    from megavlm.export.chat_template import to_conversation

    conv = to_conversation(CASES[0])
    assert conv.implicit and conv.turns == [("what color is the circle ?", None)] and len(conv.images) == 1
    conv = to_conversation(CASES[5])
    assert not conv.implicit and conv.turns[0] == ("look\n<image>\nnow", "a circle")
    assert conv.turns[1] == ("<image>\nand this", None)
    assert to_conversation(CASES[2]).turns == [("answer in one word\nwhat color ?", None)]


def test_same_refusals_both_ways():
    from jinja2.exceptions import TemplateError

    from megavlm.export.chat_template import MessagesError, to_conversation

    for messages in BAD:
        with pytest.raises(MessagesError):
            to_conversation(messages)
        if messages and messages[-1]["role"] == "user":
            with pytest.raises((TemplateError, TypeError, ValueError)):
                _render(messages, "vicuna")


@pytest.mark.parametrize("name", ["vicuna", "vicuna_v1", "chatml"])
def test_a_closing_answer_renders_as_training_encodes_it(name):
    """Ending with an assistant message gives the training text (what ``encode_conversation`` supervises)."""
    from megavlm.data.conversation import _runs
    from megavlm.data.templates import get_template

    messages = [{"role": "user", "content": [IMG, T("q")]}, {"role": "assistant", "content": "red"}]
    want = "".join(r for r, _ in _runs(get_template(name), [("q", "red")], 1, with_last_answer=True))
    assert _render(messages, name, generation=False) == want
    assert _render(messages[:1], "vicuna", generation=False) == "<s> USER: <image> q"
