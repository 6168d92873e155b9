"""Conversation -> (input_ids, labels), as XTuner's ``encode_fn`` does.

Each turn is split into segments: BOS (when the previous turn ended with EOS),
the input (system prompt on turn 0 and the user's text, never supervised),
the output with the template's suffix (supervised unless the turn says
``output_with_loss: false``), an EOS when the suffix is not itself the EOS
(supervised), and the separator (not supervised). Segments are tokenized one
by one, as XTuner does, so the token boundaries match it exactly.

A last turn marked ``end_of_turn: false`` (snaketune's extension: an answer
that was cut off, such as a replay answer that ran into its token limit)
gets no suffix, EOS or separator: it teaches the text without teaching the
model to stop there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .templates import TOKENIZER_TEMPLATE, PromptTemplate, get_template

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: int = 0  # tokens cut off at max_length


def resolve_template(template: PromptTemplate | str) -> PromptTemplate | str:
    """A template object, or the marker string for the tokenizer's own chat template."""
    if isinstance(template, PromptTemplate) or template == TOKENIZER_TEMPLATE:
        return template
    return get_template(template)


def bos_eos_ids(tokenizer) -> tuple[list[int], list[int]]:
    """XTuner's ``get_bos_eos_token_ids``: Qwen tokenizers have no BOS."""
    if type(tokenizer).__name__ in {"QWenTokenizer", "QWen2Tokenizer", "Qwen2TokenizerFast", "Qwen2Tokenizer"}:
        bos = []
    else:
        bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one in the model's tokenizer_config.json")
    bos = [] if bos is None else ([bos] if isinstance(bos, int) else list(bos))
    eos = [eos] if isinstance(eos, int) else list(eos)
    return bos, eos


def _segments_from_template(conversation: list[dict], template: PromptTemplate) -> list[tuple[str, bool, bool]]:
    """(input_text, output_text, output_with_loss) per turn, with XTuner's template_map_fn."""
    turns = []
    for i, turn in enumerate(conversation):
        turns.append(
            (
                template.format_input(turn.get("input", ""), turn.get("system") or None, round=i + 1),
                template.format_output(turn.get("output", "")) if ends(turn) else turn.get("output", ""),
                turn.get("output_with_loss", True),
            )
        )
    return turns


def ends(turn: dict) -> bool:
    """Whether a turn's output ends its turn (the template's suffix, EOS and separator follow)."""
    return turn.get("end_of_turn", True)


def _segments_from_chat_template(conversation: list[dict], tokenizer) -> list[tuple[str, str, bool]]:
    """Split the tokenizer's own chat template rendering into input and output text per turn."""
    messages: list[dict] = []
    rendered = ""
    turns = []
    for turn in conversation:
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn.get("input", "")})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": turn.get("output", "")})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations incrementally; "
                "choose one of the named templates instead"
            )
        output = full[len(prompt) :] if ends(turn) else turn.get("output", "")
        turns.append((prompt[len(rendered) :], output, turn.get("output_with_loss", True)))
        rendered = full
    return turns


def encode_conversation(
    conversation: list[dict], tokenizer, template: PromptTemplate | str, max_length: int
) -> Encoded:
    template = resolve_template(template)
    if template == TOKENIZER_TEMPLATE:
        # The chat template writes its own special tokens; its end-of-turn is
        # part of the output text, so no separate EOS/BOS handling.
        turns, need_eos, sep = _segments_from_chat_template(conversation, tokenizer), False, ""
        bos: list[int] = []
        eos: list[int] = []
    else:
        turns, need_eos, sep = _segments_from_template(conversation, template), not template.suffix_as_eos, template.sep
        bos, eos = bos_eos_ids(tokenizer)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    input_ids: list[int] = []
    labels: list[int] = []
    needs_bos = True
    for turn, (inp, out, with_loss) in zip(conversation, turns):
        ids = enc(inp)
        if needs_bos and ids[: len(bos)] != bos:
            # XTuner always prepends BOS; a ChatML tokenizer whose BOS is
            # <|im_start|> would then see it twice, which no chat format has.
            input_ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        ids = enc(out)
        input_ids += ids
        labels += ids if with_loss else [IGNORE_INDEX] * len(ids)
        if need_eos and ends(turn):
            input_ids += eos
            labels += eos if with_loss else [IGNORE_INDEX] * len(eos)
        needs_bos = need_eos
        if sep and ends(turn):
            ids = enc(sep)
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
    truncated = max(0, len(input_ids) - max_length)
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


def encode_prompt(question: str, tokenizer, template: PromptTemplate | str, system: str = "") -> list[int]:
    """Token ids of a round-1 prompt, exactly as the model saw prompts in training."""
    template = resolve_template(template)
    if template == TOKENIZER_TEMPLATE:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    bos, _ = bos_eos_ids(tokenizer)
    ids = tokenizer.encode(template.format_input(question, system or None), add_special_tokens=False)
    return ids if ids[: len(bos)] == bos else bos + ids


def stop_token_ids(tokenizer, template: PromptTemplate | str) -> list[int]:
    """Token ids that end an answer: EOS plus the template's stop words that are single tokens."""
    template = resolve_template(template)
    ids = list(bos_eos_ids(tokenizer)[1])
    words = () if template == TOKENIZER_TEMPLATE else template.stop_words
    for word in words:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(toks[0])
    return ids
