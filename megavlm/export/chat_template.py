"""Chat messages (OpenAI / Hugging Face style) → the turns of a megavlm conversation template, in Python (what
``megavlm serve`` encodes) and as the equivalent Jinja chat template (what ``convert mcore-to-hf`` writes beside an
HF export, so that ``AutoProcessor.apply_chat_template`` and serving stacks render the same text).

Torch-free. One set of rules, implemented twice and tested against each other (tests/export/test_chat_template.py):

- ``system`` (or ``developer``) messages may only open the conversation; their text goes, joined by newlines, in
  front of the first user question (the templates' own system prompt stays where it is: in the template's prefix).
- Then ``user`` and ``assistant`` messages alternate, starting with ``user``. A message's content is a string or a
  list of parts: ``text`` parts and image parts (``image_url``, OpenAI; ``image``, Hugging Face). Its text is its parts
  joined by newlines, an image part standing as the image placeholder.
- When every image of the conversation comes first in the first user message (the usual "image, then question"),
  the images are *implicit*: the question is the text alone and the template places the images as training does
  (``megavlm generate --image --prompt`` encodes exactly this). Otherwise each image stays where its part is.
- Assistant messages carry no images. A literal image placeholder in the text is refused (it would be read as an
  image).

The rendered text is the concatenation of what :func:`megavlm.data.conversation.encode_prompt` tokenizes; it tokenizes
each answer separately from the text around it, so with a BPE tokenizer a multi-turn history may split differently at
the edges of an answer than the whole rendered string does (single-turn prompts are one piece: identical).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.constants import IMAGE_TOKEN
from ..data.templates import get_template

SYSTEM_ROLES = ("system", "developer")
IMAGE_PART_TYPES = ("image_url", "image")


class MessagesError(ValueError):
    """The messages do not form a conversation the template can encode (the text says why)."""


@dataclass
class Conversation:
    """``turns``: ``(question, answer)`` pairs, the last answer None (the prompt); questions hold ``<image>`` where an
    image stays in place (``implicit`` False). ``images``: the image parts in order (their payloads untouched)."""

    turns: list[tuple[str, str | None]]
    images: list
    implicit: bool


def _parts(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise MessagesError(f"{where}: content must be a string or a list of parts")
    out = []
    for k, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("text",) + IMAGE_PART_TYPES:
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise MessagesError(f"{where}: part {k} has type {kind!r}; supported: text, image_url")
        if p["type"] == "text" and not isinstance(p.get("text"), str):
            raise MessagesError(f"{where}: text part {k} has no 'text' string")
        out.append(p)
    return out


def _text(parts: list[dict]) -> str:
    return "\n".join(IMAGE_TOKEN if p["type"] != "text" else p["text"] for p in parts)


def to_conversation(messages) -> Conversation:
    """The turns of ``messages`` (a list of ``{"role", "content"}`` dicts) by the rules of the module docstring;
    :class:`MessagesError` when they do not form one."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError("messages must be a non-empty list")
    system: list[str] = []
    rest = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise MessagesError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] in SYSTEM_ROLES:
            if rest:
                raise MessagesError(f"messages[{i}]: a {m['role']} message may only open the conversation")
            parts = _parts(m.get("content"), f"messages[{i}]")
            if any(p["type"] != "text" for p in parts):
                raise MessagesError(f"messages[{i}]: a {m['role']} message carries no images")
            system.append(_text(parts))
        else:
            rest.append((i, m))
    if not rest:
        raise MessagesError("messages hold no user message")
    turns: list[list] = []
    images: list = []
    first_user_parts: list[dict] | None = None
    for k, (i, m) in enumerate(rest):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise MessagesError(f"messages[{i}] has role {m['role']!r}; after the system messages, user and assistant "
                                f"messages alternate starting with user (expected {want!r})")
        parts = _parts(m.get("content"), f"messages[{i}]")
        for p in parts:
            if p["type"] == "text" and IMAGE_TOKEN in p["text"]:
                raise MessagesError(f"messages[{i}]: the text holds {IMAGE_TOKEN!r}; send images as image_url parts")
        if want == "assistant":
            if any(p["type"] != "text" for p in parts):
                raise MessagesError(f"messages[{i}]: an assistant message carries no images")
            turns[-1][1] = _text(parts)
            continue
        images += [p for p in parts if p["type"] != "text"]
        if first_user_parts is None:
            first_user_parts = parts
        turns.append([parts, None])
    if rest[-1][1]["role"] != "user":
        raise MessagesError("the last message must be a user message (the one to answer)")
    leading = 0
    while leading < len(first_user_parts) and first_user_parts[leading]["type"] != "text":
        leading += 1
    implicit = leading == len(images)
    out = []
    for k, (parts, answer) in enumerate(turns):
        if k == 0 and implicit:
            parts = parts[leading:]
        q = _text(parts)
        if k == 0 and system:
            q = "\n".join(system + ([q] if parts else []))
        out.append((q, answer))
    return Conversation(out, images, implicit)


def _lit(s: str | None) -> str:
    """A Jinja string literal of ``s``."""
    return json.dumps(s or "", ensure_ascii=False)


def jinja_template(template, image_text: str = IMAGE_TOKEN) -> str:
    """The Jinja chat template rendering messages as the conversation ``template`` (a name or a
    ``ConversationTemplate``) encodes :func:`to_conversation`'s turns, an image standing as ``image_text`` (the
    placeholder the family's HF processor expands). ``add_generation_prompt`` ends the text with the assistant prefix;
    otherwise a last user message ends at its user suffix. Messages the rules refuse raise an exception in the
    template."""
    t = get_template(template)
    first_user = t.user_prefix if t.first_user_prefix is None else t.first_user_prefix
    answer_sep = t.sep if t.answer_sep is None else t.answer_sep
    return _jinja(t, first_user, answer_sep, image_text)


def _jinja(t, first_user: str, answer_sep: str, image_text: str) -> str:
    L = _lit
    img = L(image_text)
    # Two passes over the messages: the first gathers the system text, counts the images and how many lead the first
    # user message, and checks the rules; the second writes the text (pieces joined by the template's sep, as
    # data/conversation.py joins them). A string content is read as one text part.
    lines = [
        "{#- megavlm conversation template " + repr(t.name) + " (written by megavlm/export/chat_template.py) -#}",
        "{%- set ns = namespace(system='', has_system=false, users=0, images=0, leading=0, lead=true, "
        "last_role='', out='', pieces=[], q='', started=false, first_len=0) -%}",
        # pass 1
        "{%- for m in messages -%}",
        "{%- set c = [{'type': 'text', 'text': m['content']}] if m['content'] is string else "
        "(m['content'] if m['content'] is not none else []) -%}",
        "{%- if m['role'] in ['system', 'developer'] -%}",
        "{%- if ns.users > 0 -%}{{ raise_exception('a system message may only open the conversation') }}{%- endif -%}",
        "{%- for p in c -%}{%- if p['type'] != 'text' -%}{{ raise_exception('a system message carries no images') }}"
        "{%- endif -%}{%- endfor -%}",
        "{%- set ns.system = ns.system + ('\\n' if ns.has_system else '') + (c | map(attribute='text') | join('\\n'))"
        " -%}{%- set ns.has_system = true -%}",
        "{%- else -%}",
        "{%- set want = 'user' if ns.last_role != 'user' else 'assistant' -%}",
        "{%- if m['role'] != want -%}{{ raise_exception('user and assistant messages alternate, starting with user')"
        " }}{%- endif -%}",
        "{%- for p in c -%}",
        "{%- if p['type'] in ['image', 'image_url'] -%}",
        "{%- if m['role'] == 'assistant' -%}{{ raise_exception('an assistant message carries no images') }}"
        "{%- endif -%}",
        "{%- set ns.images = ns.images + 1 -%}",
        "{%- if ns.users == 0 and ns.lead -%}{%- set ns.leading = ns.leading + 1 -%}{%- endif -%}",
        "{%- elif p['type'] == 'text' -%}",
        "{%- if ns.users == 0 and m['role'] == 'user' -%}{%- set ns.lead = false -%}{%- endif -%}",
        "{%- if " + L(IMAGE_TOKEN) + " in p['text'] -%}{{ raise_exception('the text holds the image placeholder; "
        "send images as image parts') }}{%- endif -%}",
        "{%- else -%}{{ raise_exception('unsupported content part type: ' ~ p['type']) }}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if m['role'] == 'user' -%}{%- if ns.users == 0 -%}{%- set ns.first_len = c | length -%}{%- endif -%}"
        "{%- set ns.users = ns.users + 1 -%}{%- endif -%}",
        "{%- set ns.last_role = m['role'] -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if ns.users == 0 -%}{{ raise_exception('messages hold no user message') }}{%- endif -%}",
        "{%- set implicit = ns.leading == ns.images -%}",
        # pass 2
        "{%- set ns.users = 0 -%}",
        "{%- set ns.pieces = [" + L(t.prefix) + "] -%}",
        "{%- for m in messages if m['role'] not in ['system', 'developer'] -%}",
        "{%- set c = [{'type': 'text', 'text': m['content']}] if m['content'] is string else "
        "(m['content'] if m['content'] is not none else []) -%}",
        "{%- if m['role'] == 'user' -%}",
        "{%- if ns.users > 0 -%}{%- set ns.pieces = ns.pieces + [" + L(t.turn_separator) + "] -%}{%- endif -%}",
        "{%- set ns.pieces = ns.pieces + [" + L(first_user) + " if ns.users == 0 else " + L(t.user_prefix) + "] -%}",
        "{%- set ns.q = '' -%}{%- set ns.started = false -%}",
        "{%- for p in c -%}{%- if not (ns.users == 0 and implicit and loop.index0 < ns.leading) -%}",
        "{%- set ns.q = ns.q + ('\\n' if ns.started else '') + (p['text'] if p['type'] == 'text' else " + img +
        ") -%}{%- set ns.started = true -%}",
        "{%- endif -%}{%- endfor -%}",
        "{%- if ns.users == 0 and ns.has_system -%}{%- set ns.q = ns.system + (('\\n' + ns.q) if ns.first_len > "
        "(ns.leading if implicit else 0) else '') -%}{%- endif -%}",
        "{%- if ns.users == 0 and implicit and ns.images > 0 -%}",
    ]
    images = "(" + img + " * ns.images)"
    if t.image_join is None:
        lines.append("{%- set ns.pieces = ns.pieces + [" + img + "] * ns.images -%}")
    elif not t.include_question:
        lines.append("{%- set ns.pieces = ns.pieces + [" + images + "] -%}")
    else:
        lines.append("{%- set ns.q = " + images + " + ((" + L(t.image_join) + " + ns.q) if ns.q else '') -%}")
    lines.append("{%- endif -%}")
    if t.include_question:
        lines.append("{%- set ns.pieces = ns.pieces + [ns.q] -%}")
    else:  # explicit image placeholders stay, the question text does not
        lines.append("{%- if not (ns.users == 0 and implicit) -%}{%- for p in c if p['type'] != 'text' -%}"
                     "{%- set ns.pieces = ns.pieces + [" + img + "] -%}{%- endfor -%}{%- endif -%}")
    lines += [
        "{%- set ns.pieces = ns.pieces + [" + L(t.user_suffix) + "] -%}",
        "{%- set ns.users = ns.users + 1 -%}",
        "{%- if loop.last -%}",
        "{%- if add_generation_prompt -%}{%- set ns.pieces = ns.pieces + [" + L(t.assistant_prefix) + "] -%}"
        "{%- endif -%}",
        "{%- set ns.out = ns.out + (ns.pieces | select | join(" + L(t.sep) + ")) -%}",
        "{%- endif -%}",
        "{%- else -%}",
        "{%- set ns.pieces = ns.pieces + [" + L(t.assistant_prefix) + "] -%}",
        "{%- set ns.out = ns.out + (ns.pieces | select | join(" + L(t.sep) + ")) -%}",
        "{%- set a = c | map(attribute='text') | join('\\n') -%}",
        "{%- set ns.out = ns.out + " + L(t.answer_prefix) + " + ([a, " + L(t.answer_suffix) + "] | select | join("
        + L(answer_sep) + ")) -%}",
        "{%- set ns.pieces = [] -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{{- ns.out -}}",
    ]
    return "\n".join(lines)
