"""Prompt templates with XTuner's strings (``xtuner/utils/templates.py``).

A template turns one conversation turn into an *input* string (system prompt
on turn 0, then the user instruction) and an *output* string (the answer plus
the template's end-of-turn suffix). Only the output is supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKENIZER_TEMPLATE = "tokenizer"
"""Template name meaning "use the tokenizer's own ``chat_template``"."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    instruction: str
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = field(default_factory=tuple)

    def format_input(self, text: str, system: str | None = None, round: int = 1) -> str:
        """XTuner's ``template_map_fn`` for the input side of one turn."""
        out = self.instruction.format(input=text or "", round=round)
        if system:
            out = self.system.format(system=system) + out
        return out

    def format_output(self, text: str) -> str:
        return (text or "") + self.suffix

    def chat_template(self, bos: bool = False) -> str:
        """A Jinja ``chat_template`` that renders conversations as the encoder encodes them.

        Saved with the merged model so that ``tokenizer.apply_chat_template``
        gives the training token ids for a multi-turn conversation. Where the
        suffix is not the EOS (``default``, ``zephyr``) the encoder appends the
        tokenizer's EOS to every answer and starts the next turn with BOS; the
        template writes them as ``eos_token`` and ``bos_token``. ``bos``: the
        encoder starts a conversation with BOS for this tokenizer (``merge``
        asks the encoder; a ChatML tokenizer whose BOS is ``<|im_start|>``
        gets none).
        """

        def lit(s: str) -> str:
            return "{{ " + repr(s) + " }}" if s else ""

        sys_pre, sys_post = self.system.split("{system}")
        ins_pre, ins_post = self.instruction.split("{input}")
        eos = "" if self.suffix_as_eos else "{{ eos_token }}"
        # A turn after an answer starts at its system or user message; the encoder puts BOS there
        # when the answer ended with the EOS it appended.
        new_turn = (
            ("{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ bos_token }}{% endif %}")
            if bos and not self.suffix_as_eos
            else ""
        )
        return (
            ("{{ bos_token }}" if bos else "") + "{% for message in messages %}"
            "{% if message['role'] == 'system' %}"
            + new_turn
            + lit(sys_pre)
            + "{{ message['content'] }}"
            + lit(sys_post)
            + "{% elif message['role'] == 'user' %}"
            + new_turn
            + lit(ins_pre)
            + "{{ message['content'] }}"
            + lit(ins_post)
            + "{% elif message['role'] == 'assistant' %}"
            "{{ message['content'] }}" + lit(self.suffix) + eos + lit(self.sep) + "{% endif %}{% endfor %}"
        )


_CHATML = dict(
    system="<|im_start|>system\n{system}<|im_end|>\n",
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    suffix_as_eos=True,
    sep="\n",
)

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in [
        PromptTemplate(
            name="default",
            system="<|System|>:{system}\n",
            instruction="<|User|>:{input}\n<|Bot|>:",
            sep="\n",
        ),
        PromptTemplate(
            name="zephyr",
            system="<|system|>\n{system}\n",
            instruction="<|user|>\n{input}\n<|assistant|>\n",
            sep="\n",
        ),
        PromptTemplate(
            name="internlm_chat",
            system="<|System|>:{system}\n",
            instruction="<|User|>:{input}<eoh>\n<|Bot|>:",
            suffix="<eoa>",
            suffix_as_eos=True,
            sep="\n",
            stop_words=("<eoa>",),
        ),
        PromptTemplate(name="internlm2_chat", stop_words=("<|im_end|>",), **_CHATML),
        PromptTemplate(name="qwen_chat", stop_words=("<|im_end|>", "<|endoftext|>"), **_CHATML),
        PromptTemplate(
            name="llama3_chat",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            instruction=(
                "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            suffix="<|eot_id|>",
            suffix_as_eos=True,
            stop_words=("<|eot_id|>",),
        ),
    ]
}


SYSTEM_TEMPLATES: dict[str, str] = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    ),
}
"""XTuner's ``SYSTEM_TEMPLATE`` entries (``--system-template NAME`` of ``xtuner chat``); only alpaca so far."""


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted([*TEMPLATES, TOKENIZER_TEMPLATE]))
        raise ValueError(f"unknown prompt template {name!r}; known templates: {known}") from None
