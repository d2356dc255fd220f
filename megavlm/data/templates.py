"""Conversation templates: the text a chat format puts around the user questions and the assistant answers.

Torch-free (config checks name the templates). A template is a table entry (:class:`ConversationTemplate`);
:mod:`megavlm.data.conversation` encodes a conversation with one. The library here holds the chat formats the
shipped model families use (each family names its default, ``Family.default_template``); a family with a format of
its own registers it with :func:`register_template` in its module. docs/data.md shows the exact text of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

DEFAULT_TEMPLATE = "vicuna"


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
    # Interleaved documents (VILA's MMC4 / OBELICS pretraining; megavlm.data.interleaved): "<s>{text with images}</s>",
    # no roles, every text token and the closing </s> supervised (conversation.encode_document). A document record
    # is always encoded with it; data.template applies to the conversation records.
    "document": ConversationTemplate(
        name="document",
        prefix="<s>",
        sep="",
        answer_suffix="</s>",
        include_question=False,
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


def template_names() -> tuple[str, ...]:
    """Names of the registered templates, in registration order."""
    return tuple(TEMPLATES)


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
