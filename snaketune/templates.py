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

    def chat_template(self) -> str:
        """A Jinja ``chat_template`` that renders conversations as this template does.

        Saved with the merged model so that ``tokenizer.apply_chat_template``
        reproduces the training format byte for byte.
        """

        def lit(s: str) -> str:
            return "{{ " + repr(s) + " }}"

        sys_pre, sys_post = self.system.split("{system}")
        ins_pre, ins_post = self.instruction.split("{input}")
        return (
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}"
            + lit(sys_pre) + "{{ message['content'] }}" + lit(sys_post)
            + "{% elif message['role'] == 'user' %}"
            + lit(ins_pre) + "{{ message['content'] }}" + lit(ins_post)
            + "{% elif message['role'] == 'assistant' %}"
            "{{ message['content'] }}" + lit(self.suffix + self.sep)
            + "{% endif %}{% endfor %}"
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

def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted([*TEMPLATES, TOKENIZER_TEMPLATE]))
        raise ValueError(f"unknown prompt template {name!r}; known templates: {known}") from None
